"""A small AutoencoderKL trained on synthetic_scenes: its images and the tasks' RGB encodings.

    python -m dense_diffusion.main train-vae --config configs/synthetic_vae.py --workdir runs/vae

Writes `<workdir>/config.json` (diffusers AutoencoderKL keys) and `<workdir>/params` (orbax),
the folder layout `main convert` writes, so every `model.vae.pretrained` key reads it, and
`<workdir>/ceiling.json`: each task's round-trip ceiling through it (studies/ceiling.py), with
the identity's (pixel space) beside it. Training: L1 reconstruction of a posterior sample plus
a small KL term (the latent stays close to N(0, 1), so a diffusion model can noise it), AdamW.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from dense_diffusion import errors

CEILING_FILE = "ceiling.json"
CONFIG_FILE = "config.json"


def vae_config(config: Any) -> dict:
  """The diffusers AutoencoderKL config written beside the parameters."""
  return {"_class_name": "AutoencoderKL", **dict(config.vae)}


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


def train(config: Any, workdir: str, out=print) -> dict:
  """Trains the VAE of `config` (configs/synthetic_vae.py), saves it, measures its ceiling."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dense_diffusion import input_pipeline  # pylint: disable=g-import-not-at-top
  from dense_diffusion.convert import command  # pylint: disable=g-import-not-at-top
  from dense_diffusion.datasets import prepare  # pylint: disable=g-import-not-at-top
  from dense_diffusion.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  from dense_diffusion.studies import ceiling  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")
  if os.path.isfile(os.path.join(workdir, CEILING_FILE)):
    out(f"{workdir} holds a trained VAE and its ceiling already")
    return json.loads(open(os.path.join(workdir, CEILING_FILE), encoding="utf-8").read())
  entries = [dict(e) for e in config.entries]
  tasks = [e["task"] for e in entries]
  data_dir = config.get("data_dir")
  prepare.ensure_prepared(entries, data_dir)
  try:
    vcfg = vae_lib.VAEConfig.from_dict(dict(config.vae))
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"vae: {e}") from None
  vae = vae_lib.AutoencoderKL(vcfg, rngs=nnx.Rngs(int(config.seed)))
  graphdef, params, rest = nnx.split(vae, nnx.Param, ...)
  steps = int(config.steps)
  warmup = min(int(config.warmup_steps), steps // 2)  # a short test run still decays.
  schedule = optax.warmup_cosine_decay_schedule(0.0, float(config.lr), warmup, steps)
  optimizer = optax.chain(optax.clip_by_global_norm(float(config.grad_clip_norm)),
                          optax.adamw(schedule, weight_decay=float(config.weight_decay)))
  opt_state = optimizer.init(params)
  grad_fn = jax.value_and_grad(_loss_fn(graphdef, float(config.kl_weight)), has_aux=True)

  @jax.jit
  def step(params, opt_state, x, key):
    (loss, aux), grads = grad_fn(params, rest, x, key)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  dataset = input_pipeline.get_train_dataset(
      entries, tasks, int(config.batch_size), seed=int(config.seed), data_dir=data_dir,
      shuffle_buffer=int(config.shuffle_buffer), process_index=0, process_count=1)
  key = jax.random.key(int(config.seed))
  start = time.time()
  images_per_batch = int(config.batch_size)
  for i, batch in enumerate(dataset.as_numpy_iterator(), 1):
    # The renders and the answers' encodings: a latent run encodes both.
    x = np.concatenate([batch["image"], batch["target"]])[:2 * images_per_batch]
    key, sub = jax.random.split(key)
    params, opt_state, loss, (l1, kl) = step(params, opt_state, x, sub)
    if i % int(config.log_every) == 0 or i == int(config.steps):
      out(f"vae step {i}/{config.steps}: loss {float(loss):.4f} (L1 {float(l1):.4f}, "
          f"KL {float(kl):.3f}), {time.time() - start:.0f}s")
    if i >= int(config.steps):
      break
  vae = nnx.merge(graphdef, params, rest)
  # Latents at unit scale for the diffusion model (diffusers' scaling_factor = 1 / std).
  scale = _unit_scale(vae, x)
  vae = vae_lib.AutoencoderKL(dataclasses.replace(vcfg, scaling_factor=scale),
                              rngs=nnx.Rngs(0))
  nnx.update(vae, params)
  command.save_params(vae, {**vae_config(config), "scaling_factor": scale}, workdir)
  out(f"wrote the VAE to {workdir} (config.json + params, as `main convert` writes)")
  result = ceiling.measure(
      entries, {"pixels": ceiling.identity, "vae": ceiling.vae_round_trip(vae)},
      data_dir=data_dir, max_examples=int(config.ceiling_examples))
  with open(os.path.join(workdir, CEILING_FILE), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, sort_keys=True, default=float)
  out(format_ceiling(result))
  return result


def _unit_scale(vae: Any, x: np.ndarray) -> float:
  mean, _ = vae.encode_moments(x)
  return float(1.0 / max(float(np.std(np.asarray(mean))), 1e-6))


def format_ceiling(result: dict) -> str:
  """task, headline metric: the identity's round trip, the VAE's, the trivial baseline."""
  lines = [f"  {'task':<10} {'metric':<9} {'pixels':>9} {'vae':>9} {'baseline':>9}"]
  for task, values in result["vae"].items():
    key = values["headline"]
    lines.append(f"  {task:<10} {key:<9} {result['pixels'][task][key]:>9.4f} "
                 f"{values[key]:>9.4f} {values['baseline'][key]:>9.4f}")
  return "round-trip ceiling (ground truth encoded, through the autoencoder, decoded):\n" + (
      "\n".join(lines))


def load(path: str):
  """The trained VAE at `path` (what `model.vae.pretrained=path` reads)."""
  from dense_diffusion.convert import vae as vae_convert  # pylint: disable=g-import-not-at-top
  return vae_convert.load_diffusers_vae(path)
