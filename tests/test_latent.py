"""Latent space for every paradigm (`model.latent`): the configs differ in that key alone, the
frozen VAE encodes inside the step and never trains, image-level losses reach the UNet through
the VAE decoder and fall, and a latent run trains, evaluates and predicts end to end."""
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, tiny
from dense_diffusion import errors
from dense_diffusion import experiment
from dense_diffusion.paradigms import base as paradigm_base
from dense_diffusion.paradigms import spaces


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


@pytest.mark.parametrize("name,arg", [("onestep", "loss=image"), ("onestep", "real=1,loss=image"),
                                      ("marigold", ""), ("marigold", "real=1"), ("dmp", "")])
def test_pixel_and_latent_runs_of_a_config_differ_in_one_key(name, arg):
  module = importlib.import_module(f"configs.{name}")
  pixel = module.get_config(",".join(filter(None, [arg, "latent=0"]))).to_dict()
  latent = module.get_config(",".join(filter(None, [arg, "latent=1"]))).to_dict()
  a, b = _flat(pixel), _flat(latent)
  assert set(a) == set(b)
  assert {k for k in a if a[k] != b[k]} == {"model.latent"}
  assert a["model.latent"] is False and b["model.latent"] is True


def _tiny(latent, **diffusion):
  c = tiny.get_config()
  c.tasks = ("depth",)
  c.input.entries = c.input.entries[:1]
  # Affine-invariant depth: the image-level loss is E2E-FT's scale-and-shift-invariant L1.
  c.input.entries[0]["task_options"] = {"max_depth": 8.0, "affine_invariant": True}
  c.model.latent = latent
  c.model.vae.config = demo.SYNTHETIC_VAE
  c.model.allow_frozen_fresh = ["vae"]  # a random VAE, kept frozen: said explicitly.
  c.model.zero_init_output = False
  c.model.input_residual = False
  c.optimizer.warmup_steps = 1
  c.optimizer.lr = 3e-3
  c.schedule.rescale_betas_zero_snr = True
  for k, v in diffusion.items():
    c.diffusion[k] = v
  return c


def _batch(config, seed=0):
  """A fixed batch of smooth depth-like targets with holes (unknown pixels)."""
  rng = np.random.default_rng(seed)
  b, r = int(config.batch_size), int(config.model.unet["sample_size"])
  yy, xx = np.mgrid[:r, :r] / r
  target = np.stack([np.repeat((np.sin(3 * xx + i) * yy)[..., None], 3, -1)
                     for i in range(b)]).astype(np.float32)
  valid = np.ones((b, r, r, 1), bool)
  valid[:, :4, :4] = False
  target[~valid[..., 0]] = 5.0  # garbage where unknown
  return {"image": rng.uniform(-1, 1, (b, r, r, 3)).astype(np.float32), "target": target,
          "valid": valid, "task": np.zeros((b,), np.int32)}


@pytest.mark.parametrize("latent", [False, True])
def test_onestep_with_an_image_level_loss_falls_and_reaches_the_unet(latent):
  config = _tiny(latent, mode="onestep", prediction_type="sample", loss_space="image")
  exp = experiment.Experiment(config)
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      exp.state.params)}
  assert not any("'vae'" in n for n in names)  # the VAE is never trained ...
  frozen = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(exp.frozen)}
  assert any("'vae'" in n for n in frozen) == latent  # ... and sits with the frozen parts.
  assert exp.space.name == ("latent" if latent else "pixel")
  with jax.set_mesh(exp.mesh):
    batch = exp.device_batch(_batch(config))
    key = jax.random.key(0)
    (loss0, _), grads = jax.jit(jax.value_and_grad(exp.loss, has_aux=True))(
        exp.state.params, exp.frozen, batch, key)
    unet_grad = float(optax_norm(grads["unet"]))
    losses = []
    for _ in range(12):
      exp.state, metrics = exp.train_step(exp.state, exp.frozen, batch)
      losses.append(float(metrics["loss"]))
  # Through the decoder (latent: the only path from the image loss to the UNet) to the UNet.
  assert np.isfinite(unet_grad) and unet_grad > 0
  assert np.isfinite(losses).all() and losses[-1] < 0.7 * losses[0], losses


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def test_remat_of_the_decoder_changes_nothing_but_memory():
  config = _tiny(True, mode="onestep", prediction_type="sample", loss_space="image")
  exp = experiment.Experiment(config)
  batch = _batch(config)
  # Jitted, as in the train step (eagerly each of the VAE's small ops is compiled on its own).
  encode = jax.jit(lambda image: spaces.LatentSpace().encode(exp.model(exp.state.params), image))
  z = encode(jnp.asarray(batch["image"]))
  answers = []
  for space in (spaces.LatentSpace(), spaces.LatentSpace(remat_decoder=True)):
    # The model is built inside the differentiated function, as in the train step.
    fn = lambda z, space=space: jnp.sum(space.decode(exp.model(exp.state.params), z) ** 2)
    answers.append(jax.jit(jax.value_and_grad(fn))(z))
  np.testing.assert_allclose(answers[0][0], answers[1][0], rtol=1e-6)
  # Same maths; the recomputed forward is fused differently, so float32 rounding differs.
  a, b = np.asarray(answers[0][1]), np.asarray(answers[1][1])
  assert np.linalg.norm(a - b) < 1e-5 * np.linalg.norm(a)


