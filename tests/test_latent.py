"""Latent space for every paradigm (`model.latent`): the configs differ in that key alone, the
frozen VAE encodes inside the step and never trains, image-level losses reach the UNet through
the VAE decoder and fall, a random frozen VAE is refused unless a test asks for the plumbing
only, the synthetic VAE of `model.vae.recipe` is trained once per recipe and cached, and a
latent run of each paradigm (generalist, DMP, VPD) trains, evaluates and predicts end to end
through it."""
import concurrent.futures
import importlib
import json
import os
import pathlib
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, dmp, generalist_pixel128, synthetic_vae, tiny, vpd_depth
from dense_diffusion import errors
from dense_diffusion import experiment
from dense_diffusion.datasets import readers
from dense_diffusion.experiment import vae_cache
from dense_diffusion.paradigms import base as paradigm_base
from dense_diffusion.paradigms import spaces
from dense_diffusion.studies import vae_training


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


@pytest.mark.parametrize("name,arg", [("marigold", ""), ("dmp", "latent=1"),
                                      ("onestep", "latent=1,loss=image"), ("vpd_depth", "latent=1"),
                                      ("vpd_seg", "latent=1"), ("demo", "")])
def test_synthetic_latent_configs_default_to_the_trained_synthetic_vae(name, arg):
  from dense_diffusion.experiment import model as model_lib
  config = importlib.import_module(f"configs.{name}").get_config(arg or None)
  config.model.latent = True
  assert model_lib.vae_source(config.model) == "recipe"
  assert config.model.vae.recipe.to_dict() == synthetic_vae.recipe().to_dict()
  assert not config.model.get("allow_frozen_fresh")  # nothing random stays frozen
  experiment.check_config(config)
  # The real set-ups read SD's VAE from a folder: no recipe; they carry SD-2's architecture
  # (for an abstract compile), which alone is a random VAE, refused when a run is built
  # (test_the_latent_mistakes_are_one_line below).
  if name != "demo":
    real = importlib.import_module(f"configs.{name}").get_config(
        ",".join(filter(None, [arg, "real=1"])))
    assert not real.model.vae.get("recipe") and real.model.vae.get("pretrained") is None
    assert model_lib.vae_source(real.model) == "random"
    assert dict(real.model.vae.config) == dict(generalist_pixel128.SD2_VAE)


def _tiny(latent, **diffusion):
  c = tiny.get_config()
  c.tasks = ("depth",)
  c.input.entries = c.input.entries[:1]
  # Affine-invariant depth: the image-level loss is E2E-FT's scale-and-shift-invariant L1.
  c.input.entries[0]["task_options"] = {"max_depth": 8.0, "affine_invariant": True}
  c.model.latent = latent
  c.model.vae.recipe = None  # not the synthetic VAE trained on first use: ...
  c.model.vae.config = demo.SYNTHETIC_VAE  # ... a random one ...
  c.model.allow_frozen_fresh = ["vae"]  # ... kept frozen: the plumbing only, said explicitly.
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
  with pytest.raises(errors.ConfigError, match="model.vae.pretrained.*model.vae.recipe"):
    experiment.Experiment(config)
  config = _tiny(True)
  config.model.unet["in_channels"] = 6
  with pytest.raises(errors.ConfigError, match="in_channels=6 does not fit the latent space"):
    experiment.Experiment(config)
  # A random frozen VAE cannot represent the answers: refused unless the config says plumbing.
  config = _tiny(True)
  config.model.allow_frozen_fresh = []
  with pytest.raises(errors.ConfigError, match=r"random frozen VAE.*model.vae.pretrained=FOLDER"
                     r".*model.vae.recipe.*allow_frozen_fresh=\('vae',\)"):
    experiment.Experiment(config)
  config = _tiny(True)
  config.model.vae.recipe = synthetic_vae.recipe()
  with pytest.raises(errors.ConfigError, match="recipe .* and model.vae.config .* both set"):
    experiment.check_config(config)
  config = _tiny(True)
  config.model.vae.config = {}
  config.model.vae.recipe = synthetic_vae.recipe()
  config.model.vae.recipe.stpes = 3
  with pytest.raises(errors.ConfigError, match=r"recipe has unknown keys \['stpes'\]"):
    experiment.check_config(config)


