"""What the test suite costs, per file: CPU-seconds (the tests' own and their subprocesses') and
wall seconds, as a table (docs/testing.md records it).

  .venv/bin/python bench/suite_cost.py                 # the whole suite, as the README runs it
  .venv/bin/python bench/suite_cost.py tests/test_train.py -n 0

Runs `python -m pytest -q -p cpu_per_file [ARGS]` (tests/cpu_per_file.py), then prints every file
sorted by CPU time and the totals. CPU time depends far less than wall time on what else the
machine runs: on a machine with C cores the suite needs at least total CPU / C seconds.
"""
import glob
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv: list[str]) -> int:
  with tempfile.TemporaryDirectory(prefix="suite_cost_") as out:
    # tests/ on the path: `-p` loads the plugin before pytest reads tests/conftest.py.
    path = os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, CPU_PER_FILE_OUT=os.path.join(out, "cost"), PYTHONPATH=path)
    start = time.time()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "cpu_per_file", *argv],
                         cwd=REPO, env=env)
    wall = time.time() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu, file_wall = {}, {}
    for path in glob.glob(os.path.join(out, "cost.*.json")):
      with open(path) as f:
        part = json.load(f)
      for name, seconds in part["cpu"].items():
        cpu[name] = cpu.get(name, 0.0) + seconds
        file_wall[name] = file_wall.get(name, 0.0) + part["wall"][name]
  total = sum(cpu.values())
  print(f"\n| file | CPU-seconds | share | wall seconds |\n| --- | ---: | ---: | ---: |")
  for name in sorted(cpu, key=cpu.get, reverse=True):
    print(f"| `{name}` | {cpu[name]:.0f} | {cpu[name] / max(total, 1e-9):.0%} | "
          f"{file_wall[name]:.0f} |")
  print(f"| **all {len(cpu)} files** | **{total:.0f}** | | |")
  print(f"\npytest: {wall:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} CPU-seconds in all "
        f"(workers, collection and start-up included), exit status {rc}")
  return rc


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
