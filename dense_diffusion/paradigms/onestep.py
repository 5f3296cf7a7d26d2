"""One-step deterministic prediction (GenPercept, Lotus): the answer in one pass at a fixed t.

The network sees the condition image as its x_t at t = `timestep` (default T - 1) and predicts
the answer directly (`prediction_type="sample"`) or its v (`"v_prediction"`; with zero-terminal
SNR, v = -x0 at T - 1). The training target is the output whose implied x0 is the answer, so the
loss in prediction space and in image space agree.
"""
from __future__ import annotations

import jax.numpy as jnp

from dense_diffusion import errors
from dense_diffusion.diffusion import objectives
from dense_diffusion.diffusion import samplers
from dense_diffusion.paradigms import base


def deterministic_checks(cfg, allowed: tuple[str, ...]) -> None:
  if cfg.prediction_type not in allowed:
    raise errors.ConfigError(f"diffusion.mode={cfg.mode!r} needs diffusion.prediction_type in "
                             f"{list(allowed)}, got {cfg.prediction_type!r}")
  if cfg.ensemble_size != 1:
    raise errors.ConfigError(f"diffusion.mode={cfg.mode!r} is deterministic: "
                             f"diffusion.ensemble_size must be 1, got {cfg.ensemble_size}")


@base.register("onestep")
class OneStep(base.Paradigm):
  """x_t = the image at a fixed t; one deterministic forward pass."""

  def __init__(self, cfg, schedule, **kwargs):
    super().__init__(cfg, schedule, **kwargs)
    self.timestep  # pylint: disable=pointless-statement  # fails early on an impossible t

  @classmethod
  def validate(cls, cfg):
    deterministic_checks(cfg, ("v_prediction", "sample"))

  @property
  def timestep(self) -> int:
    return base.fixed_timestep(self.cfg, self.schedule, self.schedule.num_train_timesteps - 1)

  def training_batch(self, target, cond, key):
    del key
    t = jnp.full((target.shape[0],), self.timestep, jnp.int32)
    tgt = objectives.onestep_target(self.schedule, target, cond, t, self.cfg.prediction_type)
    return base.TrainingBatch(cond, t, tgt, jnp.ones((target.shape[0],), jnp.float32))

  def sampler_loop_trips(self) -> int:
    return 1  # one network pass, no loop.

  def sample(self, model, image, cond, task, key):
    del key
    return samplers.sample_onestep(
        base.denoise_fn, self.schedule, cond, self.timestep,
        prediction_type=self.cfg.prediction_type, model_args=(model, image, task, cond),
        clip_sample=self.cfg.clip_sample, clip_sample_range=self.cfg.clip_sample_range)
