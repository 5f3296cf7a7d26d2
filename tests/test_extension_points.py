"""The two extension points, used the way a researcher would, with nothing else edited:

- a task registered here (paint the negative of the image) is trained, evaluated and predicted
  through the commands (`main train / eval / predict`) on synthetic_scenes;
- a paradigm registered here (one pass, L1 loss) is what the train step minimises, exactly;
- and, through the real model, unknown pixels of a training batch change neither the loss nor
  the gradient.
"""
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from configs import tiny
from dense_diffusion import experiment
from dense_diffusion import main as cli
from dense_diffusion import paradigms
from dense_diffusion import tasks
from dense_diffusion.datasets import readers
from dense_diffusion.tasks import outputs

REPO = pathlib.Path(__file__).resolve().parents[1]


# --- a new task: the model paints the negative of its input -----------------------------------


class NegativeEvaluator(tasks.Evaluator):
  """Mean absolute error of the recovered image; baseline: mid-grey everywhere."""

  def __init__(self, task):
    super().__init__(task)
    self.errors, self.baseline = [], []

  def update(self, answers, truths, inputs):
    for pred, gt in zip(answers, truths):
      gt = np.asarray(gt, np.float32) / 255.0
      self.errors.append(float(np.mean(np.abs(pred - gt))))
      self.baseline.append(float(np.mean(np.abs(0.5 - gt))))

  def result(self):
    return {"mae": float(np.mean(self.errors)), "baseline": {"mae": float(np.mean(self.baseline))}}


@dataclasses.dataclass(frozen=True)
class NegativeTask(tasks.Task):
  """The answer is the image itself (u8[H, W, 3]); the model paints its negative."""
  name: str = "negative"
  prompt: str = "Paint the negative of the image"

  label_key = "clean"
  synthetic_source = (("image", "clean"),)  # synthetic_scenes: the rendered image is the answer
  headline = "mae"
  higher_is_better = False

  def _encode(self, image):
    return 1.0 - np.asarray(image, np.float32) / 127.5  # the negative, in [-1, 1]

  def _decode_batch(self, rgb):
    return (1.0 - rgb) * 0.5  # the image in [0, 1]

  def evaluator(self):
    return NegativeEvaluator(self)

  def write(self, out, stem, image, answer):
    return [outputs.save_png(out / f"{stem}_negative.png", outputs.u8(1.0 - answer))]


@pytest.fixture
def negative_task():
  tasks.register("negative")(NegativeTask)
  yield
  tasks.base.TASKS.unregister("negative")


def _command(*argv: str) -> int:
  """`python -m dense_diffusion.main ARGV` in this process (where the toy task is registered)."""
  argv = ["main", *argv]
  old_argv = sys.argv
  sys.argv = argv  # ml_collections reads --config.* overrides from sys.argv
  try:
    return cli.main(cli.parse_flags(argv))
  finally:
    sys.argv = old_argv
    cli.FLAGS.unparse_flags()


