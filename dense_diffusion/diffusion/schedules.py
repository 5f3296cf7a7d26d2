"""Noise schedules: beta tables with the same numbers as diffusers' DDPM/DDIM schedulers.

A schedule is a frozen dataclass registered as a JAX pytree: its tables are leaves (so a jitted
sampler takes them as arguments instead of baking them in as constants), its kind and length are
static metadata.

Numerics follow diffusers' dtype path exactly: betas are float32 (diffusers builds them with
`torch.linspace(..., dtype=float32)` or, for the cosine schedule, in Python floats then casts to
float32), the zero-terminal-SNR rescale runs in float32, and the cumulative product accumulates in
float64 and rounds to float32 (what `torch.cumprod` does on CPU). The linspace is
reproduced with torch's float32 algorithm (`_linspace_f32`), so `alphas_cumprod` agrees with
`DDPMScheduler.alphas_cumprod` to float32 rounding (tested to 1e-6).

Derived tables (sqrt tables, SNR) are computed in float64 from the float32 `alphas_cumprod` and
then stored as float32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dense_diffusion import errors
from dense_diffusion.registry import Registry

__all__ = [
    "Schedule", "SchedulerConfig", "make", "from_betas", "from_alphas_cumprod",
    "rescale_zero_terminal_snr", "shift_snr_for_resolution", "from_diffusers_config", "KINDS",
]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Schedule:
  """Discrete diffusion schedule over `num_train_timesteps` steps t = 0..T-1.

  Attributes (all float32 arrays of shape [T] unless noted):
    betas: beta_t.
    alphas: 1 - beta_t.
    alphas_cumprod: alpha_bar_t = prod_{s<=t} alpha_s (signal variance at step t).
    sqrt_alphas_cumprod: sqrt(alpha_bar_t).
    sqrt_one_minus_alphas_cumprod: sqrt(1 - alpha_bar_t).
    snr: alpha_bar_t / (1 - alpha_bar_t) (inf where alpha_bar_t == 1, 0 where it is 0).
    final_alpha_cumprod: f32[] alpha_bar used for "t_prev < 0" (the clean end of a sampler).
      1.0 (diffusers' `set_alpha_to_one=True`) unless built from a config that says otherwise.
    kind: static; the name of the beta schedule.
    num_train_timesteps: static; T.
  """
  betas: Any
  alphas: Any
  alphas_cumprod: Any
  sqrt_alphas_cumprod: Any
  sqrt_one_minus_alphas_cumprod: Any
  snr: Any
  final_alpha_cumprod: Any
  kind: str = dataclasses.field(default="custom", metadata=dict(static=True))
  num_train_timesteps: int = dataclasses.field(default=1000, metadata=dict(static=True))

  @property
  def log_snr(self) -> np.ndarray:
    """f32[T] log(alpha_bar / (1 - alpha_bar)) (+-inf at the ends of zero/one alpha_bar)."""
    with np.errstate(divide="ignore"):
      return np.log(np.asarray(self.snr, np.float64)).astype(np.float32)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """float32 linspace computed like torch.linspace(start, end, steps, dtype=float32) on CPU.

  torch computes `step = (end - start) / (steps - 1)` in float32 and fills the first half as
  `start + step * i`, the second half as `end - step * (steps - 1 - i)`, each with a fused
  multiply-add (one rounding to float32 at the end; reproduced here by evaluating in float64,
  where the product and sum are exact, then rounding once). Matching it keeps our betas
  bit-identical to diffusers'.
  """
  if steps == 1:
    return np.array([start], np.float32)
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float32((end32 - start32) / np.float32(steps - 1))
  i = np.arange(steps, dtype=np.float64)
  s64, e64, step64 = np.float64(start32), np.float64(end32), np.float64(step)
  out = np.where(i < steps // 2, s64 + step64 * i, e64 - step64 * (steps - 1 - i))
  return out.astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
  """Cumulative product of a float32 vector as torch does on CPU: accumulated in float64, each
  partial product rounded to float32 (torch's CPU accumulation type for float is double)."""
  return np.cumprod(np.asarray(x, np.float32).astype(np.float64)).astype(np.float32)


KINDS: Registry[Callable[..., np.ndarray]] = Registry("schedule kind")


@KINDS.register("linear")
def _linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  return _linspace_f32(beta_start, beta_end, num_train_timesteps)


@KINDS.register("scaled_linear")
def _scaled_linear(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  # Latent-diffusion schedule: linear in sqrt(beta), squared (in float32, as diffusers).
  b = _linspace_f32(beta_start**0.5, beta_end**0.5, num_train_timesteps)
  return (b * b).astype(np.float32)


@KINDS.register("squaredcos_cap_v2")
def _squaredcos_cap_v2(num_train_timesteps: int, beta_start: float, beta_end: float,
                       max_beta: float = 0.999) -> np.ndarray:
  """Cosine schedule of Nichol & Dhariwal (GLIDE): alpha_bar(s) = cos((s + 0.008)/1.008 * pi/2)^2.

  beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), in Python floats (float64),
  cast to float32 -- the same path as diffusers' `betas_for_alpha_bar`. beta_start/beta_end are
  ignored (as in diffusers).
  """
  del beta_start, beta_end

  def alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

  t = num_train_timesteps
  betas = [min(1 - alpha_bar((i + 1) / t) / alpha_bar(i / t), max_beta) for i in range(t)]
  return np.asarray(betas, np.float64).astype(np.float32)


@KINDS.register("ones")
def _ones(num_train_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
  """All betas 1, so alpha_bar = 0 at every t: GenPercept's one-step schedule.

  With it the "noisy" input is the image itself and the v-target is minus the target.
  """
  del beta_start, beta_end
  return np.ones(num_train_timesteps, np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
  """Rescale betas so the last step has zero SNR (Lin et al. 2023, Algorithm 1), float32 path.

  sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first value is unchanged.
  Args:
    betas: f32[T].
  Returns:
    f32[T] new betas (the last one is exactly 1).
  """
  betas = np.asarray(betas, np.float32)
  alphas_cumprod = _cumprod_f32(np.float32(1.0) - betas)
  sq = np.sqrt(alphas_cumprod).astype(np.float32)
  sq0, sq_t = sq[0].copy(), sq[-1].copy()
  sq = sq - sq_t
  sq = sq * (sq0 / (sq0 - sq_t))
  ab = (sq * sq).astype(np.float32)
  alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]]).astype(np.float32)
  return (np.float32(1.0) - alphas).astype(np.float32)


def from_alphas_cumprod(alphas_cumprod: np.ndarray, *, betas: np.ndarray | None = None,
                        kind: str = "custom", final_alpha_cumprod: float = 1.0) -> Schedule:
  """Builds the derived tables from alpha_bar (f32[T] in [0, 1], non-increasing)."""
  ac = np.asarray(alphas_cumprod, np.float32)
  if ac.ndim != 1 or ac.size == 0:
    raise ValueError(f"alphas_cumprod must be a non-empty 1-D array, got shape {ac.shape}.")
  if np.any(ac < 0) or np.any(ac > 1) or np.any(np.isnan(ac)):
    raise ValueError("alphas_cumprod must lie in [0, 1]; check the betas (each in [0, 1]).")
  if betas is None:
    prev = np.concatenate([[1.0], ac[:-1].astype(np.float64)])
    with np.errstate(divide="ignore", invalid="ignore"):
      betas = np.where(prev > 0, 1.0 - ac / prev, 1.0)
  betas = np.asarray(betas, np.float32)
  ac64 = ac.astype(np.float64)
  with np.errstate(divide="ignore"):
    snr = np.where(ac64 < 1, ac64 / np.maximum(1.0 - ac64, 0.0), np.inf)
  return Schedule(
      betas=betas,
      alphas=(np.float32(1.0) - betas).astype(np.float32),
      alphas_cumprod=ac,
      sqrt_alphas_cumprod=np.sqrt(ac64).astype(np.float32),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac64).astype(np.float32),
      snr=snr.astype(np.float32),
      final_alpha_cumprod=np.float32(final_alpha_cumprod),
      kind=kind,
      num_train_timesteps=int(ac.size),
  )


def from_betas(betas: np.ndarray, *, kind: str = "custom", rescale_betas_zero_snr: bool = False,
               final_alpha_cumprod: float = 1.0) -> Schedule:
  """Schedule from a beta table f32[T] (e.g. a config's `trained_betas`)."""
  betas = np.asarray(betas, np.float32)
  if betas.ndim != 1 or betas.size == 0:
    raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
  if np.any(betas < 0) or np.any(betas > 1):
    raise ValueError("every beta must lie in [0, 1].")
  if rescale_betas_zero_snr:
    betas = rescale_zero_terminal_snr(betas)
  ac = _cumprod_f32(np.float32(1.0) - betas)
  return from_alphas_cumprod(ac, betas=betas, kind=kind, final_alpha_cumprod=final_alpha_cumprod)


def make(kind: str = "linear", num_train_timesteps: int = 1000, beta_start: float = 0.0001,
         beta_end: float = 0.02, *, rescale_betas_zero_snr: bool = False,
         final_alpha_cumprod: float = 1.0) -> Schedule:
  """Builds a named schedule.

  Args:
    kind: one of KINDS: linear, scaled_linear (Stable Diffusion), squaredcos_cap_v2 (cosine),
      ones (all betas 1: GenPercept one-step).
    num_train_timesteps: T.
    beta_start, beta_end: first/last beta of the (scaled) linear schedules. Defaults are
      diffusers' (DDPM: 1e-4, 0.02); Stable Diffusion uses scaled_linear with (0.00085, 0.012).
    rescale_betas_zero_snr: apply `rescale_zero_terminal_snr` (alpha_bar_{T-1} = 0).
    final_alpha_cumprod: alpha_bar used at the clean end (t_prev < 0) of DDIM; 1.0 = diffusers'
      set_alpha_to_one=True.
  Returns:
    Schedule.
  """
  betas_fn = KINDS.get(kind)
  if int(num_train_timesteps) < 1:
    raise errors.ConfigError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}.")
  betas = betas_fn(int(num_train_timesteps), beta_start, beta_end)
  return from_betas(betas, kind=kind, rescale_betas_zero_snr=rescale_betas_zero_snr,
                    final_alpha_cumprod=final_alpha_cumprod)


