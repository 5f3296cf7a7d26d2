"""Generalist: conditional diffusion of the RGB-encoded answer from noise, multi-step.

Training: x_t = q_sample(target, t, noise) at a drawn t; the network regresses the configured
prediction type (epsilon / v / sample) of the target. Inference: DDIM or DDPM from pure noise,
optionally several samples combined (`ensemble_size`, `ensemble`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dense_diffusion import errors
from dense_diffusion.diffusion import objectives
from dense_diffusion.diffusion import samplers
from dense_diffusion.paradigms import base


@base.register("generalist")
class Generalist(base.Paradigm):
  """Pixel-space conditional diffusion: the condition image enters through the model."""

  @classmethod
  def validate(cls, cfg):
    if cfg.sampler not in ("ddim", "ddpm"):
      raise errors.ConfigError(f"generalist diffusion.sampler must be 'ddim' or 'ddpm', got "
                               f"{cfg.sampler!r}")
    samplers.ENSEMBLERS.get(cfg.ensemble)

  def training_batch(self, target, image, key):
    del image  # the condition enters through the model, not the forward process
    k_t, k_n = jax.random.split(key)
    t = base.train_timesteps(k_t, self.schedule, self.cfg, target.shape[0])
    noise = jax.random.normal(k_n, target.shape, jnp.float32)
    x_t = objectives.q_sample(self.schedule, target, t, noise)
    tgt = objectives.target(self.schedule, target, noise, t, self.cfg.prediction_type)
    return base.TrainingBatch(x_t, t, tgt, base.loss_weight(self.schedule, self.cfg, t))

  def predict(self, model, image, task, key):
    """Samples from noise shaped like `image` (the RGB-encoded answer has the image's shape)."""
    cfg = self.cfg
    ts, prev = base.sampler_steps(self.schedule, cfg)
    members = []
    for k in jax.random.split(key, cfg.ensemble_size):
      k_start, k_steps = jax.random.split(k)
      x_start = jax.random.normal(k_start, image.shape, jnp.float32)
      common = dict(prediction_type=cfg.prediction_type, key=k_steps,
                    model_args=(model, image, task), clip_sample=cfg.clip_sample,
                    clip_sample_range=cfg.clip_sample_range)
      if cfg.sampler == "ddpm":
        members.append(samplers.sample_ddpm(base.denoise_fn, self.schedule, x_start, ts,
                                            **common))
      else:
        members.append(samplers.sample_ddim(base.denoise_fn, self.schedule, x_start, ts, prev,
                                            eta=cfg.eta, **common))
    if len(members) == 1:
      return members[0]
    return samplers.ensemble(jnp.stack(members), cfg.ensemble,
                             iterations=cfg.ensemble_iterations)
