"""The VAE of a synthetic latent run: trained from its recipe on first use, then cached.

A latent config on `synthetic_scenes` cannot load a pretrained VAE (none can be downloaded, and
Stable Diffusion's is not trained on these scenes), and a random one cannot represent the
answers. So it names how its VAE is made instead, `model.vae.recipe` (the config of
configs/synthetic_vae.py), and the first run that needs it trains it:

    ensure(recipe, data_dir) -> the folder of the trained VAE (trained now when missing)
    folder(recipe, data_dir) -> where it is (or will be)
    fit(recipe, dst)         -> trains it into `dst` (what `main train-vae` runs too)

The cache: `<data_dir>/trained_vaes/synthetic_vae-<key>/` beside the TFDS datasets it is trained
on (`data_dir`: the run's `input.data_dir`, or TFDS's default; a data_dir that is not a local
folder, e.g. gs://, keeps it in `$XDG_CACHE_HOME/dense_diffusion/trained_vaes`). `<key>` is a
hash of the recipe (without the keys that do not change the VAE, such as `log_every`) and of
`TRAINER_VERSION`, so a changed recipe trains a new VAE beside the old one. The folder is what
`main convert` writes (`config.json` with diffusers' AutoencoderKL keys, orbax `params/`) plus
`recipe.json`; every `model.vae.pretrained` key reads it.

Concurrency: on one host, a file lock lets one process train while the others wait, then read
(two test workers, two runs started at once); training writes into a temporary folder renamed
into place when complete, so an interrupted run leaves nothing half-written. In a job of several
processes (`jax.distributed`), process 0 trains first while the others wait at a barrier
(`datasets.prepare.process_zero_first`), as for the datasets.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from dense_diffusion import errors

# Bump when fit() changes what a recipe trains, so cached VAEs of older code are not reused.
TRAINER_VERSION = 1
CACHE_FOLDER = "trained_vaes"  # under the data_dir
RECIPE_FILE = "recipe.json"  # the recipe that trained a cached VAE, beside its weights
CONFIG_FILE = "config.json"
# The keys of a recipe (configs/synthetic_vae.py), and those that do not change the VAE trained.
RECIPE_KEYS = frozenset({"seed", "vae", "entries", "data_dir", "steps", "batch_size",
                         "shuffle_buffer", "lr", "warmup_steps", "weight_decay",
                         "grad_clip_norm", "kl_weight", "log_every", "ceiling_examples"})
NOT_IN_KEY = ("data_dir", "log_every", "ceiling_examples")


def _plain(x: Any) -> Any:
  """ConfigDicts, tuples and numpy scalars as JSON-able builtins (for hashing and saving)."""
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def check_recipe(recipe: Any) -> dict:
  """The recipe as a plain dict; unknown or missing keys are a ConfigError."""
  plain = _plain(recipe)
  if not isinstance(plain, dict):
    raise errors.ConfigError(f"model.vae.recipe must be a dict (configs/synthetic_vae.py's "
                             f"config), got {type(recipe).__name__}")
  unknown = sorted(set(plain) - RECIPE_KEYS)
  missing = sorted(RECIPE_KEYS - set(NOT_IN_KEY) - set(plain))
  if unknown or missing:
    raise errors.ConfigError(f"model.vae.recipe has unknown keys {unknown} / lacks {missing}; "
                             "its keys are configs/synthetic_vae.py's")
  return plain


def key(recipe: Any) -> str:
  """12 hex digits naming what the recipe trains (the keys that do not change it left out)."""
  plain = {k: v for k, v in check_recipe(recipe).items() if k not in NOT_IN_KEY}
  text = json.dumps({"recipe": plain, "trainer": TRAINER_VERSION}, sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root(data_dir: str | None) -> str:
  """Where trained VAEs are kept: `<data_dir>/trained_vaes` (TFDS's default data_dir when
  None), or a local cache folder when the data_dir is not a local path."""
  if not data_dir:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    data_dir = tfds.core.constants.get_default_data_dir()
  if "://" in str(data_dir):
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "dense_diffusion", CACHE_FOLDER)
  return os.path.join(os.path.expanduser(str(data_dir)), CACHE_FOLDER)


def folder(recipe: Any, data_dir: str | None) -> str:
  """The folder of the recipe's trained VAE (which may not exist yet)."""
  return os.path.join(cache_root(data_dir), f"synthetic_vae-{key(recipe)}")


def is_trained(path: str) -> bool:
  return os.path.isfile(os.path.join(path, RECIPE_FILE))


def _print(line: str) -> None:
  print(line, flush=True)  # progress shows at once, also when stdout is a file or a pipe.


def ensure(recipe: Any, data_dir: str | None, out: Callable[[str], None] = _print) -> str:
  """The folder of the recipe's trained VAE, trained first if no process has yet (with its
  progress on `out`). `data_dir` is the TFDS data_dir its scenes are read from and the cache
  is kept beside."""
  from dense_diffusion.datasets import prepare  # pylint: disable=g-import-not-at-top
  plain = check_recipe(recipe)
  dst = folder(plain, data_dir)

  def train_if_missing():
    if is_trained(dst):
      return
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with _host_lock(dst + ".lock"):
      if is_trained(dst):  # another process of this host trained it while this one waited.
        return
      # Only now, and in this process alone: a run whose VAE is cached needs none of the scenes.
      prepare.ensure_prepared(plain["entries"], data_dir, coordinate=False)
      out(f"training the synthetic VAE of model.vae.recipe ({plain['steps']} steps, once; "
          f"cached in {dst})...")
      start = time.time()
      tmp = f"{dst}.incomplete-{os.getpid()}"
      shutil.rmtree(tmp, ignore_errors=True)
      try:
        fit({**plain, "data_dir": data_dir}, tmp, out=out)
        # Written last: a folder with its recipe is complete (`is_trained`).
        with open(os.path.join(tmp, RECIPE_FILE), "w", encoding="utf-8") as f:
          json.dump(plain, f, indent=2, sort_keys=True)
        os.replace(tmp, dst)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)  # what a failed or interrupted training left.
      out(f"trained the synthetic VAE in {time.time() - start:.0f}s: {dst}")

  # Every process makes this call (a barrier in a multi-process job), trained or not.
  prepare.process_zero_first(train_if_missing, "dense_diffusion_vae_cache")
  return dst