def tiny_recipe():
  """configs/synthetic_vae.py's recipe (the default `model.vae.recipe`) at test size: 2 steps on
  tiny32. A stand-in for the path recipe -> cache -> a run's frozen VAE, not a good VAE."""
  recipe = synthetic_vae.recipe("steps=2")
  recipe.entries = readers.synthetic_mixture(("depth", "semantic"), config="tiny32")
  recipe.batch_size = 4
  recipe.shuffle_buffer = 16
  recipe.log_every = 1
  return recipe


@pytest.fixture(scope="module")
def tiny_vae(synthetic_data_dir):
  """The tiny recipe's VAE, trained (once per session) into the session data_dir's cache."""
  return vae_cache.ensure(tiny_recipe(), synthetic_data_dir)


def _at_test_size(config, data_dir):
  """A synthetic config at tiny.py's sizes, its structure kept (paradigm, space, tasks, task
  options of its entries, read from tiny32), its VAE the tiny recipe's."""
  small = tiny.get_config()
  unet = dict(small.model.unet)
  if "num_class_embeds" in config.model.unet:  # the task as a class label, where it is one.
    unet["num_class_embeds"] = config.model.unet["num_class_embeds"]
  config.model.unet = unet
  if config.model.get("image_encoder"):
    config.model.image_encoder = small.model.image_encoder
  if config.model.get("head"):
    config.model.head = dict(config.model.head, width=16)
  config.model.num_task_tokens = 2
  config.model.vae.recipe = tiny_recipe()
  config.input.entries = [dict(e, dataset=e["dataset"].replace("/res32", "/tiny32"))
                          for e in config.input.entries]
  config.input.data_dir = data_dir
  config.input.shuffle_buffer = 16
  config.batch_size = small.batch_size
  config.log_every = small.log_every
  config.total_steps = config.checkpoint_every = 2
  config.optimizer.warmup_steps = 1
  config.eval.batch_size = 4
  config.eval.max_examples = 4
  config.eval.num_grid_examples = 1
  config.diffusion.num_inference_steps = min(2, int(config.diffusion.num_inference_steps))
  return config


def _vpd_latent():
  config = vpd_depth.get_config("latent=1")
  config.tasks = ("depth", "semantic")  # both of VPD's head kinds in one run ...
  config.input.entries = readers.synthetic_mixture(config.tasks, config="res32")
  config.diffusion.vpd_class_prompts = False  # ... with learned tokens (one count per run).
  return config


LATENT_RUNS = {
    "generalist": tiny.get_config,
    "dmp": lambda: dmp.get_config("latent=1"),
    "vpd": _vpd_latent,
}


@pytest.mark.parametrize("name", sorted(LATENT_RUNS))
def test_a_latent_run_trains_evaluates_and_predicts(name, tiny_vae, tmp_path, synthetic_data_dir):
  """Each paradigm in latents, its VAE the synthetic recipe's (trained on first use, here the
  tiny recipe's, cached by the fixture): trained, evaluated, its config saved, predicted."""
  from PIL import Image
  from dense_diffusion import predict, train
  config = _at_test_size(LATENT_RUNS[name](), synthetic_data_dir)
  config.model.latent = True
  if name == "generalist":
    config.diffusion.ensemble_size = 2  # members sampled, decoded, then combined
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert set(results) == set(config.tasks)
  assert all(np.isfinite(v[v["headline"]]) for v in results.values())
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["latent"] is True
  # eval / predict find the cache again from the saved config (JSON: lists for tuples).
  assert vae_cache.folder(saved["model"]["vae"]["recipe"], synthetic_data_dir) == tiny_vae
  image = tmp_path / "in.png"
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 40, 3), np.uint8)).save(image)
  # The evaluation's batch: its compiled sampler comes from the session's compilation cache.
  predictor = predict.Predictor(str(tmp_path / "run"), batch_size=config.eval.batch_size)
  summary = predictor.run("depth", [image], tmp_path / "out", log=lambda s: None)
  assert summary.written == 1
  assert Image.open(tmp_path / "out" / "in_depth.png").size == (40, 24)
  # The run's frozen VAE is the cached one (its trained weights, not a random initialisation).
  cached = nnx.to_pure_dict(nnx.state(vae_training.load(tiny_vae), nnx.Param))
  setup = predictor._setup  # pylint: disable=protected-access
  used = nnx.to_pure_dict(nnx.state(setup.model(predictor.params).vae, nnx.Param))
  jax.tree.map(np.testing.assert_array_equal, used, cached)


