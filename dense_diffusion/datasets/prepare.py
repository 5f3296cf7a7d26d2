"""Makes sure a run's datasets are prepared before training or evaluation reads them.

Self-contained datasets (generated here, no download or manual folder) are prepared on first
use; for the others, a missing dataset is a one-line error that says where data/README.md tells
how to get it.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from typing import Any, Iterable

from absl import logging

from dense_diffusion import errors

# Builders that generate their data with no download or manual folder: prepared on first use.
SELF_CONTAINED_DATASETS = ("synthetic_scenes",)
PREPARE_TIMEOUT_S = 4 * 3600  # how long processes > 0 wait for process 0 to prepare the data.
_PREPARE_CALLS = itertools.count()


def ensure_prepared(entries: Iterable[Any], data_dir: str | None) -> None:
  """Prepares self-contained datasets that are missing; says how to get the others.

  With several processes (`jax.distributed`), process 0 prepares first while the others wait:
  two processes preparing into one shared data_dir would race on TFDS's final rename. Then any
  process that still misses the data (its data_dir is a disk of its own host) prepares its own
  copy. Call it before anything starts the XLA backend.

  Raises:
    MissingError: a dataset that is not prepared and cannot be generated here.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import dense_diffusion.datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  # An entry's own data_dir wins over the run's (a pseudo-labelled set made elsewhere).
  wanted = sorted({(e["dataset"], e.get("data_dir") or data_dir or "") for e in entries})

  def prepare_missing():
    for name, where in wanted:
      try:
        with _quiet():  # TFDS warns about the missing files that is_prepared() looks for
          builder = tfds.builder(name, data_dir=where or None)
          prepared = builder.is_prepared()
      except tfds.core.registered.DatasetNotFoundError as e:
        raise errors.MissingError(f"dataset {name!r} is not a TFDS dataset known here "
                                  f"({str(e).splitlines()[0]})") from None
      if prepared:
        continue
      if name.split("/")[0] not in SELF_CONTAINED_DATASETS:
        raise errors.MissingError(
            f"dataset {name} is not prepared in {builder.data_dir}; data/README.md says where "
            "to get it and the command that prepares it (data/prepare.py), or set "
            "config.input.data_dir to where it is")
      print(f"preparing {name} in {builder.data_dir} (one time)...", flush=True)
      start = time.time()
      builder.download_and_prepare()
      print(f"prepared {name} in {time.time() - start:.0f}s", flush=True)

  client, process_id = _distributed_client()
  if client is None:
    prepare_missing()
    return
  try:
    if process_id == 0:
      prepare_missing()
  finally:  # also when process 0 failed: the others then try, and fail with their own message.
    # A barrier id serves once: number the calls (every process makes the same ones).
    client.wait_at_barrier(f"dense_diffusion_ensure_prepared_{next(_PREPARE_CALLS)}",
                           PREPARE_TIMEOUT_S * 1000)
  if process_id != 0:
    prepare_missing()


@contextlib.contextmanager
def _quiet():
  """absl logging at ERROR for the block (TFDS logs through absl)."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)


def _distributed_client():
  """(JAX's coordination-service client, this process's id), or (None, 0) in one process.

  Read from JAX's internal state because `jax.process_index()` and `multihost_utils` start the
  XLA backend, which `ensure_prepared` leaves until the data is ready.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  state = distributed.global_state
  if state.client is None or (state.num_processes or 1) <= 1:
    return None, 0
  return state.client, int(state.process_id)
