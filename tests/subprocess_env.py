"""Settings and helpers the test suite shares with the processes it starts (training runs,
notebook kernels, scripts).

Not a test module: conftest.py and the tests that start subprocesses import it.
"""
import signal
import subprocess
import sys
import time

# XLA:CPU without its LLVM optimisation passes compiles 2-3x faster, and compiling the tiny
# models' initialisers, train steps and samplers is most of what the suite does; the few steps
# each test runs execute a little slower, which costs far less. Same ops, so the parity
# tolerances hold; only the float rounding differs, which is why tests/test_demo_learning.py
# (thresholds measured with the demo's own flags) trains without it.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")

# How long a child has, after SIGUSR1, to print its threads' stacks before it is killed.
STACK_DUMP_GRACE_S = 10
# Installs what `python -m dense_diffusion.main` installs itself (main._dump_stacks_on_sigusr1),
# for the `python -c SCRIPT` children: SIGUSR1 prints every thread's stack on stderr.
DUMP_STACKS_PRELUDE = ("import faulthandler as _fh, signal as _sig, sys as _sys; "
                       "_fh.register(_sig.SIGUSR1, file=_sys.stderr, all_threads=True)\n")


def xla_flags(device_count: int | None = None) -> str:
  """XLA_FLAGS for a test subprocess: fast compilation, and `device_count` fake CPU devices."""
  if device_count is None:
    return FAST_COMPILE_XLA_FLAGS
  return f"{FAST_COMPILE_XLA_FLAGS} --xla_force_host_platform_device_count={device_count}"


def python_script(script: str) -> list[str]:
  """argv that runs `script` in this interpreter, dumping its stacks on SIGUSR1."""
  return [sys.executable, "-c", DUMP_STACKS_PRELUDE + script]


class StuckProcessError(AssertionError):
  """A child that did not finish in its timeout; the message holds its threads' stacks."""


def dump_stacks_and_kill(proc: subprocess.Popen) -> str:
  """SIGUSR1 (the child prints every thread's stack), a grace period, then SIGKILL; returns
  what the child printed on its pipes meanwhile ('' when they go to files)."""
  if proc.poll() is None:
    try:
      proc.send_signal(signal.SIGUSR1)
    except ProcessLookupError:
      pass
  deadline = time.time() + STACK_DUMP_GRACE_S
  while proc.poll() is None and time.time() < deadline:
    time.sleep(0.1)
  if proc.poll() is None:
    proc.kill()
  out, err = proc.communicate()
  return "".join(x if isinstance(x, str) else x.decode(errors="replace")
                 for x in (out, err) if x)


def stuck(args, timeout: float, output: str) -> StuckProcessError:
  command = " ".join(map(str, args))[:300]
  return StuckProcessError(
      f"timed out after {timeout:.0f}s: {command}\n--- its output, ending with every thread's "
      f"stack (SIGUSR1) ---\n{output[-20000:]}")


def run(args, *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
  """`subprocess.run(args, timeout=..., **kwargs)`, but a child still running at the timeout is
  first asked to print every thread's stack, and the test fails with that output.

  For `python -m dense_diffusion.main` (which installs the SIGUSR1 handler) and
  `python_script(...)` children; others are killed after the grace period.
  """
  kwargs.setdefault("text", True)
  if kwargs.pop("capture_output", False):
    kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  check = kwargs.pop("check", False)
  proc = subprocess.Popen(args, **kwargs)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    raise stuck(args, timeout, dump_stacks_and_kill(proc)) from None
  result = subprocess.CompletedProcess(args, proc.returncode, out, err)
  if check:
    result.check_returncode()
  return result


def wait(proc: subprocess.Popen, timeout: float, log=None) -> int:
  """`proc.wait(timeout)`, dumping the child's stacks before failing at the timeout. `log`: the
  file its output goes to, quoted in the failure."""
  try:
    return proc.wait(timeout)
  except subprocess.TimeoutExpired:
    output = dump_stacks_and_kill(proc)
    if log is not None:
      log.flush()
      with open(log.name, errors="replace") as f:
        output = f.read() + output
    raise stuck(proc.args, timeout, output) from None
