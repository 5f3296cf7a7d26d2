"""Orbax checkpoints of the train state: periodic async saves, keep the last K, resume with
fallback past a damaged latest checkpoint."""
from __future__ import annotations

import os
from typing import Any, Optional

from absl import logging
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores one pytree (the train state) under `<workdir>/checkpoints/<step>`.

  Args:
    directory: where step folders go: a local path (made absolute) or a gs:// URI, as a string
      or an `etils.epath.Path` (not a `pathlib.Path` of a URI, which has lost its `//`).
    max_to_keep: how many of the newest checkpoints to keep.
    save_interval_steps: `maybe_save` saves when step % this == 0 (and `force` always).
    async_save: write in a background thread while training goes on.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               save_interval_steps: int = 1000, async_save: bool = True):
    directory = os.fspath(directory)
    self.directory = directory
    self._manager = ocp.CheckpointManager(
        os.path.abspath(directory) if "://" not in directory else directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            enable_async_checkpointing=async_save, create=True))

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves when the interval says so (or `force`); returns whether a save started."""
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=force)

  def wait(self) -> None:
    """Blocks until an asynchronous save has been committed."""
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any, *, delete_unreadable: bool = False
                     ) -> tuple[Optional[int], Any]:
    """Restores the newest readable checkpoint into the shapes/shardings of `abstract_state`.

    A checkpoint that fails to restore (half-written, truncated files) is skipped with a
    warning, and the previous one is tried; with `delete_unreadable` (a run that resumes and will
    write those steps again) the unreadable newer ones are then deleted. Returns (step, state), or (None, None) when there is
    no checkpoint at all. Raises when checkpoints exist but none is readable.
    """
    steps = self.steps()
    if not steps:
      return None, None
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    errors = []
    for step in reversed(steps):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the previous "
                        "one", step, self.directory, type(e).__name__, str(e)[:300])
        print(f"WARNING: checkpoint {step} is unreadable ({type(e).__name__}); falling back")
        errors.append((step, e))
        continue
      for bad, _ in (errors if delete_unreadable else []):
        # Newer than the resumed step, so the run writes that step again; left in place, the
        # damaged folder would block that save and hold one of the `max_to_keep` slots.
        logging.warning("deleting the unreadable checkpoint at step %d", bad)
        self._manager.delete(bad)
      return step, state
    raise RuntimeError(
        f"none of the checkpoints {steps} in {self.directory} could be restored; last error: "
        f"{errors[-1][1]!r}. Move the folder away to start from scratch.")

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
