"""Samplers: DDPM, DDIM, one-step, DMP DDIM / oracle-DDIM, LCM; test-time ensembling.

Every sampler is a jitted `jax.lax.scan` over the step list: the timesteps (and the previous
timesteps) are int32 array arguments, not Python constants, so a sampler compiles once per
(batch shape, number of steps, model_fn) and has no Python work per step. The network plugs in
as `model_fn(x_t, t, *model_args) -> output` with x_t f32[B, H, W, C] and t int32[B];
`model_args` (e.g. parameters and the condition image/embeddings) are traced arguments, so new
parameters or conditions do not recompile. `model_fn` itself is a static argument (hashed by
identity): build it once and reuse it. The schedule is an argument too (its tables are traced);
a schedule built by `schedules.make` holds numpy tables that are copied to the device on every
call, so for repeated sampling put it there once: `schedule = jax.device_put(schedule)`.

Timesteps follow diffusers exactly (`ddim_timesteps`). For the step *after* t, diffusers' DDIM
does not use the next entry of its own list: it uses t - T // n (T = num_train_timesteps,
n = num_inference_steps). For `leading` spacing the two agree; for `trailing` they differ where
rounding makes the gaps unequal (n = 3: list 999, 666, 332 but steps 999->666->333->final) and for
`linspace` they differ almost everywhere (n = 10: 999 -> 899 although the list's next entry is
888). `prev_timesteps(..., rule="diffusers")` reproduces diffusers' behaviour (the default, so
pretrained checkpoints evaluated with diffusers' DDIM give the same numbers here);
`rule="next"` is the self-consistent chain. DDPM (diffusers' `previous_timestep`) uses the next
entry of the list, so `sample_ddpm` uses rule "next". LCM (`lcm_timesteps`, `sample_lcm`, as
diffusers' LCMScheduler) takes its own timesteps from the distillation schedule and re-noises to
the next list entry between steps.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dense_diffusion.diffusion import objectives
from dense_diffusion.diffusion.schedules import PREDICTION_TYPES, TIMESTEP_SPACINGS, Schedule
from dense_diffusion.registry import Registry

__all__ = [
    "ddim_timesteps", "prev_timesteps", "ddim_step", "ddpm_step", "sample_ddim", "sample_ddpm",
    "sample_onestep", "sample_dmp", "lcm_timesteps", "lcm_scalings", "lcm_step", "sample_lcm",
    "ensemble", "align_affine", "SAMPLERS", "ENSEMBLERS",
    "PREV_RULES",
]

ModelFn = Callable[..., jax.Array]


def ddim_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading",
                   steps_offset: int = 0) -> np.ndarray:
  """Descending inference timesteps, equal to diffusers' `DDIMScheduler.set_timesteps().timesteps`.

  linspace: round(linspace(0, T-1, n)) reversed.
  leading:  arange(n) * (T // n) reversed, plus steps_offset.
  trailing: round(arange(T, 0, -T/n)) - 1.
  (diffusers applies steps_offset only to `leading`; we do the same.)

  Args:
    num_train_timesteps: T.
    num_inference_steps: n in 1..T.
    spacing: "leading" | "trailing" | "linspace".
    steps_offset: added to leading timesteps (Stable Diffusion configs use 1).
  Returns:
    np.int64[n] descending timesteps, all in 0..T-1.
  """
  t_train, n = int(num_train_timesteps), int(num_inference_steps)
  if not 1 <= n <= t_train:
    raise ValueError(f"num_inference_steps must be in 1..{t_train} (num_train_timesteps), got {n}.")
  if spacing == "linspace":
    ts = np.linspace(0, t_train - 1, n).round()[::-1].copy().astype(np.int64)
  elif spacing == "leading":
    ratio = t_train // n
    ts = (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64)
    ts += int(steps_offset)
  elif spacing == "trailing":
    ratio = t_train / n
    ts = np.round(np.arange(t_train, 0, -ratio)).astype(np.int64) - 1
  else:
    raise ValueError(f"timestep spacing must be one of {list(TIMESTEP_SPACINGS)}, got {spacing!r}.")
  if ts.max() >= t_train or ts.min() < 0:
    raise ValueError(f"timesteps {ts.min()}..{ts.max()} leave 0..{t_train - 1}; lower steps_offset "
                     f"({steps_offset}) or num_inference_steps ({n}).")
  return ts


PREV_RULES: Registry[Callable[..., np.ndarray]] = Registry("prev-timestep rule")


@PREV_RULES.register("diffusers")
def _prev_diffusers(timesteps, num_train_timesteps, num_inference_steps):
  prev = np.asarray(timesteps, np.int64) - int(num_train_timesteps) // int(num_inference_steps)
  return np.where(prev >= 0, prev, -1)


@PREV_RULES.register("next")
def _prev_next(timesteps, num_train_timesteps, num_inference_steps):
  del num_train_timesteps, num_inference_steps
  ts = np.asarray(timesteps, np.int64)
  return np.concatenate([ts[1:], [-1]]).astype(np.int64)


def prev_timesteps(timesteps: np.ndarray, num_train_timesteps: int,
                   num_inference_steps: int | None = None, rule: str = "diffusers") -> np.ndarray:
  """The timestep each step goes to (-1 = the clean end), for a descending timestep list.

  Args:
    timesteps: int[S] descending.
    num_train_timesteps: T.
    num_inference_steps: n used to build the list (default: len(timesteps)).
    rule: "diffusers" (t - T // n, as DDIMScheduler.step) or "next" (the next list entry).
  Returns:
    np.int64[S].
  """
  rule_fn = PREV_RULES.get(rule)
  n = len(timesteps) if num_inference_steps is None else num_inference_steps
  return rule_fn(timesteps, num_train_timesteps, n)


def _check_prediction_type(prediction_type):
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, "
                     f"got {prediction_type!r}.")


def _alpha_prev(schedule: Schedule, t_prev, x):
  t_prev = jnp.asarray(t_prev, jnp.int32)
  table = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  a = jnp.where(t_prev >= 0, table[jnp.maximum(t_prev, 0)],
                jnp.asarray(schedule.final_alpha_cumprod, jnp.float32))
  return objectives._bcast(a, x)  # pylint: disable=protected-access


def _x0_eps(schedule, model_output, t, x_t, prediction_type, clip_sample, clip_sample_range):
  x0, eps = objectives.pred_to_x0_eps(schedule, model_output, x_t, t, prediction_type)
  if clip_sample:
    x0 = jnp.clip(x0, -clip_sample_range, clip_sample_range)
  return x0, eps


def ddim_step(schedule: Schedule, model_output: jax.Array, t, t_prev, x_t: jax.Array,
              prediction_type: str, eta: float = 0.0, noise: jax.Array | None = None, *,
              clip_sample: bool = False, clip_sample_range: float = 1.0,
              return_x0: bool = False):
  """One DDIM step from t to t_prev (DDIM eq. 12; diffusers' `DDIMScheduler.step`).

  x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise, with
  sigma = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)). t_prev < 0 means the clean
  end: a_prev = schedule.final_alpha_cumprod (1.0 = diffusers' set_alpha_to_one=True). As in
  diffusers, eps is the model's (not re-derived from a clipped x0).

  Args:
    schedule: the schedule.
    model_output: f32[B, H, W, C] network output.
    t, t_prev: int (Python or array, [] or [B]).
    x_t: f32[B, H, W, C].
    prediction_type: "epsilon" | "v_prediction" | "sample".
    eta: 0 = deterministic DDIM, 1 = DDPM-like variance.
    noise: f32[B, H, W, C] standard normal, required when eta > 0.
    clip_sample, clip_sample_range: clip predicted x0 to [-range, range].
    return_x0: also return the (clipped) predicted x0.
  Returns:
    x_prev f32[B, H, W, C], or (x_prev, x0) with return_x0.
  """
  _check_prediction_type(prediction_type)
  x0, eps = _x0_eps(schedule, model_output, t, x_t, prediction_type, clip_sample,
                    clip_sample_range)
  a_t = objectives.gather(schedule.alphas_cumprod, t, x_t)
  a_prev = _alpha_prev(schedule, t_prev, x_t)
  if _is_zero(eta):
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev) * eps
  else:
    if noise is None:
      raise ValueError("ddim_step with eta > 0 needs `noise` (standard normal, shaped like x_t).")
    variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1.0 - a_prev - std**2) * eps + std * noise
  return (x_prev, x0) if return_x0 else x_prev


def ddpm_step(schedule: Schedule, model_output: jax.Array, t, t_prev, x_t: jax.Array,
              prediction_type: str, noise: jax.Array | None = None, *, clip_sample: bool = False,
              clip_sample_range: float = 1.0, return_x0: bool = False):
  """One ancestral DDPM step (diffusers' `DDPMScheduler.step`, variance_type="fixed_small").

  With a_t, a_prev the alpha_bars at t and t_prev (a_prev = 1 for t_prev < 0) and
  beta = 1 - a_t / a_prev:
    mean = sqrt(a_prev) beta / (1 - a_t) * x0 + sqrt(a_t / a_prev) (1 - a_prev) / (1 - a_t) * x_t
    var  = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
    x_prev = mean + sqrt(var) * noise   (noise only where t > 0; none when noise is None)

  Args: as `ddim_step`; noise f32[B, H, W, C] standard normal or None (no noise: the mean).
  """
  _check_prediction_type(prediction_type)
  x0, _ = _x0_eps(schedule, model_output, t, x_t, prediction_type, clip_sample,
                  clip_sample_range)
  a_t = objectives.gather(schedule.alphas_cumprod, t, x_t)
  t_prev_arr = jnp.asarray(t_prev, jnp.int32)
  table = jnp.asarray(schedule.alphas_cumprod, jnp.float32)
  a_prev = objectives._bcast(  # pylint: disable=protected-access
      jnp.where(t_prev_arr >= 0, table[jnp.maximum(t_prev_arr, 0)], 1.0), x_t)
  beta_prod_t, beta_prod_prev = 1.0 - a_t, 1.0 - a_prev
  cur_alpha = a_t / a_prev
  cur_beta = 1.0 - cur_alpha
  mean = (jnp.sqrt(a_prev) * cur_beta / beta_prod_t) * x0 + (
      jnp.sqrt(cur_alpha) * beta_prod_prev / beta_prod_t) * x_t
  if noise is None:
    x_prev = mean
  else:
    variance = jnp.maximum(beta_prod_prev / beta_prod_t * cur_beta, 1e-20)
    has_noise = objectives._bcast(jnp.asarray(t, jnp.int32) > 0, x_t)  # pylint: disable=protected-access
    x_prev = mean + jnp.where(has_noise, jnp.sqrt(variance) * noise, 0.0)
  return (x_prev, x0) if return_x0 else x_prev


def _batch_t(t, x):
  return jnp.full((x.shape[0],), t, jnp.int32)


def _is_zero(eta) -> bool:
  """True when eta is a concrete 0 (Python, numpy or concrete jax scalar); False for tracers."""
  try:
    return float(eta) == 0.0
  except (TypeError, jax.errors.ConcretizationTypeError):
    return False


# How the per-step noise reaches the scan body (a static argument of the loops):
#   "none":  no noise (deterministic), the scanned input is a dummy f32[S];
#   "keys":  the scanned input is one PRNG key per step, noise is drawn inside the step (memory
#            O(one step), not O(steps): a 1000-step DDPM at 256x256 would otherwise hold GBs);
#   "given": the scanned input is the caller's f32[S, B, H, W, C] noise (parity tests).
def _noise_inputs(key, noise, num_steps, shape, stochastic):
  if not stochastic:
    return "none", np.zeros((num_steps,), np.float32)
  if noise is not None:
    if tuple(noise.shape) != (num_steps,) + tuple(shape):
      raise ValueError(f"noise must have shape {(num_steps,) + tuple(shape)}, got {noise.shape}.")
    return "given", noise
  if key is None:
    raise ValueError("a stochastic sampler needs `key` (or explicit `noise`).")
  return "keys", jax.random.split(key, num_steps)


def _draw(noise_mode, n, x):
  if noise_mode == "none":
    return None
  if noise_mode == "keys":
    return jax.random.normal(n, x.shape, jnp.float32)
  return n.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction_type", "clip_sample",
                                             "clip_sample_range", "noise_mode"))
def _ddim_loop(model_fn, schedule, x_start, timesteps, prev, model_args, eta, noise,
               prediction_type, clip_sample, clip_sample_range, noise_mode):
  def body(x, inputs):
    t, t_prev, n = inputs
    out = model_fn(x, _batch_t(t, x), *model_args)
    stochastic = noise_mode != "none"
    x_prev = ddim_step(schedule, out, t, t_prev, x, prediction_type,
                       eta=eta if stochastic else 0.0, noise=_draw(noise_mode, n, x),
                       clip_sample=clip_sample, clip_sample_range=clip_sample_range)
    return x_prev, None

  x, _ = jax.lax.scan(body, x_start, (timesteps, prev, noise))
  return x


def _as_steps(timesteps, prev):
  # Host-side numpy (no device dispatch per call) unless the caller passes device arrays.
  as_int = lambda a: a.astype(jnp.int32) if isinstance(a, jax.Array) else np.asarray(a, np.int32)
  ts, pv = as_int(timesteps), as_int(prev)
  if ts.ndim != 1 or ts.shape != pv.shape:
    raise ValueError(f"timesteps and prev_timesteps must be 1-D of equal length, got "
                     f"{ts.shape} and {pv.shape}.")
  return ts, pv


def sample_ddim(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, timesteps,
                prev: Any = None, *, prediction_type: str = "epsilon", eta: float = 0.0,
                key: jax.Array | None = None, noise: jax.Array | None = None,
                model_args: Sequence[Any] = (), clip_sample: bool = False,
                clip_sample_range: float = 1.0) -> jax.Array:
  """DDIM sampling loop (the loop of diffusers' DDIM pipelines, jitted as a scan).

  Args:
    model_fn: (x_t f32[B,H,W,C], t int32[B], *model_args) -> f32[B,H,W,C]; static, reuse it.
    schedule: the schedule.
    x_start: f32[B, H, W, C] the start x_T (standard normal noise for generation).
    timesteps: int[S] descending (`ddim_timesteps`).
    prev: int[S] where each step goes (`prev_timesteps`); default rule "diffusers" with
      n = S.
    prediction_type: "epsilon" | "v_prediction" | "sample".
    eta: DDIM eta; > 0 needs key or noise.
    key: PRNG key for eta > 0 (one split per step, drawn inside the loop).
    noise: f32[S, B, H, W, C] explicit per-step noise (overrides key).
    model_args: extra (traced) arguments of model_fn.
    clip_sample, clip_sample_range: clip predicted x0.
  Returns:
    f32[B, H, W, C] the sample after the last step (x0 when the last prev is -1 and
    final_alpha_cumprod = 1).
  """
  _check_prediction_type(prediction_type)
  if prev is None:
    prev = prev_timesteps(np.asarray(timesteps), schedule.num_train_timesteps)
  ts, pv = _as_steps(timesteps, prev)
  stochastic = noise is not None or not _is_zero(eta)
  noise_mode, noise_in = _noise_inputs(key, noise, ts.shape[0], x_start.shape, stochastic)
  eta_in = np.float32(eta) if isinstance(eta, (int, float)) else eta
  return _ddim_loop(model_fn, schedule, x_start, ts, pv, tuple(model_args), eta_in, noise_in,
                    prediction_type, bool(clip_sample), float(clip_sample_range), noise_mode)


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction_type", "clip_sample",
                                             "clip_sample_range", "noise_mode"))
def _ddpm_loop(model_fn, schedule, x_start, timesteps, prev, model_args, noise, prediction_type,
               clip_sample, clip_sample_range, noise_mode):
  def body(x, inputs):
    t, t_prev, n = inputs
    out = model_fn(x, _batch_t(t, x), *model_args)
    return ddpm_step(schedule, out, t, t_prev, x, prediction_type,
                     noise=_draw(noise_mode, n, x), clip_sample=clip_sample,
                     clip_sample_range=clip_sample_range), None

  x, _ = jax.lax.scan(body, x_start, (timesteps, prev, noise))
  return x


def sample_ddpm(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, timesteps, *,
                prediction_type: str = "epsilon", key: jax.Array | None = None,
                noise: jax.Array | None = None, model_args: Sequence[Any] = (),
                clip_sample: bool = False, clip_sample_range: float = 1.0) -> jax.Array:
  """Ancestral DDPM sampling over `timesteps` (each step goes to the next entry, then clean).

  Args: as `sample_ddim`; timesteps int[S] descending (all T steps: `np.arange(T)[::-1]`, or a
    spaced list from `ddim_timesteps`, which is how diffusers' DDPMScheduler spaces them too);
    key (split per step, noise drawn inside the loop) or noise f32[S, B, H, W, C] required.
  Returns:
    f32[B, H, W, C].
  """
  _check_prediction_type(prediction_type)
  prev = prev_timesteps(np.asarray(timesteps), schedule.num_train_timesteps, rule="next")
  ts, pv = _as_steps(timesteps, prev)
  noise_mode, noise_in = _noise_inputs(key, noise, ts.shape[0], x_start.shape, True)
  return _ddpm_loop(model_fn, schedule, x_start, ts, pv, tuple(model_args), noise_in,
                    prediction_type, bool(clip_sample), float(clip_sample_range), noise_mode)


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction_type", "clip_sample",
                                             "clip_sample_range"))
def _onestep(model_fn, schedule, image, t, model_args, prediction_type, clip_sample,
             clip_sample_range):
  tb = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (image.shape[0],))
  out = model_fn(image, tb, *model_args)
  x0 = objectives.onestep_x0(schedule, out, image, tb, prediction_type)
  return jnp.clip(x0, -clip_sample_range, clip_sample_range) if clip_sample else x0


def sample_onestep(model_fn: ModelFn, schedule: Schedule, image: jax.Array, t: int | None = None,
                   *, prediction_type: str = "v_prediction", model_args: Sequence[Any] = (),
                   clip_sample: bool = False, clip_sample_range: float = 1.0) -> jax.Array:
  """One-step deterministic prediction (GenPercept / Lotus): one model call at a fixed t.

  The image (latent) is the model's x_t; the target estimate is the x0 implied by the output:
  with the all-ones schedule (alpha_bar = 0) and v-prediction it is -v (GenPercept); with
  `sample` prediction it is the output itself (Lotus, t = T-1).
  Args:
    image: f32[B, H, W, C]. t: the fixed timestep (default T-1).
  Returns:
    f32[B, H, W, C] target estimate.
  """
  if t is None:
    t = schedule.num_train_timesteps - 1
  t = t.astype(jnp.int32) if isinstance(t, jax.Array) else np.int32(t)
  return _onestep(model_fn, schedule, image, t, tuple(model_args),
                  prediction_type, bool(clip_sample), float(clip_sample_range))


@functools.partial(jax.jit, static_argnames=("model_fn", "oracle", "clip_sample",
                                             "clip_sample_range"))
def _dmp_loop(model_fn, schedule, image, timesteps, prev, model_args, oracle, clip_sample,
              clip_sample_range):
  def body(carry, inputs):
    z, _ = carry
    t, t_prev = inputs
    v = model_fn(z, _batch_t(t, z), *model_args)
    y_hat, x_hat = _x0_eps(schedule, v, t, z, "v_prediction", clip_sample, clip_sample_range)
    if oracle:
      x_hat = image
    a_prev = _alpha_prev(schedule, t_prev, z)
    z_prev = jnp.sqrt(a_prev) * y_hat + jnp.sqrt(1.0 - a_prev) * x_hat
    return (z_prev, y_hat), None

  (_, y), _ = jax.lax.scan(body, (image, jnp.zeros_like(image)), (timesteps, prev))
  return y


def sample_dmp(model_fn: ModelFn, schedule: Schedule, image: jax.Array, timesteps,
               prev: Any = None, *, oracle: bool = False, model_args: Sequence[Any] = (),
               clip_sample: bool = False, clip_sample_range: float = 1.0) -> jax.Array:
  """DMP interpolation sampling: DDIM (eta 0, v-prediction) starting from z_T = image.

  Each step predicts y_hat = a z - s v and x_hat = s z + a v, then
  z_prev = sqrt(a_prev) y_hat + sqrt(1 - a_prev) x_hat. The oracle variant uses the known image
  instead of x_hat. Starting at the image assumes alpha_bar at the first timestep is ~0 (SD:
  alpha_bar_999 ~ 0.0047).
  Args:
    image: f32[B, H, W, C] the condition image (latent). timesteps, prev: as `sample_ddim`.
    oracle: re-build z_prev from the known image.
  Returns:
    f32[B, H, W, C] y_hat of the last step.
  """
  if prev is None:
    prev = prev_timesteps(np.asarray(timesteps), schedule.num_train_timesteps)
  ts, pv = _as_steps(timesteps, prev)
  return _dmp_loop(model_fn, schedule, image, ts, pv, tuple(model_args), bool(oracle),
                   bool(clip_sample), float(clip_sample_range))


# ---------------------------------------------------------------------------------------------
# Latent consistency models (diffusers' LCMScheduler).


def lcm_timesteps(num_train_timesteps: int, num_inference_steps: int,
                  original_inference_steps: int = 50, strength: float = 1.0) -> np.ndarray:
  """Descending LCM timesteps, equal to diffusers' `LCMScheduler.set_timesteps().timesteps`.

  The distillation schedule is every k-th training step, k = T // original_inference_steps
  (k - 1, 2k - 1, ..., original_inference_steps * k - 1); inference takes n of its entries,
  evenly spaced in index from the noisiest one (floor(linspace(0, len, n, endpoint=False))).
  `timestep_spacing` and `steps_offset` of the config play no part (as in diffusers).

  Args:
    num_train_timesteps: T.
    num_inference_steps: n, at most original_inference_steps * strength.
    original_inference_steps: the distillation schedule's length (the config's
      `original_inference_steps`, 50 by default).
    strength: fraction of the distillation schedule used (1 = all of it).
  Returns:
    np.int64[n] descending timesteps in 0..T-1.
  """
  t_train, n = int(num_train_timesteps), int(num_inference_steps)
  original = int(original_inference_steps)
  if not 1 <= original <= t_train:
    raise ValueError(f"original_inference_steps must be in 1..{t_train} (num_train_timesteps), "
                     f"got {original}.")
  origin = np.arange(1, int(original * strength) + 1, dtype=np.int64) * (t_train // original) - 1
  if not 1 <= n <= len(origin):
    raise ValueError(f"num_inference_steps must be in 1..{len(origin)} (original_inference_steps "
                     f"x strength), got {n}.")
  origin = origin[::-1]
  index = np.floor(np.linspace(0, len(origin), num=n, endpoint=False)).astype(np.int64)
  return origin[index].copy()


def lcm_scalings(t, timestep_scaling: float = 10.0, sigma_data: float = 0.5):
  """Consistency-model boundary scalings (c_skip, c_out) at discrete timesteps t.

  With u = t * timestep_scaling: c_skip = sigma_data^2 / (u^2 + sigma_data^2),
  c_out = u / sqrt(u^2 + sigma_data^2) (float32, as diffusers computes them from the int64 t).
  """
  u = jnp.asarray(t, jnp.float32) * jnp.float32(timestep_scaling)
  sd2 = jnp.float32(sigma_data) ** 2
  return sd2 / (u * u + sd2), u / jnp.sqrt(u * u + sd2)


def lcm_step(schedule: Schedule, model_output: jax.Array, t, t_next, x_t: jax.Array,
             prediction_type: str, noise: jax.Array | None = None, *,
             timestep_scaling: float = 10.0, clip_sample: bool = False,
             clip_sample_range: float = 1.0, return_denoised: bool = False):
  """One LCM step (diffusers' `LCMScheduler.step`).

  denoised = c_out(t) * x0 + c_skip(t) * x_t (x0 from the model output, clipped when asked).
  Unless this is the last step (t_next < 0), the next sample re-noises it to t_next:
  x_next = sqrt(a_next) * denoised + sqrt(1 - a_next) * noise; the last step returns denoised.

  Args:
    schedule: the schedule.
    model_output: f32[B, H, W, C].
    t: int (Python or array, [] or [B]) the current timestep.
    t_next: the next timestep of the list, or -1 at the last step.
    x_t: f32[B, H, W, C].
    prediction_type: "epsilon" | "v_prediction" | "sample".
    noise: f32[B, H, W, C] standard normal; required unless t_next < 0 (a concrete -1).
    timestep_scaling: the config's `timestep_scaling` (10 in diffusers).
    clip_sample, clip_sample_range: clip predicted x0.
    return_denoised: also return the denoised sample.
  Returns:
    x_next f32[B, H, W, C], or (x_next, denoised).
  """
  _check_prediction_type(prediction_type)
  x0, _ = _x0_eps(schedule, model_output, t, x_t, prediction_type, clip_sample,
                  clip_sample_range)
  bcast = objectives._bcast  # pylint: disable=protected-access
  c_skip, c_out = lcm_scalings(t, timestep_scaling)
  denoised = bcast(c_out, x_t) * x0 + bcast(c_skip, x_t) * x_t
  if noise is None:
    if not _is_last(t_next):
      raise ValueError("lcm_step before the last step needs `noise` (standard normal, shaped "
                       "like x_t).")
    x_next = denoised
  else:
    a_next = _alpha_prev(schedule, t_next, x_t)
    renoised = jnp.sqrt(a_next) * denoised + jnp.sqrt(1.0 - a_next) * noise
    last = bcast(jnp.asarray(t_next, jnp.int32) < 0, x_t)
    x_next = jnp.where(last, denoised, renoised)
  return (x_next, denoised) if return_denoised else x_next


def _is_last(t_next) -> bool:
  """True when t_next is a concrete negative number (the last step)."""
  try:
    return bool(np.all(np.asarray(t_next) < 0))
  except (TypeError, jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
    return False


@functools.partial(jax.jit, static_argnames=("model_fn", "prediction_type", "timestep_scaling",
                                             "clip_sample", "clip_sample_range", "noise_mode"))
def _lcm_loop(model_fn, schedule, x_start, timesteps, nxt, model_args, noise, prediction_type,
              timestep_scaling, clip_sample, clip_sample_range, noise_mode):
  def body(x, inputs):
    t, t_next, n = inputs
    out = model_fn(x, _batch_t(t, x), *model_args)
    drawn = _draw(noise_mode, n, x)
    return lcm_step(schedule, out, t, t_next, x, prediction_type,
                    noise=jnp.zeros_like(x) if drawn is None else drawn,
                    timestep_scaling=timestep_scaling, clip_sample=clip_sample,
                    clip_sample_range=clip_sample_range), None

  x, _ = jax.lax.scan(body, x_start, (timesteps, nxt, noise))
  return x


def sample_lcm(model_fn: ModelFn, schedule: Schedule, x_start: jax.Array, timesteps, *,
               prediction_type: str = "epsilon", timestep_scaling: float = 10.0,
               key: jax.Array | None = None, noise: jax.Array | None = None,
               model_args: Sequence[Any] = (), clip_sample: bool = False,
               clip_sample_range: float = 1.0) -> jax.Array:
  """Multi-step LCM sampling (the loop of diffusers' LCM pipelines, jitted as a scan).

  Each step maps x_t to the consistency estimate `denoised` and, except after the last step,
  re-noises it to the next timestep of the list with fresh standard-normal noise; one step is
  deterministic. diffusers draws that noise from its torch generator: pass the same draws as
  `noise` to reproduce a diffusers run exactly.

  Args:
    model_fn, schedule, model_args, clip_sample, clip_sample_range: as `sample_ddim`.
    x_start: f32[B, H, W, C].
    timesteps: int[S] descending (`lcm_timesteps`).
    prediction_type: "epsilon" | "v_prediction" | "sample".
    timestep_scaling: the config's `timestep_scaling`.
    key: PRNG key for the re-noising (one split per step, drawn inside the loop).
    noise: f32[S - 1, B, H, W, C] explicit re-noising draws, one per step but the last
      (overrides key). Neither is needed when S = 1.
  Returns:
    f32[B, H, W, C] the denoised sample of the last step.
  """
  _check_prediction_type(prediction_type)
  ts = np.asarray(timesteps, np.int32) if not isinstance(timesteps, jax.Array) else (
      timesteps.astype(jnp.int32))
  if ts.ndim != 1 or ts.shape[0] < 1:
    raise ValueError(f"timesteps must be 1-D and non-empty, got shape {ts.shape}.")
  steps = ts.shape[0]
  nxt = np.asarray(np.concatenate([np.asarray(ts[1:]), [-1]]), np.int32)
  if noise is not None:
    want = (steps - 1,) + tuple(x_start.shape)
    if tuple(noise.shape) != want:
      raise ValueError(f"noise must have shape {want} (one draw per step but the last), got "
                       f"{tuple(noise.shape)}.")
    noise = jnp.concatenate([jnp.asarray(noise, jnp.float32),
                             jnp.zeros((1,) + tuple(x_start.shape), jnp.float32)])
  noise_mode, noise_in = _noise_inputs(key, noise, steps, x_start.shape, steps > 1)
  return _lcm_loop(model_fn, schedule, x_start, ts, nxt, tuple(model_args), noise_in,
                   prediction_type, float(timestep_scaling), bool(clip_sample),
                   float(clip_sample_range), noise_mode)


SAMPLERS: Registry[Callable] = Registry("sampler")
SAMPLERS.register("ddim", sample_ddim)
SAMPLERS.register("ddpm", sample_ddpm)
SAMPLERS.register("onestep", sample_onestep)
SAMPLERS.register("dmp", sample_dmp)
SAMPLERS.register("dmp_oracle", functools.partial(sample_dmp, oracle=True))
SAMPLERS.register("lcm", sample_lcm)


# ---------------------------------------------------------------------------------------------
# Test-time ensembling.


def align_affine(pred: jax.Array, ref: jax.Array, mask: jax.Array | None = None,
                 eps: float = 1e-8) -> jax.Array:
  """Least-squares scale s and shift b per example so that s * pred + b ~ ref; returns it.

  Args:
    pred, ref: f32[B, H, W, C]. mask: optional [B, H, W, 1 or C] pixels to fit on.
  Returns:
    f32[B, H, W, C] s * pred + b (s, b per example).
  """
  axes = tuple(range(1, pred.ndim))
  m = jnp.ones_like(pred) if mask is None else jnp.broadcast_to(
      jnp.asarray(mask, pred.dtype), pred.shape)
  cnt = jnp.maximum(jnp.sum(m, axis=axes, keepdims=True), 1.0)
  mp = jnp.sum(m * pred, axis=axes, keepdims=True) / cnt
  mr = jnp.sum(m * ref, axis=axes, keepdims=True) / cnt
  cov = jnp.sum(m * (pred - mp) * (ref - mr), axis=axes, keepdims=True)
  var = jnp.sum(m * jnp.square(pred - mp), axis=axes, keepdims=True)
  s = jnp.where(var > eps, cov / jnp.where(var > eps, var, 1.0), 1.0)
  return s * (pred - mp) + mr


ENSEMBLERS: Registry[Callable] = Registry("ensemble kind")


@ENSEMBLERS.register("mean")
def _ensemble_mean(samples, mask=None, iterations=0):
  del mask, iterations
  return jnp.mean(samples, axis=0)


@ENSEMBLERS.register("depth_affine")
def _ensemble_depth_affine(samples, mask=None, iterations=3):
  """Marigold-style: align each member (scale + shift) to the per-pixel median, then average.

  One iteration = fit every member to the current reference by least squares, then take the
  median of the aligned members as the new reference. We iterate (default 3) instead of
  Marigold's joint optimisation: with members that are affine copies of one depth map whose
  per-pixel order does not change, one pass is already exact; iterating tightens the reference
  when members cross. The result is the mean of the aligned members (in the frame of the median
  member).
  """
  ref = jnp.median(samples, axis=0)
  aligned = samples
  for _ in range(max(int(iterations), 1)):
    aligned = jax.vmap(lambda p: align_affine(p, ref, mask))(samples)
    ref = jnp.median(aligned, axis=0)
  return jnp.mean(aligned, axis=0)


def ensemble(samples: jax.Array, kind: str = "mean", mask: jax.Array | None = None,
             iterations: int = 3) -> jax.Array:
  """Combines N samples of the same inputs.

  Args:
    samples: f32[N, B, H, W, C].
    kind: "mean" (plain average: normals, segmentation colours, restoration) or "depth_affine"
      (per-member least-squares scale/shift alignment to the median, then mean; Marigold).
    mask: optional valid-pixel mask [B, H, W, 1 or C] for the alignment fit.
    iterations: alignment passes for depth_affine.
  Returns:
    f32[B, H, W, C].
  """
  ensembler = ENSEMBLERS.get(kind)
  if samples.ndim < 2:
    raise ValueError(f"samples must be [N, B, ...], got shape {samples.shape}.")
  return ensembler(samples, mask=mask, iterations=iterations)
