"""Shared pytest set-up: quiet TensorFlow, keep TF off accelerators, fast XLA:CPU compilation and
one compilation cache for the session, locate ../shared/fixtures."""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import atexit
import shutil
import tempfile

import pytest

from subprocess_env import FAST_COMPILE_XLA_FLAGS

# Before anything imports JAX (JAX reads these when it is imported); a caller's own settings win.
os.environ.setdefault("XLA_FLAGS", FAST_COMPILE_XLA_FLAGS)
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # One persistent compilation cache for the whole session, shared by the pytest process, its
  # xdist workers (started after this runs, so they inherit it) and every subprocess a test
  # starts: the same tiny models are compiled by many tests in many processes. A fresh folder
  # per session, removed at exit by the process that made it.
  _cache_dir = tempfile.mkdtemp(prefix="dense_diffusion_tests_jax_cache_")
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache_dir,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> pathlib.Path:
  """Path of ../shared/fixtures; skips (with the reason) where the folder is absent."""
  if not SHARED_FIXTURES.is_dir():
    pytest.skip(f"shared fixtures not found at {SHARED_FIXTURES}")
  return SHARED_FIXTURES
