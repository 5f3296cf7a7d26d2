"""The paradigm unit: one way of re-using a diffusion prior, owning its loss and its inference.

A paradigm is a class registered under its name (`config.diffusion.mode`); an experiment builds
one from the run's `DiffusionConfig` and noise schedule and calls only these methods:

  add_modules(model, model_config, rngs)   the modules it adds to the model (default: none)
  loss(model, batch, key)                  -> (f32[B] per-example loss, aux): what the train
                                           step minimises (after the per-task loss weights)
  predict(model, image, task, key)         -> f32[B, H, W, C] the RGB-encoded answers

`model` is the network (`GeneralistModel`: `model(x_t, t, image, task)`), `batch` a training
batch `{"image": f32[B, H, W, 3] in [-1, 1], "target": f32[B, H, W, C] (the task encodings),
"valid": bool[B, H, W, 1] (pixels whose answer is known), "task": i32[B]}`. A paradigm never
trains on unknown pixels: `masked_target` replaces them by 0 before anything sees the target
(so their content cannot leak through the network's input), and `masked_mse` leaves them out.

The train step, the evaluator and the predictor contain no paradigm-specific code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from dense_diffusion import errors
from dense_diffusion import registry
from dense_diffusion.diffusion import objectives
from dense_diffusion.diffusion import samplers
from dense_diffusion.diffusion.schedules import PREDICTION_TYPES, Schedule


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Settings of a paradigm (defaults in brackets).

  Attributes:
    mode: the paradigm: generalist | onestep | dmp ["generalist"].
    prediction_type: epsilon | v_prediction | sample ["epsilon"]; dmp needs v_prediction,
      onestep v_prediction or sample.
    sampler: generalist only: ddim | ddpm ["ddim"].
    num_inference_steps: steps of ddim/ddpm/dmp [50].
    timestep_spacing: leading | trailing | linspace ["leading"].
    steps_offset: added to leading timesteps [0].
    prev_rule: "diffusers" (t - T//n, as DDIMScheduler) | "next" ["diffusers"].
    eta: DDIM eta [0.0].
    clip_sample, clip_sample_range: clip predicted x0 in samplers [False, 1.0].
    weighting: loss weighting none | min_snr ["none"]. snr_gamma: min-SNR gamma [5.0].
    timestep: fixed t of onestep (default T-1) [None].
    ensemble_size: generalist: number of samples combined at test time [1].
    ensemble: mean | depth_affine ["mean"].
    ensemble_iterations: alignment passes of depth_affine [3].
    dmp_oracle: dmp: oracle-DDIM, re-building z_{t-1} from y_hat and the known image [False].
    train_timesteps: generalist / dmp: which t training draws, "uniform" over 0..T-1 or
      "inference" (only the sampler's own timesteps, e.g. 999 and 499 for 2 trailing DDIM
      steps: a model queried at few fixed t learns just those) ["uniform"].
  """
  mode: str = "generalist"
  prediction_type: str = "epsilon"
  sampler: str = "ddim"
  num_inference_steps: int = 50
  timestep_spacing: str = "leading"
  steps_offset: int = 0
  prev_rule: str = "diffusers"
  eta: float = 0.0
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  weighting: str = "none"
  snr_gamma: float = 5.0
  timestep: int | None = None
  ensemble_size: int = 1
  ensemble: str = "mean"
  ensemble_iterations: int = 3
  dmp_oracle: bool = False
  train_timesteps: str = "uniform"


