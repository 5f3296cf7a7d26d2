"""Shared pytest set-up: a hermetic session, quiet TensorFlow, fast XLA:CPU compilation, one
compilation cache and one prepared `synthetic_scenes` for the session, ../shared/fixtures.

Hermetic: before anything imports TensorFlow, TFDS or JAX, every default location a test or a
process it starts could read or write (the home folder, TFDS's data_dir, the XDG / matplotlib /
Hugging Face / torch caches, JAX's compilation cache) is a folder of this session, made here by
the pytest process and inherited by its xdist workers and every subprocess. So no test reads
what an earlier run left behind (a `~/tensorflow_datasets` that `main demo` once prepared), and
the session ends by checking that no test wrote into the repository.
"""
import atexit
import contextlib
import fcntl
import os
import pathlib
import shutil
import subprocess
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest

from subprocess_env import FAST_COMPILE_XLA_FLAGS

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"
# Set by the first process of the session (pytest's own); its xdist workers and the processes
# tests start find it in their environment and use the same folders.
_SESSION_ENV = "DENSE_DIFFUSION_TEST_SESSION"


def _hermetic_session() -> pathlib.Path:
  root = os.environ.get(_SESSION_ENV)
  if root:
    return pathlib.Path(root)
  root = pathlib.Path(tempfile.mkdtemp(prefix="dense_diffusion_tests_"))
  atexit.register(shutil.rmtree, root, ignore_errors=True)  # by the process that made it
  home = root / "home"
  folders = {
      "HOME": home,
      "TFDS_DATA_DIR": root / "tensorflow_datasets",  # TFDS reads it when it is imported
      "XDG_CACHE_HOME": home / ".cache",
      "XDG_CONFIG_HOME": home / ".config",
      "XDG_DATA_HOME": home / ".local" / "share",
      "MPLCONFIGDIR": home / ".config" / "matplotlib",
      "HF_HOME": home / ".cache" / "huggingface",
      "TORCH_HOME": home / ".cache" / "torch",
      # One persistent compilation cache for the whole session, shared by every process: the
      # same tiny models are compiled by many tests in many processes.
      "JAX_COMPILATION_CACHE_DIR": root / "jax_cache",
  }
  for name, folder in folders.items():
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[name] = str(folder)
  os.environ.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  os.environ[_SESSION_ENV] = str(root)
  return root


SESSION_ROOT = _hermetic_session()
# Before anything imports JAX (JAX reads these when it is imported); a caller's own settings win.
os.environ.setdefault("XLA_FLAGS", FAST_COMPILE_XLA_FLAGS)


@contextlib.contextmanager
def _session_lock(name: str):
  """An exclusive lock shared by every process of the session (xdist workers included)."""
  with open(SESSION_ROOT / f"{name}.lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare_synthetic(config: str) -> str:
  """`synthetic_scenes/<config>` prepared in the session's TFDS data_dir (once per session, by
  whichever process asks first; the others wait); returns that data_dir."""
  data_dir = os.environ["TFDS_DATA_DIR"]
  with _session_lock(f"synthetic_scenes_{config}"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import dense_diffusion.datasets  # noqa: F401  pylint: disable=g-import-not-at-top
    builder = tfds.builder(f"synthetic_scenes/{config}", data_dir=data_dir)
    if not builder.is_prepared():
      builder.download_and_prepare()
  return data_dir


@pytest.fixture(scope="session")
def synthetic_data_dir() -> str:
  """The session's TFDS data_dir, with synthetic_scenes/tiny32 (16 + 8 examples) prepared."""
  return prepare_synthetic("tiny32")


@pytest.fixture(scope="session")
def synthetic_res32_data_dir(synthetic_data_dir) -> str:
  """The same data_dir with synthetic_scenes/res32 (512 + 64 examples, the demo's) prepared as
  well: once per session instead of once per test that trains the demo's configs."""
  return prepare_synthetic("res32")


@pytest.fixture(scope="session")
def shared_fixtures() -> pathlib.Path:
  """Path of ../shared/fixtures (the repository's checkout has ../shared beside it)."""
  if not SHARED_FIXTURES.is_dir():
    pytest.fail(f"shared fixtures not found at {SHARED_FIXTURES}: clone the repository beside "
                "../shared (the tests read its fixtures)", pytrace=False)
  return SHARED_FIXTURES


# ------------------------------------------------------------------------------------------------
# Longest files first. The files run in parallel, one file per worker at a time (pytest.ini:
# --dist loadfile --no-loadscope-reorder, so in the order collected here); a file whose module
# fixture trains or compiles for minutes that starts last leaves the other worker idle at the
# end. These start first, longest first (docs/testing.md has the measured table); the rest keep
# their alphabetical order.
HEAVY_FILES_FIRST = (
    "test_multihost.py", "test_demo_learning.py", "test_vpd_learning.py",
    "test_train_multidevice.py", "test_train.py", "test_matting_learning.py",
    "test_pseudo_label.py", "test_notebook.py", "test_no_tensorflow.py", "test_compile.py",
)


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable sort


# ------------------------------------------------------------------------------------------------
# No test writes into the repository: the session compares its new files (`git status`) before
# and after.

_IGNORED_CHANGES = ("__pycache__", ".pytest_cache", ".venv/", ".egg-info")


def _repo_files() -> set[str] | None:
  try:
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
  except (OSError, subprocess.TimeoutExpired):
    return None
  if out.returncode:
    return None  # not a git checkout (an unpacked archive): nothing to compare
  # New files only (untracked "??" or ignored "!!"): edits to tracked files are a developer's.
  return {line[3:] for line in out.stdout.splitlines()
          if line[:2] in ("??", "!!") and not any(part in line for part in _IGNORED_CHANGES)}


def pytest_sessionstart(session):
  if not hasattr(session.config, "workerinput"):  # the controller, not an xdist worker
    session.config._dd_repo_files = _repo_files()


def pytest_sessionfinish(session, exitstatus):
  before = getattr(session.config, "_dd_repo_files", None)
  if before is None:
    return
  after = _repo_files() or set()
  written = sorted(after - before)
  if written:
    session.config._dd_written = written
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
  written = getattr(terminalreporter.config, "_dd_written", None)
  if written:
    terminalreporter.write_line(
        "FAILED: tests wrote into the repository (they must write under tmp_path): "
        + ", ".join(written[:20]), red=True)
