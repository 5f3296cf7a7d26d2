"""Where a run's files go inside its workdir, a local folder or a bucket (`gs://...`).

Every path is an `etils.epath.Path`: `pathlib.Path("gs://b/run")` collapses the double slash
into `gs:/b/run`, which every library then takes for a local relative folder, while epath keeps
the scheme and reads and writes through `tf.io.gfile` (GCS included) or the local disk. Hand
these paths to orbax, clu and `tf.train.Checkpoint` as `os.fspath(path)`; open files with
`path.open(...)` rather than passing the path to a library that may only open local files.
"""
from __future__ import annotations

import os

from etils import epath

CONFIG_FILE = "config.json"  # the config a run was started with.
METRICS_FILE = "eval_metrics.json"  # {step: {task: {metric: value}}}, every evaluation.


class WorkdirPaths:
  """The files and folders of one run.

    <workdir>/config.json, eval_metrics.json, events.out.tfevents.* (TensorBoard)
    <workdir>/checkpoints/<step>/ (orbax), checkpoints/data/step_<S>_process_<P>.* (tf.data)
    <workdir>/predictions/step_<S>.png

  Args:
    workdir: a local path (relative ones stay relative) or a `gs://` URI.
  """

  def __init__(self, workdir: str | os.PathLike):
    self.root = epath.Path(workdir)

  @property
  def config(self) -> epath.Path:
    return self.root / CONFIG_FILE

  @property
  def metrics(self) -> epath.Path:
    return self.root / METRICS_FILE

  @property
  def checkpoints(self) -> epath.Path:
    return self.root / "checkpoints"

  @property
  def data_checkpoints(self) -> epath.Path:
    """The data-iterator states of every process, beside the orbax step folders."""
    return self.checkpoints / "data"

  def data_checkpoint(self, step: int, process_index: int) -> epath.Path:
    """A `tf.train.Checkpoint` prefix: TF writes `<prefix>.index` and `<prefix>.data-*`."""
    return self.data_checkpoints / f"step_{step}_process_{process_index}"

  @property
  def predictions(self) -> epath.Path:
    return self.root / "predictions"

  def prediction(self, step: int) -> epath.Path:
    """The evaluation picture (inputs, truth, predictions per task) at `step`."""
    return self.predictions / f"step_{step}.png"
