"""`config.task_loss_weights`: each task's loss multiplier in the training objective."""
import jax
import ml_collections
import numpy as np
import pytest

from configs import tiny
from dense_diffusion import experiment
from dense_diffusion.experiment import config as config_lib


def _config(weights=None):
  config = tiny.get_config()
  config.mesh = dict(data=1, fsdp=1, tensor=1)
  if weights is not None:
    config.task_loss_weights = weights
  return config


def test_defaults_and_errors():
  names = list(tiny.TASKS)
  np.testing.assert_array_equal(config_lib.task_loss_weights(_config(), names), np.ones(len(names)))
  got = config_lib.task_loss_weights(_config({names[1]: 4.0}), names)
  np.testing.assert_array_equal(got, [4.0 if i == 1 else 1.0 for i in range(len(names))])
  with pytest.raises(ValueError, match=r"\['sparkle'\] that are not in config.tasks"):
    config_lib.task_loss_weights(_config({"sparkle": 2.0}), names)
  with pytest.raises(ValueError, match="finite and >= 0"):
    config_lib.task_loss_weights(_config({names[0]: -1.0}), names)


def test_objective_weights_each_example_by_its_task():
  """Same parameters, batch and noise: per-task sums (logged unweighted) are unchanged, and the
  objective is mean(per-example loss x weight of its task)."""
  names = list(tiny.TASKS)
  exp = experiment.Experiment(_config(ml_collections.ConfigDict({names[0]: 3.0, names[2]: 0.5})))
  res = int(exp.config.model.unet["sample_size"])
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, res, res, 3)).astype(np.float32),
           "target": rng.uniform(-1, 1, (8, res, res, 3)).astype(np.float32),
           "valid": np.ones((8, res, res, 1), bool),
           "task": np.array([0, 0, 1, 2, 2, 2, 1, 0], np.int32)}
  key = jax.random.key(7)
  loss_fn = jax.jit(exp.loss)
  weighted, (task_sum, task_count) = loss_fn(exp.state.params, exp.frozen, batch, key)
  unweighted = float(np.sum(task_sum) / 8)
  np.testing.assert_array_equal(task_count, [3, 2, 3])
  expected = float(np.sum(np.asarray(task_sum) * np.array([3.0, 1.0, 0.5])) / 8)
  np.testing.assert_allclose(float(weighted), expected, rtol=1e-5)
  assert abs(float(weighted) - unweighted) > 1e-3 * unweighted