@contextlib.contextmanager
def _host_lock(path: str):
  """An exclusive lock between the processes of this host (a lock file, released on exit)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  with open(path, "w", encoding="utf-8") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def vae_config(recipe: Any) -> dict:
  """The diffusers AutoencoderKL config of the recipe's VAE (before its scaling factor)."""
  return {"_class_name": "AutoencoderKL", **_plain(recipe["vae"])}


def _loss_fn(graphdef, kl_weight: float):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  def loss(params, rest, x, key):
    vae = nnx.merge(graphdef, params, rest)
    mean, logvar = vae.encode_moments(x)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    rec = vae.decode(z)
    l1 = jnp.mean(jnp.abs(rec - x))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return l1 + kl_weight * kl, (l1, kl)

  return loss


def fit(recipe: Any, dst: str, out: Callable[[str], None] = _print):
  """Trains the recipe's VAE on its entries' renders and answer encodings and writes it to `dst`
  (config.json + params/, its scaling factor set so its latents have unit scale); returns it.

  Training: L1 reconstruction of a posterior sample plus a small KL term (the latents stay
  close to N(0, 1), so a diffusion model can noise them), AdamW with warmup and cosine decay.
  The recipe's `data_dir` is the TFDS data_dir (its entries must be prepared).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dense_diffusion import input_pipeline  # pylint: disable=g-import-not-at-top
  from dense_diffusion.convert import command  # pylint: disable=g-import-not-at-top
  from dense_diffusion.models import vae as vae_lib  # pylint: disable=g-import-not-at-top

  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators are JAX's.
  except RuntimeError:
    pass  # TensorFlow already initialised its devices (the run's own driver hid the GPUs).
  entries = [dict(e) for e in recipe["entries"]]
  tasks = list(dict.fromkeys(e["task"] for e in entries))
  try:
    vcfg = vae_lib.VAEConfig.from_dict(_plain(recipe["vae"]))
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"vae: {e}") from None
  seed = int(recipe["seed"])
  vae = vae_lib.AutoencoderKL(vcfg, rngs=nnx.Rngs(seed))
  graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
  steps = int(recipe["steps"])
  warmup = min(int(recipe["warmup_steps"]), steps // 2)  # a short test run still decays.
  schedule = optax.warmup_cosine_decay_schedule(0.0, float(recipe["lr"]), warmup, steps)
  optimizer = optax.chain(optax.clip_by_global_norm(float(recipe["grad_clip_norm"])),
                          optax.adamw(schedule, weight_decay=float(recipe["weight_decay"])))
  opt_state = optimizer.init(params)
  grad_fn = jax.value_and_grad(_loss_fn(graphdef, float(recipe["kl_weight"])), has_aux=True)

  @jax.jit
  def step(params, opt_state, x, key):
    (loss, aux), grads = grad_fn(params, rest, x, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  batch_size = int(recipe["batch_size"])
  dataset = input_pipeline.get_train_dataset(
      entries, tasks, batch_size, seed=seed, data_dir=recipe.get("data_dir"),
      shuffle_buffer=int(recipe["shuffle_buffer"]), process_index=0, process_count=1)
  key_ = jax.random.key(seed)
  log_every = int(recipe.get("log_every") or 50)
  start = time.time()
  for i, batch in enumerate(dataset.as_numpy_iterator(), 1):
    # The renders and the answers' encodings: a latent run encodes both.
    x = np.concatenate([batch["image"], batch["target"]])
    key_, sub = jax.random.split(key_)
    params, opt_state, loss, (l1, kl) = step(params, opt_state, x, sub)
    if i % log_every == 0 or i == steps:
      rate = i / max(time.time() - start, 1e-9)
      out(f"vae step {i}/{steps}: loss {float(loss):.4f} (L1 {float(l1):.4f}, "
          f"KL {float(kl):.3f}), {time.time() - start:.0f}s, ETA {(steps - i) / rate:.0f}s")
    if i >= steps:
      break
  vae = nnx.merge(graphdef, params, rest)
  # Latents at unit scale for the diffusion model (diffusers' scaling_factor = 1 / std).
  scale = _unit_scale(vae, x)
  vae = vae_lib.AutoencoderKL(dataclasses.replace(vcfg, scaling_factor=scale), rngs=nnx.Rngs(0))
  nnx.update(vae, params)
  command.save_params(vae, {**vae_config(recipe), "scaling_factor": scale}, dst)
  return vae


def _unit_scale(vae: Any, x: np.ndarray) -> float:
  mean, _ = vae.encode_moments(x)
  return float(1.0 / max(float(np.std(np.asarray(mean))), 1e-6))