# -- the cache of trained VAEs (experiment/vae_cache.py) ------------------------------------------

@pytest.fixture
def fake_fit(monkeypatch):
  """vae_cache.fit replaced by a slow stand-in that writes a folder and counts its calls; data
  preparation a no-op (the recipe's scenes are not read)."""
  from dense_diffusion.datasets import prepare
  calls = []

  def fit(recipe, dst, out=print):
    calls.append(dict(recipe))
    time.sleep(0.3)  # long enough for the other callers to arrive while this one trains.
    if recipe["seed"] == 13:
      os.makedirs(dst)  # a partly written folder ...
      raise RuntimeError("training failed")  # ... and an interrupted training.
    os.makedirs(dst)
    (pathlib.Path(dst) / "config.json").write_text("{}")
    out("fit done")

  monkeypatch.setattr(vae_cache, "fit", fit)
  monkeypatch.setattr(prepare, "ensure_prepared", lambda entries, data_dir, **kw: None)
  return calls


def test_the_vae_cache_trains_once_per_recipe(fake_fit, tmp_path):
  recipe = synthetic_vae.recipe()
  lines = []
  with concurrent.futures.ThreadPoolExecutor(3) as pool:  # three runs start at once
    folders = list(pool.map(lambda _: vae_cache.ensure(recipe, str(tmp_path), out=lines.append),
                            range(3)))
  assert len(fake_fit) == 1  # one trained, the others waited for it
  assert len(set(folders)) == 1
  folder = pathlib.Path(folders[0])
  assert folder.parent == tmp_path / "trained_vaes"  # beside the datasets, in the data_dir
  assert fake_fit[0]["data_dir"] == str(tmp_path)
  assert sum(line.startswith("training the synthetic VAE") for line in lines) == 1
  saved = json.loads((folder / vae_cache.RECIPE_FILE).read_text())
  assert saved["steps"] == synthetic_vae.RECIPE_STEPS
  assert saved["vae"] == {**demo.SYNTHETIC_VAE, "sample_size": 32}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["trained_vaes"]
  assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, folder.name + ".lock"]
  # Cached: the next run reads it. Progress lines change nothing; a changed recipe retrains.
  recipe.log_every = 7
  assert vae_cache.ensure(recipe, str(tmp_path)) == str(folder) and len(fake_fit) == 1
  recipe.lr = 1e-3
  other = vae_cache.ensure(recipe, str(tmp_path))
  assert other != str(folder) and len(fake_fit) == 2
  # A training that fails leaves nothing behind; the next run trains again.
  recipe.seed = 13
  for _ in range(2):
    with pytest.raises(RuntimeError, match="training failed"):
      vae_cache.ensure(recipe, str(tmp_path))
  assert len(fake_fit) == 4
  assert not list(folder.parent.glob("*.incomplete-*"))
  assert not os.path.exists(vae_cache.folder(recipe, str(tmp_path)))


def test_the_vae_cache_key_is_the_recipe():
  recipe = synthetic_vae.recipe()
  assert vae_cache.key(recipe) == vae_cache.key(recipe.to_dict())
  changed = synthetic_vae.recipe()
  changed.vae = dict(changed.vae, latent_channels=8)
  assert vae_cache.key(changed) != vae_cache.key(recipe)
  # A remote data_dir keeps the cache in a local folder (file locks, atomic renames).
  assert vae_cache.cache_root("gs://bucket/tfds").endswith("dense_diffusion/trained_vaes")


def test_the_vae_trains_only_when_the_config_says_so():
  keys = lambda tree: {jax.tree_util.keystr(p) for p, _ in
                       jax.tree_util.tree_leaves_with_path(tree)}
  config = _tiny(True)
  assert not any("'vae'" in k for k in keys(experiment.Experiment(config).state.params))
  config.model.vae.trainable = True
  assert any("'vae'" in k for k in keys(experiment.Experiment(config).state.params))