def test_a_task_registered_here_trains_evaluates_and_predicts(negative_task, tmp_path,
                                                              monkeypatch, synthetic_data_dir):
  config_file = tmp_path / "negative.py"
  config_file.write_text(
      "from configs import tiny\n"
      "from dense_diffusion.datasets import readers\n\n\n"
      "def get_config(arg=None):\n"
      "  c = tiny.get_config(arg)\n"
      "  c.tasks = ('negative',)\n"
      "  c.input.entries = [readers.synthetic_scenes('negative', config='tiny32')]\n"
      f"  c.input.data_dir = {synthetic_data_dir!r}\n"
      "  c.total_steps = 4\n"
      "  return c\n")
  monkeypatch.chdir(REPO)  # `configs` imports from the repository root
  workdir = tmp_path / "run"
  assert _command("train", f"--config={config_file}", f"--workdir={workdir}") == 0
  history = json.loads((workdir / "eval_metrics.json").read_text())
  result = history["4"]["negative"]
  assert result["headline"] == "mae" and result["higher_is_better"] is False
  assert result["num_examples"] == 8 and 0.0 <= result["mae"] <= 1.0
  assert "mae" in result["baseline"]
  assert (workdir / "predictions" / "step_4.png").exists()
  # The saved config names the task and its entry; eval rebuilds the run from it.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["tasks"] == ["negative"] and saved["input"]["entries"][0]["task"] == "negative"
  (workdir / "eval_metrics.json").unlink()
  assert _command("eval", f"--workdir={workdir}") == 0
  again = json.loads((workdir / "eval_metrics.json").read_text())["4"]["negative"]
  assert again["mae"] == pytest.approx(result["mae"], abs=1e-6)
  # Predict on two images of other sizes: the task's own files, at the input's size.
  inputs = tmp_path / "inputs"
  inputs.mkdir()
  rng = np.random.default_rng(0)
  for name, (h, w) in {"a.png": (20, 30), "b.png": (40, 24)}.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(inputs / name)
  out = tmp_path / "out"
  assert _command("predict", f"--workdir={workdir}", "--task=negative", f"--input={inputs}",
                  f"--output={out}") == 0
  assert Image.open(out / "a_negative.png").size == (30, 20)
  assert Image.open(out / "b_negative.png").size == (24, 40)


# --- a new paradigm: one pass at t = 0 with an L1 loss ------------------------------------------


class OnePassL1(paradigms.Paradigm):
  """The network's output at t = 0 with the image as x_t, L1 to the target, times 3."""

  def training_batch(self, target, image, key):
    raise NotImplementedError  # its loss needs none

  def loss(self, model, batch, key):
    del key
    zeros = jnp.zeros((batch["image"].shape[0],), jnp.int32)
    pred = model(batch["image"], zeros, batch["image"], batch["task"])
    err = jnp.abs(pred - batch["target"]) * batch["valid"]
    return 3.0 * jnp.mean(err, axis=(1, 2, 3)), {}

  def predict(self, model, image, task, key):
    zeros = jnp.zeros((image.shape[0],), jnp.int32)
    return model(image, zeros, image, task)


@pytest.fixture
def one_pass_l1():
  paradigms.register("one_pass_l1")(OnePassL1)
  yield
  paradigms.PARADIGMS.unregister("one_pass_l1")


def _random_batch(config, seed=0):
  rng = np.random.default_rng(seed)
  b, r = int(config.batch_size), int(config.model.unet["sample_size"])
  return {"image": rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32),
          "target": rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32),
          "valid": rng.random((b, r, r, 1)) > 0.2,
          "task": rng.integers(0, len(config.tasks), (b,)).astype(np.int32)}


def test_the_train_step_minimises_a_registered_paradigms_loss(one_pass_l1):
  config = tiny.get_config()
  config.diffusion.mode = "one_pass_l1"
  config.task_loss_weights = {"semantic": 2.0}
  exp = experiment.Experiment(config)
  assert isinstance(exp.paradigm, OnePassL1)
  host = _random_batch(config)
  weights = jnp.take(jnp.asarray([1.0, 2.0, 1.0]), host["task"])

  def objective(params, batch):  # the registered paradigm's loss, weighted per task, averaged
    per_example, _ = OnePassL1(exp.diffusion, exp.schedule).loss(exp.model(params), batch, None)
    return jnp.mean(per_example * weights)

  # The reference computations are jitted too: run eagerly, each of their hundreds of small
  # ops would be compiled on its own (most of this test's time, once).
  @jax.jit
  def expected_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(objective)(params, batch)
    updates, _ = exp.tx.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates)

  @jax.jit
  def per_example_loss(params, batch):
    return OnePassL1(exp.diffusion, exp.schedule).loss(exp.model(params), batch, None)[0]

  with jax.set_mesh(exp.mesh):
    batch = exp.device_batch(host)
    # Two steps (the first one's learning rate is 0 at the start of the warm-up): each one's
    # loss is the paradigm's, and its update is the optimizer's on that loss's gradient.
    for _ in range(2):
      params0 = jax.tree.map(jnp.copy, exp.state.params)
      opt_state0 = jax.tree.map(jnp.copy, exp.state.opt_state)
      expected_loss, expected_params = expected_step(params0, opt_state0, batch)
      exp.state, metrics = exp.train_step(exp.state, exp.frozen, batch)
      np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-6)
      for got, want in zip(jax.tree.leaves(exp.state.params), jax.tree.leaves(expected_params)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(exp.state.params),
                                                            jax.tree.leaves(params0)))
    assert moved > 1e-6
    # Per-task losses are the paradigm's unweighted per-example losses, summed per task.
    per_example = per_example_loss(params0, batch)
  sums = np.bincount(host["task"], np.asarray(per_example), minlength=3)
  np.testing.assert_allclose(metrics["task_loss_sum"], sums, rtol=1e-5)