def shift_snr_for_resolution(schedule: Schedule, resolution: int,
                             base_resolution: int = 64) -> Schedule:
  """Shifts the SNR for training at another resolution (simple diffusion, Hoogeboom et al. 2023).

  log SNR'(t) = log SNR(t) + 2 * log(base_resolution / resolution), i.e.
  SNR'(t) = SNR(t) * (base_resolution / resolution)^2, and alpha_bar' = SNR' / (1 + SNR').
  A schedule designed at `base_resolution` (default 64x64, the reference of simple diffusion) is
  noisier at every step when used at a larger resolution, compensating for the stronger
  correlation between neighbouring pixels. resolution == base_resolution is the identity;
  alpha_bar = 0 (zero terminal SNR) stays 0. Intended for pixel-space training from scratch, not
  for pretrained latent checkpoints (keep their schedule as it is).

  Args:
    schedule: the schedule at base_resolution.
    resolution: the training resolution (side in pixels).
    base_resolution: the resolution the schedule was designed for.
  Returns:
    A new Schedule (kind "<kind>@<resolution>"), betas re-derived from alpha_bar'.
  """
  if resolution <= 0 or base_resolution <= 0:
    raise errors.ConfigError(
        f"resolutions must be positive, got {resolution} and {base_resolution}.")
  factor = (float(base_resolution) / float(resolution)) ** 2
  ac = np.asarray(schedule.alphas_cumprod, np.float64)
  snr = np.asarray(schedule.snr, np.float64)
  with np.errstate(invalid="ignore"):
    shifted = np.where(np.isinf(snr), 1.0, snr * factor / (1.0 + snr * factor))
  shifted = np.where(ac == 0, 0.0, shifted)
  return from_alphas_cumprod(shifted.astype(np.float32),
                             kind=f"{schedule.kind}@{resolution}",
                             final_alpha_cumprod=float(schedule.final_alpha_cumprod))


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """What a diffusers `scheduler_config.json` says, in our terms.

  Attributes:
    schedule: the noise schedule.
    prediction_type: "epsilon" | "v_prediction" | "sample".
    timestep_spacing: "leading" | "trailing" | "linspace".
    steps_offset: added to leading-spaced timesteps.
    clip_sample: whether the sampler clips predicted x0 to [-clip_sample_range, clip_sample_range].
    clip_sample_range: the clipping range.
    class_name: the diffusers class the file was written for ("DDIMScheduler", "LCMScheduler",
      ...); it chooses the defaults of missing keys and, for pipelines, the sampler.
    original_inference_steps: LCM only: length of the distillation timestep schedule.
    timestep_scaling: LCM only: the boundary-condition timestep scale.
  """
  schedule: Schedule
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  class_name: str | None = None
  original_inference_steps: int = 50
  timestep_scaling: float = 10.0


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# Keys that do not change the numbers of the DDPM/DDIM maths we implement, so reading them is
# safe whatever their value. Anything else unknown raises.
_IGNORED_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values",
    "skip_prk_steps",  # PNDM-only: we never run PRK steps.
    "sample_max_value", "dynamic_thresholding_ratio",  # only used with thresholding (rejected).
    "timestep_type", "interpolation_type", "final_sigmas_type", "sigma_min", "sigma_max",
})
# Defaults of keys a config may leave out, per diffusers class (those of DDIMScheduler /
# DDPMScheduler unless the class says otherwise).
_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
             "beta_schedule": "linear", "clip_sample": True}
