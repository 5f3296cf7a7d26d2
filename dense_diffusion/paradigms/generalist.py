"""Generalist: conditional diffusion of the RGB-encoded answer from noise, multi-step.

Training: x_t = q_sample(target, t, noise) at a drawn t (Gaussian noise, or Marigold's
multi-resolution noise); the network regresses the configured prediction type (epsilon / v /
sample) of the target. Inference: DDIM or DDPM from pure noise, optionally several samples
combined (`ensemble_size`, `ensemble`). In latent space this is Marigold.
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

  def training_batch(self, target, cond, key):
    del cond  # the condition enters through the model, not the forward process
    k_t, k_n = jax.random.split(key)
    t = base.train_timesteps(k_t, self.schedule, self.cfg, target.shape[0])
    noise = self.noise(k_n, target.shape, t)
    x_t = objectives.q_sample(self.schedule, target, t, noise)
    tgt = objectives.target(self.schedule, target, noise, t, self.cfg.prediction_type)
    return base.TrainingBatch(x_t, t, tgt, base.loss_weight(self.schedule, self.cfg, t))

  def noise(self, key, shape, t):
    """The forward process's noise f32[shape] for timesteps t i32[B]."""
    if self.cfg.noise == "multires":
      strength = jnp.full((shape[0],), self.cfg.multires_strength, jnp.float32)
      if self.cfg.multires_annealed:
        strength = strength * t.astype(jnp.float32) / self.schedule.num_train_timesteps
      return base.multires_noise(key, shape, strength)
    return jax.random.normal(key, shape, jnp.float32)

  def sample(self, model, image, cond, task, key):
    """One sample from noise shaped like `cond` (the answer has the condition's shape)."""
    cfg = self.cfg
    ts, prev = base.sampler_steps(self.schedule, cfg)
    k_start, k_steps = jax.random.split(key)
    x_start = jax.random.normal(k_start, cond.shape, jnp.float32)
    common = dict(prediction_type=cfg.prediction_type, key=k_steps,
                  model_args=(model, image, task, cond), clip_sample=cfg.clip_sample,
                  clip_sample_range=cfg.clip_sample_range)
    if cfg.sampler == "ddpm":
      return samplers.sample_ddpm(base.denoise_fn, self.schedule, x_start, ts, **common)
    return samplers.sample_ddim(base.denoise_fn, self.schedule, x_start, ts, prev, eta=cfg.eta,
                                **common)