def test_unknown_pixels_change_neither_loss_nor_gradient_of_the_real_model():
  """The tiny generalist (UNet, image encoder, task tokens), the experiment's own loss: a batch
  whose unknown pixels hold garbage equals, in loss and gradient, one that holds the truth."""
  config = tiny.get_config()
  exp = experiment.Experiment(config)
  truth = _random_batch(config, seed=1)
  garbage = dict(truth)
  noise = np.random.default_rng(2).normal(0, 100, truth["target"].shape).astype(np.float32)
  garbage["target"] = np.where(truth["valid"], truth["target"], noise)
  key = jax.random.key(0)
  value_and_grad = jax.jit(jax.value_and_grad(exp.loss, has_aux=True))
  with jax.set_mesh(exp.mesh):
    (l_truth, _), g_truth = value_and_grad(exp.state.params, exp.frozen,
                                           exp.device_batch(truth), key)
    (l_garbage, _), g_garbage = value_and_grad(exp.state.params, exp.frozen,
                                               exp.device_batch(garbage), key)
    everything = dict(garbage, valid=np.ones_like(truth["valid"]))
    (l_counted, _), _ = value_and_grad(exp.state.params, exp.frozen,
                                       exp.device_batch(everything), key)
  assert float(l_truth) == float(l_garbage)
  for a, b in zip(jax.tree.leaves(g_truth), jax.tree.leaves(g_garbage)):
    np.testing.assert_array_equal(a, b)
  assert float(l_counted) > 100 * float(l_truth)  # counted, the garbage would dominate


def test_config_imports_register_extensions_for_every_command(tmp_path, monkeypatch):
  """A task in a module of the user's own, named in `config.imports`, is registered when the
  config is checked and again when a command reloads the run from its config.json."""
  (tmp_path / "my_extension.py").write_text(
      "import dataclasses\n"
      "from dense_diffusion import tasks\n"
      "from dense_diffusion.tasks import images\n\n\n"
      "@tasks.register('sharpen')\n"
      "@dataclasses.dataclass(frozen=True)\n"
      "class SharpenTask(images.ImageTask):\n"
      "  name: str = 'sharpen'\n"
      "  prompt: str = 'Perform sharpening'\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  config = tiny.get_config()
  config.imports = ("my_extension",)
  config.tasks = ("depth", "sharpen")
  config.input.entries = [readers.synthetic_scenes("depth", config="tiny32"),
                          dict(readers.synthetic_scenes("denoise", config="tiny32"),
                               task="sharpen", task_options={})]
  try:
    from dense_diffusion.experiment import config as config_lib
    config_lib.check(config)
    assert "sharpen" in tasks.names()
    experiment.save_config(config, tmp_path)
    tasks.base.TASKS.unregister("sharpen")
    sys.modules.pop("my_extension")
    loaded = experiment.load_config(tmp_path)
    assert [t.name for t in config_lib.task_objects(loaded)] == ["depth", "sharpen"]
    config.imports = ("no_such_extension",)
    with pytest.raises(FileNotFoundError, match="no_such_extension.*PYTHONPATH"):
      config_lib.check(config)
  finally:
    if "sharpen" in tasks.names():
      tasks.base.TASKS.unregister("sharpen")
    sys.modules.pop("my_extension", None)
