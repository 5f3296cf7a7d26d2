"""Diffusion objectives: parameterisations, forward processes, training targets and losses.

Pure functions of arrays. Images are NHWC (any trailing dims work: per-example scalars are
broadcast over every axis after the first), timesteps `t` are int32 [B] (or a scalar).

Parameterisations (diffusers' names), with x_t = a * x0 + s * eps, a = sqrt(alpha_bar_t),
s = sqrt(1 - alpha_bar_t):
  epsilon:       the model predicts eps.         x0 = (x_t - s * eps) / a
  v_prediction:  the model predicts v = a*eps - s*x0.   x0 = a * x_t - s * v,  eps = s * x_t + a * v
  sample:        the model predicts x0.          eps = (x_t - a * x0) / s

Interpolation diffusion (DMP): the condition image x plays the part of the noise,
z_t = a * y + s * x, v-target a * x - s * y. It is the same algebra with eps := x, so DMP reuses
`q_sample` / `target` with `noise=image`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dense_diffusion.diffusion.schedules import PREDICTION_TYPES, Schedule
from dense_diffusion.registry import Registry

__all__ = [
    "PREDICTION_TYPES", "WEIGHTINGS", "gather", "q_sample", "target", "pred_to_x0_eps",
    "convert", "snr", "loss_weight", "diffusion_loss", "dmp_forward", "dmp_v_target",
    "onestep_target", "onestep_x0",
]


def _check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, "
                     f"got {prediction_type!r}.")


def _bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a per-example value ([] or [B]) to broadcast against x [B, ...]."""
  v = jnp.asarray(v)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def gather(table, t, x: jax.Array | None = None) -> jax.Array:
  """table[t] as float32, broadcast against x when given.

  Args:
    table: f32[T] schedule table.
    t: int [] or [B] timesteps in 0..T-1.
    x: optional array [B, ...] to broadcast against.
  """
  v = jnp.asarray(table, jnp.float32)[jnp.asarray(t, jnp.int32)]
  return v if x is None else _bcast(v, x)


def q_sample(schedule: Schedule, x0: jax.Array, t, noise: jax.Array) -> jax.Array:
  """Forward process x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise.

  Args:
    x0: f32[B, H, W, C] clean sample. noise: same shape. t: int32 [B] or [].
  Returns:
    f32[B, H, W, C].
  """
  a = gather(schedule.sqrt_alphas_cumprod, t, x0)
  s = gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0)
  return a * x0 + s * noise


def target(schedule: Schedule, x0: jax.Array, noise: jax.Array, t,
           prediction_type: str) -> jax.Array:
  """The regression target of `prediction_type` for x_t = q_sample(x0, t, noise).

  epsilon -> noise; v_prediction -> a * noise - s * x0 (diffusers' get_velocity); sample -> x0.
  """
  _check_prediction_type(prediction_type)
  if prediction_type == "epsilon":
    return noise
  if prediction_type == "sample":
    return x0
  a = gather(schedule.sqrt_alphas_cumprod, t, x0)
  s = gather(schedule.sqrt_one_minus_alphas_cumprod, t, x0)
  return a * noise - s * x0


def _alpha_sigma(schedule: Schedule, t, x: jax.Array):
  a2 = gather(schedule.alphas_cumprod, t, x)
  return jnp.sqrt(a2), jnp.sqrt(1.0 - a2), a2


def pred_to_x0_eps(schedule: Schedule, pred: jax.Array, x_t: jax.Array, t,
                   prediction_type: str) -> tuple[jax.Array, jax.Array]:
  """Converts a model output to (x0, eps) given x_t and t (formulas in the module docstring).

  Computed as diffusers' schedulers do (alpha_bar ** 0.5 from the alphas_cumprod table), so
  sampler trajectories match them to float32 rounding. Note: epsilon at alpha_bar = 0 (zero
  terminal SNR) and sample at alpha_bar = 1 have no inverse (division by zero), as in diffusers.
  Returns:
    (x0, eps), each shaped like x_t.
  """
  _check_prediction_type(prediction_type)
  a, s, _ = _alpha_sigma(schedule, t, x_t)
  if prediction_type == "epsilon":
    return (x_t - s * pred) / a, pred
  if prediction_type == "sample":
    return pred, (x_t - a * pred) / s
  return a * x_t - s * pred, a * pred + s * x_t


def convert(schedule: Schedule, pred: jax.Array, x_t: jax.Array, t, from_type: str,
            to_type: str) -> jax.Array:
  """Converts a prediction between parameterisations (epsilon / v_prediction / sample)."""
  _check_prediction_type(to_type)
  x0, eps = pred_to_x0_eps(schedule, pred, x_t, t, from_type)
  if to_type == "sample":
    return x0
  if to_type == "epsilon":
    return eps
  a, s, _ = _alpha_sigma(schedule, t, x_t)
  return a * eps - s * x0


def snr(schedule: Schedule, t) -> jax.Array:
  """SNR(t) = alpha_bar_t / (1 - alpha_bar_t), f32 shaped like t."""
  return gather(schedule.snr, t)