_CLASS_DEFAULTS = {
    "LCMScheduler": {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                     "clip_sample": False},
}
# Keys with the only value we support (anything else raises naming the key).
_REQUIRED_VALUES = {
    "thresholding": (False,),
    "variance_type": ("fixed_small", None),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "clip_sample_range_max": (None,),
    "rescale_betas_zero_snr_legacy": (False, None),
}


def from_diffusers_config(config: Mapping[str, Any]) -> SchedulerConfig:
  """Reads a diffusers scheduler config (the dict of `scheduler_config.json`).

  Known keys: num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
  prediction_type, timestep_spacing, steps_offset, set_alpha_to_one, rescale_betas_zero_snr,
  clip_sample, clip_sample_range, original_inference_steps and timestep_scaling (LCM), plus keys
  that do not affect DDPM/DDIM/LCM numbers (see `_IGNORED_KEYS`) and keys whose only supported
  value is their default (thresholding=False, variance_type="fixed_small", no
  Karras/exponential/beta sigmas). Defaults of missing keys are those of the diffusers class
  named by `_class_name` (DDIMScheduler's unless it names LCMScheduler).

  Raises:
    ConfigError: naming the key, for unsupported values or unknown keys.
  """
  cfg = dict(config)
  known = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
           "prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one",
           "rescale_betas_zero_snr", "clip_sample", "clip_sample_range",
           "original_inference_steps", "timestep_scaling"}
  for key, value in cfg.items():
    if key in known or key in _IGNORED_KEYS:
      continue
    if key in _REQUIRED_VALUES:
      if value not in _REQUIRED_VALUES[key]:
        raise errors.ConfigError(
            f"scheduler config key {key!r} = {value!r} is not supported; supported: "
            f"{[v for v in _REQUIRED_VALUES[key] if v is not None]}.")
      continue
    raise errors.ConfigError(
        f"unknown scheduler config key {key!r} (value {value!r}); remove it or add "
        "support for it in dense_diffusion/diffusion/schedules.py.")

  defaults = {**_DEFAULTS, **_CLASS_DEFAULTS.get(cfg.get("_class_name"), {})}
  cfg = {**defaults, **cfg}
  t = int(cfg["num_train_timesteps"])
  kind = cfg["beta_schedule"]
  trained = cfg.get("trained_betas")
  final = 1.0
  set_alpha_to_one = bool(cfg.get("set_alpha_to_one", True))
  rescale = bool(cfg.get("rescale_betas_zero_snr", False))
  if trained is not None:
    schedule = from_betas(np.asarray(trained, np.float32), kind="trained",
                          rescale_betas_zero_snr=rescale)
    if schedule.num_train_timesteps != t and "num_train_timesteps" in cfg:
      raise errors.ConfigError(
          f"scheduler config key 'trained_betas' has {schedule.num_train_timesteps} "
          f"entries but num_train_timesteps is {t}.")
  else:
    if kind not in KINDS or kind == "ones":
      raise errors.ConfigError(
          f"scheduler config key 'beta_schedule' = {kind!r} is not supported; "
          f"supported: {[k for k in KINDS if k != 'ones']}.")
    schedule = make(kind, t, float(cfg["beta_start"]), float(cfg["beta_end"]),
                    rescale_betas_zero_snr=rescale)
  if not set_alpha_to_one:
    final = float(schedule.alphas_cumprod[0])
    schedule = dataclasses.replace(schedule, final_alpha_cumprod=np.float32(final))

  prediction_type = cfg.get("prediction_type", "epsilon")
  if prediction_type not in PREDICTION_TYPES:
    raise errors.ConfigError(
        f"scheduler config key 'prediction_type' = {prediction_type!r} is not "
        f"supported; supported: {list(PREDICTION_TYPES)}.")
  spacing = cfg.get("timestep_spacing", "leading")
  if spacing not in TIMESTEP_SPACINGS:
    raise errors.ConfigError(
        f"scheduler config key 'timestep_spacing' = {spacing!r} is not supported; "
        f"supported: {list(TIMESTEP_SPACINGS)}.")
  return SchedulerConfig(
      schedule=schedule,
      prediction_type=prediction_type,
      timestep_spacing=spacing,
      steps_offset=int(cfg.get("steps_offset", 0)),
      clip_sample=bool(cfg["clip_sample"]),
      clip_sample_range=float(cfg.get("clip_sample_range", 1.0)),
      class_name=cfg.get("_class_name"),
      original_inference_steps=int(cfg.get("original_inference_steps", 50)),
      timestep_scaling=float(cfg.get("timestep_scaling", 10.0)),
  )
