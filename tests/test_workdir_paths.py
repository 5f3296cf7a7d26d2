"""Workdirs on a remote file system (gs:// on TPU pods) keep their scheme through train, eval and
predict.

There is no GCS here, so the end-to-end test stands TensorFlow's in-memory `ram://` file system
in for it: like gs://, it is a URI that only `tf.io.gfile` (and so epath, clu's TensorBoard
writer and `tf.train.Checkpoint`) can reach, and a path that lost its `//` to `pathlib` lands
in a local folder `ram:/...` instead, which the test looks for. Orbax cannot write there
(TensorStore has no `ram://` driver), so its checkpoints go to a local folder, and the test
checks the directory it was asked for.
"""
import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image
import tensorflow as tf

from configs import tiny
from dense_diffusion import checkpointing
from dense_diffusion import evaluate
from dense_diffusion import predict
from dense_diffusion import train
from dense_diffusion import workdir as workdir_lib


def test_paths_under_a_gs_workdir_keep_the_scheme():
  paths = workdir_lib.WorkdirPaths("gs://bucket/runs/demo")
  got = [paths.root, paths.config, paths.metrics, paths.checkpoints, paths.data_checkpoints,
         paths.data_checkpoint(40, 3), paths.predictions, paths.prediction(40)]
  assert [os.fspath(p) for p in got] == [
      "gs://bucket/runs/demo",
      "gs://bucket/runs/demo/config.json",
      "gs://bucket/runs/demo/eval_metrics.json",
      "gs://bucket/runs/demo/checkpoints",
      "gs://bucket/runs/demo/checkpoints/data",
      "gs://bucket/runs/demo/checkpoints/data/step_40_process_3",
      "gs://bucket/runs/demo/predictions",
      "gs://bucket/runs/demo/predictions/step_40.png",
  ]
  assert str(paths.metrics.parent / "predictions") == "gs://bucket/runs/demo/predictions"


@pytest.mark.parametrize("workdir", ["runs/demo", "/abs/runs/demo", "./runs/demo"])
def test_local_paths_are_what_pathlib_made(workdir):
  paths = workdir_lib.WorkdirPaths(workdir)
  old = pathlib.Path(workdir)
  assert os.fspath(paths.root) == str(old)  # relative workdirs stay relative
  assert os.fspath(paths.checkpoints) == str(old / "checkpoints")
  assert os.fspath(paths.data_checkpoint(2, 0)) == str(old / "checkpoints/data/step_2_process_0")
  assert os.fspath(paths.config) == str(old / "config.json")
  assert os.fspath(paths.metrics) == str(old / evaluate.METRICS_FILE)
  assert os.fspath(paths.prediction(2)) == str(old / "predictions/step_2.png")


@pytest.fixture
def ram_scheme(monkeypatch):
  """Makes etils.epath treat `ram://` like `gs://`: a URI read and written with tf.io.gfile.

  epath has no public hook for a URI scheme of TensorFlow's; these are the tables its gs:// /
  s3:// support is built from (etils 1.x), restored after the test.
  """
  from etils import epath
  from etils.epath import backend
  from etils.epath import gpath
  from etils.epath import register

  class RamBackend(type(backend.tf_backend)):
    """tf.io.gfile, except that mode "w" replaces the file, as on GCS and disks: TensorFlow's
    RAM file system appends to it (rewriting config.json on resume would corrupt it)."""

    def open(self, path, mode):
      if "w" in mode and self.gfile.exists(path):
        self.gfile.remove(path)
      return super().open(path, mode)

  ram_backend = RamBackend()

  class RamPath(gpath.PosixGPath):

    @property
    def _backend(self):
      return ram_backend

  monkeypatch.setattr(gpath, "_URI_PREFIXES", tuple(gpath._URI_PREFIXES) + ("ram://",))
  monkeypatch.setattr(gpath, "_URI_SCHEMES", frozenset(gpath._URI_SCHEMES) | {"ram"})
  monkeypatch.setitem(gpath._URI_MAP_ROOT, "ram://", "/ram/")
  monkeypatch.setitem(register._URI_PREFIXES_TO_CLS, "ram://", RamPath)
  probe = epath.Path("ram://probe") / "x"
  assert os.fspath(probe) == "ram://probe/x" and isinstance(probe, RamPath), "epath changed"
  probe.write_text("longer text")
  probe.write_text("short")
  assert probe.read_text() == "short"


