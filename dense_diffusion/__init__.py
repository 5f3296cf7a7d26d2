"""dense_diffusion: re-purposing text-to-image diffusion models for dense vision tasks (JAX/NNX)."""
import os

# TensorFlow is used for tf.data only: keep its C++ start-up chatter off the console (a user can
# still set these variables to see it).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def _keep_jax_off_absent_tpus() -> None:
  """With libtpu installed (the `[tpu-aot]` and `[test]` extras) on a machine without TPU chips,
  JAX would try to start a TPU runtime in every process: ~1.5 s and a page of errors on stderr
  before it falls back to the CPU. There the CPU is picked directly. A user's JAX_PLATFORMS
  wins; a machine with a CUDA plugin is left to JAX (it picks the GPU itself); `main compile`
  still describes TPU slices (libtpu is loaded for that, not as a backend)."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  if os.environ.get("JAX_PLATFORMS"):
    return
  # The launch scripts run the package with any python3 (standard library only): no JAX there.
  if importlib.util.find_spec("jax") is None:
    return
  if not (os.environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu")):
    return
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU chips (v4/v5e; v5p/v6e)
    return
  if any(importlib.util.find_spec(p) for p in ("jax_cuda12_plugin", "jax_cuda13_plugin")):
    return
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")


_keep_jax_off_absent_tpus()
