"""Settings the test suite shares with the processes it starts (training runs, notebook kernels).

Not a test module: conftest.py and the tests that start subprocesses import it.
"""
# XLA:CPU without its LLVM optimisation passes compiles 2-3x faster, and compiling the tiny
# models' initialisers, train steps and samplers is most of what the suite does; the few steps
# each test runs execute a little slower, which costs far less. Same ops, so the parity
# tolerances hold; only the float rounding differs, which is why tests/test_demo_learning.py
# (thresholds measured with the demo's own flags) trains without it.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")


def xla_flags(device_count: int | None = None) -> str:
  """XLA_FLAGS for a test subprocess: fast compilation, and `device_count` fake CPU devices."""
  if device_count is None:
    return FAST_COMPILE_XLA_FLAGS
  return f"{FAST_COMPILE_XLA_FLAGS} --xla_force_host_platform_device_count={device_count}"