@pytest.mark.slow  # ~4 minutes on 2 CPU cores: a train step compiles, 3 evaluations, predict
def test_train_eval_predict_on_a_remote_workdir(ram_scheme, tmp_path, monkeypatch, capsys):
  bucket = f"ram://{tmp_path.name}"  # the RAM file system lives as long as the process
  workdir = f"{bucket}/run"
  # A path that lost its `//` would be relative: it would land in tmp_path/"ram:".
  monkeypatch.chdir(tmp_path)
  asked = []
  local_checkpointer = checkpointing.Checkpointer

  def checkpointer(directory, **kwargs):
    asked.append(os.fspath(directory))
    return local_checkpointer(str(tmp_path / "orbax"), **kwargs)

  monkeypatch.setattr(checkpointing, "Checkpointer", checkpointer)

  config = tiny.get_config()
  config.input.data_dir = str(tmp_path / "tfds")
  config.total_steps = 2
  config.checkpoint_every = 2
  config.log_every = 1
  config.eval.batch_size = 8
  config.eval.max_examples = 8
  config.diffusion.num_inference_steps = 1
  results = train.train_and_evaluate(config, workdir)

  gfile = tf.io.gfile
  listing = sorted(os.path.relpath(os.path.join(d, f), workdir)
                   for d, _, files in gfile.walk(workdir) for f in files)
  assert "config.json" in listing, listing
  assert any(f.startswith("events.out.tfevents.") for f in listing), listing
  assert "checkpoints/data/step_2_process_0.index" in listing, listing
  with gfile.GFile(f"{workdir}/{evaluate.METRICS_FILE}") as f:
    history = json.load(f)
  assert set(history) == {"2"} and set(history["2"]) == set(config.tasks), history
  with gfile.GFile(f"{workdir}/predictions/step_2.png", "rb") as f:
    picture = f.read()
  assert picture.startswith(b"\x89PNG") and len(picture) > 1000
  assert asked == [f"{workdir}/checkpoints"]
  assert not (tmp_path / "ram:").exists(), sorted(tmp_path.glob("ram:/**/*"))

  # A resumed run finds the data-iterator state of step 2 in the workdir and reads it back.
  capsys.readouterr()
  train.train_and_evaluate(config, workdir)
  log = capsys.readouterr().out
  assert "resumed from the checkpoint at step 2" in log, log[-3000:]
  assert "no data-iterator state" not in log, log[-3000:]

  # eval reads the run's config.json from the workdir and appends to its eval_metrics.json.
  again = evaluate.evaluate_latest(None, workdir)
  assert asked[-1] == f"{workdir}/checkpoints"
  for task in config.tasks:
    key = results[task]["headline"]
    assert again[task]["headline"] == key, task
    assert again[task][key] == pytest.approx(results[task][key], rel=1e-4), task

  # predict: the run restored from the workdir, outputs written to another remote folder.
  Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(tmp_path / "photo.png")
  summary = predict.Predictor(workdir).run(
      "depth", [tmp_path / "photo.png"], f"{bucket}/out", log=lambda s: None)
  assert summary.written == 1 and not summary.failed
  assert sorted(gfile.listdir(f"{bucket}/out")) == ["photo_depth.png", "photo_depth_color.png"]
  with gfile.GFile(f"{bucket}/out/photo_depth.png", "rb") as f:
    depth = Image.open(f)
    depth.load()
  assert depth.size == (30, 20) and depth.mode.startswith("I")
  assert asked[-1] == f"{workdir}/checkpoints"
  assert not (tmp_path / "ram:").exists()