WEIGHTINGS: Registry[Callable] = Registry("loss weighting")


@WEIGHTINGS.register("none")
def _weight_none(snr_t, prediction_type, gamma):
  del prediction_type, gamma
  return jnp.ones_like(snr_t)


@WEIGHTINGS.register("min_snr")
def _weight_min_snr(snr_t, prediction_type, gamma):
  """Min-SNR-gamma (Hang et al. 2023): weight the x0-space loss by min(SNR, gamma).

  Because ||x0 - x0'||^2 = ||eps - eps'||^2 / SNR = ||v - v'||^2 / (SNR + 1), the same
  x0-space weighting in each parameterisation's own loss is:
    epsilon:      min(SNR, gamma) / SNR
    v_prediction: min(SNR, gamma) / (SNR + 1)
    sample:       min(SNR, gamma)
  At SNR = 0 (zero terminal SNR) the epsilon weight takes its limit 1; at SNR = inf, the limit of
  each form (0 for epsilon/v, gamma for sample).
  """
  clipped = jnp.minimum(snr_t, gamma)
  if prediction_type == "epsilon":
    return jnp.where(snr_t > 0, clipped / jnp.where(snr_t > 0, snr_t, 1.0), 1.0)
  if prediction_type == "v_prediction":
    return jnp.where(jnp.isinf(snr_t), 0.0, clipped / (snr_t + 1.0))
  return clipped


def loss_weight(schedule: Schedule, t, prediction_type: str, weighting: str = "none",
                gamma: float = 5.0) -> jax.Array:
  """Per-example loss weight f32[B] (see `_weight_min_snr` for the forms).

  Args:
    weighting: "none" or "min_snr".
    gamma: the min-SNR clip (5 in Hang et al.).
  """
  _check_prediction_type(prediction_type)
  return WEIGHTINGS.get(weighting)(snr(schedule, t), prediction_type, gamma)


def diffusion_loss(pred: jax.Array, tgt: jax.Array, weight: jax.Array | None = None,
                   mask: jax.Array | None = None) -> jax.Array:
  """Weighted mean squared error.

  Per example: mean over (H, W, C) of (pred - tgt)^2 (over the masked pixels when a mask is
  given), times weight[b]; then the mean over the batch.
  Args:
    pred, tgt: f32[B, H, W, C]. weight: f32[B] or None. mask: f32/bool[B, H, W, 1 or C] or None.
  Returns:
    f32[] loss.
  """
  if pred.shape != tgt.shape:
    raise ValueError(f"pred and target shapes differ: {pred.shape} vs {tgt.shape}.")
  err = jnp.square(pred.astype(jnp.float32) - tgt.astype(jnp.float32))
  axes = tuple(range(1, err.ndim))
  if mask is None:
    per_example = jnp.mean(err, axis=axes)
  else:
    m = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), err.shape)
    per_example = jnp.sum(err * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)
  if weight is not None:
    per_example = per_example * jnp.asarray(weight, jnp.float32)
  return jnp.mean(per_example)


def dmp_forward(schedule: Schedule, y: jax.Array, x: jax.Array, t) -> jax.Array:
  """DMP interpolation z_t = sqrt(alpha_bar_t) y + sqrt(1 - alpha_bar_t) x (image as noise).

  Args:
    y: f32[B, H, W, C] target. x: f32[B, H, W, C] condition image. t: int32 [B].
  """
  return q_sample(schedule, y, t, x)


def dmp_v_target(schedule: Schedule, y: jax.Array, x: jax.Array, t) -> jax.Array:
  """DMP v-target v = sqrt(alpha_bar_t) x - sqrt(1 - alpha_bar_t) y."""
  return target(schedule, y, x, t, "v_prediction")


def onestep_target(schedule: Schedule, y: jax.Array, x: jax.Array, t,
                   prediction_type: str) -> jax.Array:
  """Target of a one-step model that sees the image x as its x_t at a fixed t.

  The target is the output whose implied x0 (`onestep_x0`, with x_t = x) is exactly y:
    sample:       y                                   (Lotus)
    v_prediction: (sqrt(a) x - y) / sqrt(1 - a)       (= -y when a = alpha_bar_t = 0: GenPercept,
                                                       all-ones betas)
  so training on this target in prediction space and training on y in image space agree.
  Args:
    y: f32[B, H, W, C] target. x: f32[B, H, W, C] image (latent). t: int32 [B] or [].
  """
  if prediction_type == "epsilon":
    raise ValueError("one-step prediction needs prediction_type 'v_prediction' or 'sample': "
                     "epsilon carries no information about the target when alpha_bar = 0.")
  return convert(schedule, y, x, t, "sample", prediction_type)


def onestep_x0(schedule: Schedule, pred: jax.Array, x: jax.Array, t,
               prediction_type: str) -> jax.Array:
  """The target estimate of a one-step model: the x0 implied by `pred` with x_t = x."""
  if prediction_type == "epsilon":
    raise ValueError("one-step prediction needs prediction_type 'v_prediction' or 'sample'.")
  return pred_to_x0_eps(schedule, pred, x, t, prediction_type)[0]
