"""Paradigms: registry and config errors, training batches, inference with oracle networks, the
masked loss (unknown pixels never matter), and a toy paradigm registered here whose own loss is
exactly what the train step minimises."""
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_diffusion import errors
from dense_diffusion import paradigms
from dense_diffusion.diffusion import objectives, samplers, schedules


@pytest.fixture(scope="module")
def sd():
  return schedules.make("scaled_linear", 1000, 0.00085, 0.012)


@pytest.fixture(scope="module")
def target():
  return jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)


def _make(sd, **kw):
  return paradigms.make(paradigms.make_config(**kw), sd)


def test_registry_and_config_errors():
  assert set(paradigms.PARADIGMS.names()) >= {"generalist", "onestep", "dmp"}
  with pytest.raises(errors.UnknownNameError, match="unknown paradigm 'latent'.*generalist"):
    paradigms.get("latent")
  with pytest.raises(errors.UnknownNameError, match="unknown paradigm 'latent'"):
    paradigms.make_config(mode="latent")
  cases = [({"mode": "dmp", "steps": 5}, "unknown config.diffusion keys"),
           ({"mode": "dmp", "prediction_type": "epsilon"}, "v_prediction"),
           ({"mode": "onestep", "prediction_type": "sample", "ensemble_size": 3},
            "ensemble_size"),
           ({"mode": "generalist", "sampler": "euler"}, "sampler"),
           ({"mode": "generalist", "train_timesteps": "late"}, "train_timesteps"),
           ({"mode": "generalist", "prediction_type": "noise"}, "prediction_type")]
  for cfg, message in cases:
    with pytest.raises(errors.ConfigError, match=message):
      paradigms.make_config(cfg)
  for cfg, message in [({"prev_rule": "previous"}, "prev-timestep rule"),
                       ({"weighting": "snr"}, "loss weighting"),
                       ({"ensemble": "median"}, "ensemble kind")]:
    with pytest.raises(errors.UnknownNameError, match=message):
      paradigms.make_config(cfg)
  with pytest.raises(errors.ConfigError, match="outside 0..999"):
    _make(schedules.make("scaled_linear", 1000, 0.00085, 0.012), mode="onestep",
          prediction_type="sample", timestep=1000)


@pytest.mark.parametrize("name,kw", [
    ("generalist", dict(prediction_type="sample")),
    ("dmp", dict(prediction_type="v_prediction")),
])
@pytest.mark.parametrize("steps,spacing", [(2, "trailing"), (5, "leading")])
def test_training_at_the_inference_timesteps(sd, name, kw, steps, spacing):
  paradigm = _make(sd, mode=name, num_inference_steps=steps, timestep_spacing=spacing,
                   train_timesteps="inference", **kw)
  target = jnp.zeros((512, 2, 2, 3), jnp.float32)
  batch = paradigm.training_batch(target, target, jax.random.PRNGKey(3))
  inference = samplers.ddim_timesteps(sd.num_train_timesteps, steps, spacing)
  drawn, counts = np.unique(np.asarray(batch.t), return_counts=True)
  np.testing.assert_array_equal(drawn, np.sort(np.asarray(inference)))
  assert counts.min() > 512 / steps / 2, counts  # every sampler step is trained, about evenly
  uniform = _make(sd, mode=name, **kw).training_batch(target, target, jax.random.PRNGKey(3))
  assert len(np.unique(np.asarray(uniform.t))) > 100


def _batch(target, image, valid=None):
  return {"image": image, "target": target, "task": jnp.zeros((target.shape[0],), jnp.int32),
          **({} if valid is None else {"valid": valid})}


@pytest.mark.parametrize("name,kw", [
    ("generalist", dict(prediction_type="epsilon", weighting="min_snr")),
    ("generalist", dict(prediction_type="v_prediction")),
    ("onestep", dict(prediction_type="v_prediction")),
    ("onestep", dict(prediction_type="sample")),
    ("dmp", dict(prediction_type="v_prediction", weighting="min_snr")),
])
def test_training_batch_and_loss(sd, target, name, kw):
  paradigm = _make(sd, mode=name, **kw)
  image = jnp.asarray(np.random.default_rng(12).uniform(-1, 1, target.shape), jnp.float32)
  key = jax.random.PRNGKey(1)
  tb = paradigm.training_batch(target, image, key)
  assert tb.x_t.shape == target.shape and tb.t.shape == (2,)
  assert tb.t.dtype == jnp.int32 and tb.weight.shape == (2,)
  # The regression target implies the clean answer: x0 of (x_t, target) is the answer.
  if name == "onestep":
    x0 = objectives.onestep_x0(sd, tb.target, image, tb.t, paradigm.cfg.prediction_type)
    np.testing.assert_array_equal(tb.x_t, image)
    np.testing.assert_array_equal(tb.t, 999)
  else:
    pt = "v_prediction" if name == "dmp" else paradigm.cfg.prediction_type
    x0 = objectives.pred_to_x0_eps(sd, tb.target, tb.x_t, tb.t, pt)[0]
  np.testing.assert_allclose(x0, target, atol=2e-4)
  if name == "dmp":
    np.testing.assert_allclose(tb.x_t, objectives.dmp_forward(sd, target, image, tb.t), atol=1e-6)
  # The loss is the MSE of the network's output against that target, per example, weighted:
  # 0 for a network that outputs it, 0.01 * weight for one that is off by 0.1 everywhere.
  exact = lambda x_t, t, img, task, cond: tb.target
  per_example, _ = paradigm.loss(exact, _batch(target, image), key)
  assert per_example.shape == (2,) and float(jnp.abs(per_example).max()) == 0.0
  off = lambda x_t, t, img, task, cond: tb.target + 0.1
  per_example, _ = paradigm.loss(off, _batch(target, image), key)
  np.testing.assert_allclose(per_example, 0.01 * tb.weight, rtol=1e-4)


