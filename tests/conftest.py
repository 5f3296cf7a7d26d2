"""Shared pytest set-up: quiet TensorFlow, keep TF off accelerators, locate ../shared/fixtures."""
import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_FIXTURES = REPO_ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> pathlib.Path:
  """Path of ../shared/fixtures; skips (with the reason) where the folder is absent."""
  if not SHARED_FIXTURES.is_dir():
    pytest.skip(f"shared fixtures not found at {SHARED_FIXTURES}")
  return SHARED_FIXTURES
