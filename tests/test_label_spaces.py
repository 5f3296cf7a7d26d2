"""One label space per dataset: in the flagship config (configs/generalist_pixel128.py) ADE20K's
150 classes and COCO panoptic's 133 are two tasks, each with its own prompt, classes and palette;
panoptic is answered from COCO's, evaluated and predicted on a run with the flagship's tasks."""
import json
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import generalist_pixel128
from configs import tiny
from dense_diffusion import checkpointing
from dense_diffusion import evaluate
from dense_diffusion import experiment
from dense_diffusion import main as cli
from dense_diffusion import tasks
from dense_diffusion.datasets import coco
from dense_diffusion.datasets import eval_tfds
from dense_diffusion.datasets import readers
from dense_diffusion.experiment import config as config_lib


def test_ade20k_and_coco_semantic_are_distinct_tasks_of_the_flagship():
  config = generalist_pixel128.get_config()
  trained = {t.name: t for t in config_lib.task_objects(config)}
  ade, coco_semantic = trained["semantic_ade20k"], trained["semantic_coco"]
  assert "semantic" not in trained
  assert ade.prompt == "semantic segmentation, ADE20K classes"
  assert coco_semantic.prompt == "semantic segmentation, COCO classes"
  assert (ade.num_classes, coco_semantic.num_classes) == (150, 133)
  assert not ade.categories
  assert [c["id"] for c in coco_semantic.categories] == [
      c["id"] for c in coco.panoptic_categories()]
  # Own palettes: class c of COCO is (all but by chance) not painted as ADE20K's class c.
  same = np.all(ade.palette[1:134] == coco_semantic.palette[1:], axis=1)
  assert same.sum() <= 2, np.flatnonzero(same)
  assert len({tuple(c) for c in coco_semantic.palette}) == 134  # 133 classes + black, distinct
  labels = np.random.default_rng(0).integers(0, 133, (12, 12))
  np.testing.assert_array_equal(coco_semantic.decode(coco_semantic.encode(labels)), labels)
  tasks_of = {}
  for entry in config.input.entries:
    tasks_of.setdefault(entry["dataset"], []).append(entry["task"])
  assert tasks_of["ade20k"] == ["semantic_ade20k"]
  assert tasks_of["coco/2017_panoptic"] == ["semantic_coco", "instance"]
  panoptic = config_lib.available_tasks(config)["panoptic"]
  assert panoptic.part_names() == {"semantic": "semantic_coco", "instance": "instance"}
  np.testing.assert_array_equal(panoptic.semantic.palette, coco_semantic.palette)
  # The panoptic protocol reads COCO's entry, not ADE20K's (the first semantic one).
  assert eval_tfds.pick_entry(config.input.entries, "panoptic", "flagship")["dataset"] == (
      "coco/2017_panoptic")
  assert tasks.family("semantic_coco") == tasks.family("semantic_ade20k") == "semantic"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data = tmp_path_factory.mktemp("tfds")
  tfds.builder("synthetic_scenes/tiny32", data_dir=str(data)).download_and_prepare()
  return data


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
  """A run with the flagship's tasks and task options (each entry of its mixture read from
  synthetic_scenes instead of its real dataset), a tiny UNet, a checkpoint of its first state:
  prediction and evaluation only read the saved state."""
  workdir = tmp_path_factory.mktemp("flagship_shaped")
  config = tiny.get_config()
  config.tasks = generalist_pixel128.TASKS
  config.input.entries = [
      readers.synthetic_scenes(e["task"], config="tiny32", task_options=dict(e["task_options"]))
      for e in generalist_pixel128.mixture(32)]
  config.input.data_dir = str(data_dir)
  config.batch_size = 2
  config.eval.batch_size = 2
  config.eval.max_examples = 2
  config.diffusion.num_inference_steps = 1
  experiment.save_config(config, workdir)
  exp = experiment.Experiment(config)
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  with jax.set_mesh(exp.mesh):
    assert checkpointer.maybe_save(1, exp.state, force=True)
  checkpointer.close()
  return workdir


def test_predict_panoptic_on_a_flagship_shaped_run(run_dir, tmp_path):
  image = tmp_path / "in" / "photo.png"
  image.parent.mkdir()
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 28, 3), np.uint8)).save(image)
  argv = cli.FLAGS(["main", "predict", f"--workdir={run_dir}", "--task=panoptic",
                    f"--input={image.parent}", f"--output={tmp_path / 'out'}"])
  try:
    assert cli.main(argv) == 0
  finally:
    cli.FLAGS.unparse_flags()
  record = json.loads((tmp_path / "out" / "photo_panoptic.json").read_text())
  assert (record["height"], record["width"]) == (20, 28)
  assert len(record["categories"]) == 133  # COCO's categories, from semantic_coco.
  assert pathlib.Path(tmp_path / "out" / "photo_panoptic.png").is_file()


def test_evaluation_reports_each_label_space_and_panoptic(run_dir):
  config = experiment.load_config(str(run_dir))
  exp = experiment.Experiment(config)
  step, state = exp.restore_latest(str(run_dir), async_save=False)
  with jax.set_mesh(exp.mesh):
    results = evaluate.Evaluator(config, exp, run_dir).run(state, step)
  assert set(results) == set(generalist_pixel128.TASKS) | {"panoptic"}
  assert results["semantic_ade20k"]["num_examples"] == results["semantic_coco"][
      "num_examples"] == results["panoptic"]["num_examples"] == 2
  assert results["panoptic"]["headline"] == "pq"