def test_a_latent_pixel_is_known_when_all_its_pixels_are():
  valid = np.ones((1, 8, 8, 1), bool)
  valid[0, 1, 5] = False
  model = type("M", (), {"vae": type("V", (), {"config": demo_vae_config()})()})()
  known = np.asarray(spaces.LatentSpace().known(model, jnp.asarray(valid)))
  assert known.shape == (1, 2, 2, 1)
  np.testing.assert_array_equal(known[0, ..., 0], [[True, False], [True, True]])


def demo_vae_config():
  from dense_diffusion.models import vae
  return vae.VAEConfig.from_dict(demo.SYNTHETIC_VAE)


def test_multires_noise_is_unit_variance_and_smooth_when_strong():
  key = jax.random.key(3)
  shape = (2, 32, 32, 4)
  strong = paradigm_base.multires_noise(key, shape, jnp.asarray([0.9, 0.9]))
  none = paradigm_base.multires_noise(key, shape, jnp.asarray([0.0, 0.0]))
  np.testing.assert_allclose(jnp.std(strong, axis=(1, 2, 3)), 1.0, rtol=1e-4)
  white = jax.random.normal(jax.random.split(key, 32)[0], shape)
  np.testing.assert_allclose(none, white / jnp.std(white, axis=(1, 2, 3), keepdims=True),
                             rtol=1e-5, atol=1e-6)  # strength 0: the Gaussian noise itself
  neighbour = lambda n: float(jnp.mean(n[:, 1:] * n[:, :-1]))
  assert neighbour(strong) > 0.3 > abs(neighbour(none))  # coarse levels correlate neighbours


def test_the_latent_mistakes_are_one_line():
  config = _tiny(True, mode="onestep", prediction_type="sample", loss_space="image")
  config.model.zero_init_output = True
  with pytest.raises(errors.ConfigError, match="zero_init_output"):
    experiment.Experiment(config)
  config = _tiny(True)
  config.model.vae.config = {}
  with pytest.raises(errors.ConfigError, match="model.vae.pretrained"):
    experiment.Experiment(config)
  config = _tiny(True)
  config.model.unet["in_channels"] = 6
  with pytest.raises(errors.ConfigError, match="in_channels=6 does not fit the latent space"):
    experiment.Experiment(config)


def test_a_latent_run_trains_evaluates_and_predicts(tmp_path, synthetic_data_dir):
  from PIL import Image
  from dense_diffusion import predict, train
  config = tiny.get_config()
  config.input.data_dir = synthetic_data_dir
  config.model.latent = True
  config.model.vae.config = demo.SYNTHETIC_VAE
  config.model.allow_frozen_fresh = ["vae"]  # a random VAE, kept frozen: said explicitly.
  config.total_steps = 2
  config.diffusion.ensemble_size = 2  # members sampled, decoded, then combined
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert set(results) == {"depth", "semantic", "denoise"}
  assert all(np.isfinite(v[v["headline"]]) for v in results.values())
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["latent"] is True
  image = tmp_path / "in.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)).save(image)
  summary = predict.Predictor(str(tmp_path / "run"), batch_size=2).run(
      "depth", [image], tmp_path / "out", log=lambda s: None)
  assert summary.written == 1
  assert Image.open(tmp_path / "out" / "in_depth.png").size == (40, 24)


def test_the_vae_trains_only_when_the_config_says_so():
  keys = lambda tree: {jax.tree_util.keystr(p) for p, _ in
                       jax.tree_util.tree_leaves_with_path(tree)}
  config = _tiny(True)
  assert not any("'vae'" in k for k in keys(experiment.Experiment(config).state.params))
  config.model.vae.trainable = True
  assert any("'vae'" in k for k in keys(experiment.Experiment(config).state.params))