def make_config(cfg: Mapping[str, Any] | None = None, **overrides) -> DiffusionConfig:
  """DiffusionConfig from a mapping (dict or ml_collections.ConfigDict) plus keyword overrides.

  Raises:
    ConfigError: on unknown keys (the message lists the known ones) or bad values;
    UnknownNameError: on an unknown paradigm.
  """
  values = dict(cfg or {})
  values.update(overrides)
  known = {f.name for f in dataclasses.fields(DiffusionConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise errors.ConfigError(f"unknown config.diffusion keys {unknown}; known: {sorted(known)}")
  out = DiffusionConfig(**values)
  paradigm = PARADIGMS.get(out.mode)
  if out.prediction_type not in PREDICTION_TYPES:
    raise errors.ConfigError(f"diffusion.prediction_type must be one of "
                             f"{list(PREDICTION_TYPES)}, got {out.prediction_type!r}")
  if out.train_timesteps not in TRAIN_TIMESTEPS:
    raise errors.ConfigError(f"diffusion.train_timesteps must be one of "
                             f"{TRAIN_TIMESTEPS.names()}, got {out.train_timesteps!r}")
  if out.ensemble_size < 1:
    raise errors.ConfigError(f"diffusion.ensemble_size must be >= 1, got {out.ensemble_size}")
  samplers.PREV_RULES.get(out.prev_rule)  # unknown names fail here, not at the first sample
  objectives.WEIGHTINGS.get(out.weighting)
  paradigm.validate(out)
  return out


class TrainingBatch(NamedTuple):
  """What the network sees and regresses to in one training step (all batched over B).

  x_t: f32[B, H, W, C] the network's "noisy" input. t: i32[B]. target: f32[B, H, W, C] the
  regression target in prediction space. weight: f32[B] per-example loss weights.
  """
  x_t: jax.Array
  t: jax.Array
  target: jax.Array
  weight: jax.Array


class Paradigm:
  """Base class (see the module docstring). Subclasses set `name` and implement
  `training_batch` and `predict`; `loss` is the masked MSE of the network's output against the
  training batch's target, which a paradigm with image-level task losses overrides."""

  name: ClassVar[str] = ""

  def __init__(self, cfg: DiffusionConfig, schedule: Schedule):
    self.cfg = cfg
    self.schedule = schedule

  @classmethod
  def validate(cls, cfg: DiffusionConfig) -> None:
    """Raises ConfigError for settings this paradigm cannot use."""

  def add_modules(self, model: Any, model_config: Any, rngs: Any) -> None:
    """Adds the paradigm's own modules (a VAE, heads, an adapter) to the model. Default: none."""
    del model, model_config, rngs

  def training_batch(self, target: jax.Array, image: jax.Array, key: jax.Array
                     ) -> TrainingBatch:
    """The network input, timestep, regression target and weight for clean targets."""
    raise NotImplementedError

  def loss(self, model: Any, batch: Mapping[str, jax.Array], key: jax.Array
           ) -> tuple[jax.Array, dict]:
    """(f32[B] per-example loss, aux) of the model on a training batch."""
    tb = self.training_batch(masked_target(batch), batch["image"], key)
    pred = model(tb.x_t, tb.t, batch["image"], batch["task"])
    return masked_mse(pred, tb.target, batch.get("valid")) * tb.weight, {}

  def predict(self, model: Any, image: jax.Array, task: jax.Array, key: jax.Array) -> jax.Array:
    """f32[B, H, W, C] answers (RGB encodings) for images f32[B, H, W, 3] and tasks i32[B]."""
    raise NotImplementedError


def masked_target(batch: Mapping[str, jax.Array]) -> jax.Array:
  """The batch's target with unknown pixels (valid = False) set to 0 (f32[B, H, W, C])."""
  target = batch["target"]
  valid = batch.get("valid")
  if valid is None:
    return target
  return jnp.where(jnp.asarray(valid, bool), target, jnp.zeros((), target.dtype))


def masked_mse(pred: jax.Array, target: jax.Array, valid: jax.Array | None) -> jax.Array:
  """f32[B]: mean over the known pixels (and channels) of (pred - target)^2 per example.

  Args:
    pred, target: f32[B, H, W, C]. valid: bool[B, H, W, 1 or C] or None (every pixel known).
  """
  if pred.shape != target.shape:
    raise ValueError(f"pred and target shapes differ: {pred.shape} vs {target.shape}")
  err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  axes = tuple(range(1, err.ndim))
  if valid is None:
    return jnp.mean(err, axis=axes)
  m = jnp.broadcast_to(jnp.asarray(valid, jnp.float32), err.shape)
  return jnp.sum(err * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)


def denoise_fn(x_t: jax.Array, t: jax.Array, model: Any, image: jax.Array, task: jax.Array
               ) -> jax.Array:
  """The samplers' `model_fn` (a static argument: one function for every model)."""
  return model(x_t, t, image, task)


def sampler_steps(schedule: Schedule, cfg: DiffusionConfig):
  """(timesteps, previous timesteps) of the configured DDIM-style sampler."""
  ts = samplers.ddim_timesteps(schedule.num_train_timesteps, cfg.num_inference_steps,
                               cfg.timestep_spacing, cfg.steps_offset)
  prev = samplers.prev_timesteps(ts, schedule.num_train_timesteps, cfg.num_inference_steps,
                                 cfg.prev_rule)
  return ts, prev


def fixed_timestep(cfg: DiffusionConfig, schedule: Schedule, default: int) -> int:
  t = default if cfg.timestep is None else int(cfg.timestep)
  if not 0 <= t < schedule.num_train_timesteps:
    raise errors.ConfigError(f"diffusion.timestep {t} is outside "
                             f"0..{schedule.num_train_timesteps - 1}")
  return t


# How training draws t: name -> (key, schedule, cfg, batch) -> i32[batch].
TRAIN_TIMESTEPS: registry.Registry[Callable[..., jax.Array]] = registry.Registry(
    "train_timesteps rule")


@TRAIN_TIMESTEPS.register("uniform")
def _uniform_t(key, schedule: Schedule, cfg: DiffusionConfig, batch: int) -> jax.Array:
  del cfg
  return jax.random.randint(key, (batch,), 0, schedule.num_train_timesteps, jnp.int32)


@TRAIN_TIMESTEPS.register("inference")
def _inference_t(key, schedule: Schedule, cfg: DiffusionConfig, batch: int) -> jax.Array:
  ts, _ = sampler_steps(schedule, cfg)
  return jnp.asarray(ts, jnp.int32)[jax.random.randint(key, (batch,), 0, len(ts))]


def train_timesteps(key, schedule: Schedule, cfg: DiffusionConfig, batch: int) -> jax.Array:
  return TRAIN_TIMESTEPS.get(cfg.train_timesteps)(key, schedule, cfg, batch)


def loss_weight(schedule: Schedule, cfg: DiffusionConfig, t: jax.Array,
                prediction_type: str | None = None) -> jax.Array:
  return objectives.loss_weight(schedule, t, prediction_type or cfg.prediction_type,
                                cfg.weighting, cfg.snr_gamma)


PARADIGMS: registry.Registry[type[Paradigm]] = registry.Registry("paradigm")


def register(name: str):
  """Class decorator: registers a Paradigm subclass under `name` (and sets its `name`)."""
  def wrap(cls: type[Paradigm]) -> type[Paradigm]:
    cls.name = name
    return PARADIGMS.register(name, cls)
  return wrap


def get(name: str) -> type[Paradigm]:
  return PARADIGMS.get(name)


def make(cfg: DiffusionConfig, schedule: Schedule) -> Paradigm:
  """The configured paradigm for a run."""
  return PARADIGMS.get(cfg.mode)(cfg, schedule)
