"""pytest plugin: CPU-seconds and wall seconds per test file, for bench/suite_cost.py.

Loaded only on request (`-p cpu_per_file`, with `tests/` on the path as pytest puts it). Around
each test it reads `resource.getrusage` for the process itself and for its waited-for children
(the subprocesses a test runs), so a file's CPU time includes the `main train` processes it
starts. Each process (the xdist workers, or the pytest process with `-n 0`) writes its totals to
`$CPU_PER_FILE_OUT.<worker>.json` at the end of the session.
"""
import collections
import json
import os
import resource
import time

import pytest

_cpu = collections.defaultdict(float)
_wall = collections.defaultdict(float)


def _now() -> tuple[float, float]:
  own = resource.getrusage(resource.RUSAGE_SELF)
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
  return cpu, time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # setup, call and teardown of one test
  cpu0, wall0 = _now()
  yield
  cpu1, wall1 = _now()
  _cpu[item.path.name] += cpu1 - cpu0
  _wall[item.path.name] += wall1 - wall0


def pytest_sessionfinish(session):
  out = os.environ.get("CPU_PER_FILE_OUT")
  if out and _cpu:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(f"{out}.{worker}.json", "w") as f:
      json.dump({"cpu": _cpu, "wall": _wall}, f)