@flax.struct.dataclass
class Oracle:
  """A 'network' that knows the answer y: outputs the exact prediction for any x_t (a pytree, so
  it passes through the samplers' jit like a real model)."""
  y: jax.Array
  sqrt_a: jax.Array
  sqrt_1ma: jax.Array
  prediction_type: str = flax.struct.field(pytree_node=False)

  def __call__(self, x_t, t, image, task, cond=None):
    del image, task, cond
    if self.prediction_type == "sample":
      return jnp.broadcast_to(self.y, x_t.shape)
    a = self.sqrt_a[t][:, None, None, None]
    s = self.sqrt_1ma[t][:, None, None, None]
    eps = (x_t - a * self.y) / s
    return eps if self.prediction_type == "epsilon" else a * eps - s * self.y


@pytest.mark.parametrize("name,kw", [
    ("generalist", dict(prediction_type="epsilon", num_inference_steps=5)),
    ("generalist", dict(prediction_type="sample", sampler="ddpm", num_inference_steps=5,
                        ensemble_size=2, ensemble="depth_affine")),
    ("onestep", dict(prediction_type="sample")),
    ("dmp", dict(prediction_type="v_prediction", num_inference_steps=5,
                 timestep_spacing="trailing")),
    ("dmp", dict(prediction_type="v_prediction", num_inference_steps=5, dmp_oracle=True)),
])
def test_predict_with_an_oracle_network(sd, target, name, kw):
  paradigm = _make(sd, mode=name, **kw)
  image = jnp.asarray(np.random.default_rng(13).uniform(-1, 1, target.shape), jnp.float32)
  model = Oracle(target, jnp.asarray(sd.sqrt_alphas_cumprod),
                 jnp.asarray(sd.sqrt_one_minus_alphas_cumprod), paradigm.cfg.prediction_type)
  got = paradigm.predict(model, image, jnp.zeros((2,), jnp.int32), jax.random.PRNGKey(2))
  np.testing.assert_allclose(got, target, atol=1e-4)


class TinyConvNet(nnx.Module):
  """concat(x_t, image) -> 3x3 conv -> 3 channels: every output pixel sees its neighbours'
  inputs, so unknown pixels of x_t would leak into known pixels' predictions."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(6, 3, (3, 3), rngs=rngs)

  def __call__(self, x_t, t, image, task, cond=None):
    del task
    cond = image if cond is None else cond
    scale = 1.0 + t.astype(jnp.float32)[:, None, None, None] / 1000.0
    return self.conv(jnp.concatenate([x_t, cond], -1)) * scale


@pytest.mark.parametrize("name,kw", [
    ("generalist", dict(prediction_type="epsilon")),
    ("generalist", dict(prediction_type="sample")),
    ("onestep", dict(prediction_type="sample")),
    ("dmp", dict(prediction_type="v_prediction")),
])
def test_unknown_pixels_change_neither_loss_nor_gradient(sd, name, kw):
  """A batch whose unknown pixels (valid = False) hold garbage gives exactly the loss and the
  gradient of the same batch holding the truth there; a known pixel changes both."""
  paradigm = _make(sd, mode=name, **kw)
  rng = np.random.default_rng(0)
  truth = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  image = jnp.asarray(rng.uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
  valid = jnp.asarray(rng.random((2, 8, 8, 1)) > 0.3).at[0, 4, 4, 0].set(True)
  garbage = jnp.where(valid, truth, jnp.asarray(rng.normal(0, 50, truth.shape), jnp.float32))
  graphdef, params = nnx.split(TinyConvNet(nnx.Rngs(0)))
  key = jax.random.PRNGKey(4)

  def loss(p, tgt):
    return jnp.mean(paradigm.loss(nnx.merge(graphdef, p), _batch(tgt, image, valid), key)[0])

  value_and_grad = jax.jit(jax.value_and_grad(loss))
  (l_truth, g_truth), (l_garbage, g_garbage) = (value_and_grad(params, truth),
                                                value_and_grad(params, garbage))
  assert float(l_truth) == float(l_garbage)
  for a, b in zip(jax.tree.leaves(g_truth), jax.tree.leaves(g_garbage)):
    np.testing.assert_array_equal(a, b)
  # Without the mask the garbage counts (so the comparison above can fail).
  unmasked = jnp.ones_like(valid)
  l_unmasked = jnp.mean(paradigm.loss(nnx.merge(graphdef, params),
                                      _batch(garbage, image, unmasked), key)[0])
  assert float(l_unmasked) > 10 * float(l_truth)
  # A known pixel does count.
  assert float(value_and_grad(params, truth.at[0, 4, 4, :].add(0.5))[0]) != float(l_truth)


def test_masked_mse_is_the_mean_over_known_pixels():
  pred = jnp.arange(2 * 2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 2, 3)
  target = jnp.zeros_like(pred)
  valid = jnp.asarray([[[[1], [0]], [[0], [0]]], [[[1], [1]], [[1], [1]]]], bool)
  got = paradigms.masked_mse(pred, target, valid)
  np.testing.assert_allclose(got, [np.mean(np.square(pred[0, 0, 0])),
                                   np.mean(np.square(pred[1]))], rtol=1e-6)
  np.testing.assert_allclose(paradigms.masked_mse(pred, target, None),
                             np.mean(np.square(pred), axis=(1, 2, 3)), rtol=1e-6)
  nothing = jnp.zeros_like(valid)
  np.testing.assert_array_equal(paradigms.masked_mse(pred, target, nothing), [0.0, 0.0])
