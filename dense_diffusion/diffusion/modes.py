"""The four ways of re-purposing a diffusion prior, behind one switch: `modes.get(name)`.

  generalist  pixel-space conditional diffusion, multi-step (DDIM/DDPM from noise);
  onestep     one deterministic forward pass at a fixed t (GenPercept, Lotus);
  dmp         interpolation diffusion: the image takes the place of the noise (DMP);
  backbone    the UNet run once at a small t as a feature extractor (VPD); heads come elsewhere.

Every mode offers the same three calls, so the train loop has no if-chains:

  batch = mode.training_batch(schedule, cfg, target, image, key)
      -> TrainingBatch(x_t, t, target, weight): what the network sees as its "noisy" input
         (the caller adds the condition, e.g. concatenates the image) and what it regresses to.
  loss, aux = mode.loss(schedule, cfg, pred, batch, mask=None)
      -> weighted MSE in prediction space; aux["x0"] is the target estimate implied by pred (for
         image-level task losses, e.g. GenPercept's).
  y = mode.sample(schedule, cfg, model_fn, image, key, model_args=())
      -> f32[B, H, W, C] prediction of the target.

`cfg` is a `DiffusionConfig` (build one from a config dict / ConfigDict with `make_config`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp

from dense_diffusion.diffusion import objectives
from dense_diffusion.diffusion import samplers
from dense_diffusion.diffusion.schedules import PREDICTION_TYPES, Schedule

__all__ = ["DiffusionConfig", "make_config", "TrainingBatch", "Mode", "MODES", "get"]


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  """Settings of a mode (defaults in brackets).

  Attributes:
    mode: generalist | onestep | dmp | backbone ["generalist"].
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
    timestep: fixed t of onestep (default T-1) and backbone (default 0) [None].
    backbone_noise: backbone: noise the latent to `timestep` before the pass [False].
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
  backbone_noise: bool = False
  ensemble_size: int = 1
  ensemble: str = "mean"
  ensemble_iterations: int = 3
  dmp_oracle: bool = False
  train_timesteps: str = "uniform"


def make_config(cfg: Mapping[str, Any] | None = None, **overrides) -> DiffusionConfig:
  """DiffusionConfig from a mapping (dict or ml_collections.ConfigDict) plus keyword overrides.

  Raises:
    ValueError: on unknown keys (the message lists the known ones) or bad values.
  """
  values = dict(cfg or {})
  values.update(overrides)
  known = {f.name for f in dataclasses.fields(DiffusionConfig)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f"unknown diffusion config keys {unknown}; known: {sorted(known)}")
  out = DiffusionConfig(**values)
  if out.mode not in MODES:
    raise KeyError(f"unknown diffusion mode {out.mode!r}; known: {sorted(MODES)}")
  if out.prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got "
                     f"{out.prediction_type!r}.")
  if out.train_timesteps not in TRAIN_TIMESTEPS:
    raise ValueError(f"train_timesteps must be one of {sorted(TRAIN_TIMESTEPS)}, got "
                     f"{out.train_timesteps!r}.")
  if out.ensemble_size < 1:
    raise ValueError(f"ensemble_size must be >= 1, got {out.ensemble_size}.")
  MODES[out.mode].validate(out)
  return out


class TrainingBatch(NamedTuple):
  """Inputs and targets of one training step (all batched over B).

  x_t: f32[B, H, W, C] the network's "noisy" input. t: int32[B]. target: f32[B, H, W, C] the
  regression target in prediction space (None for backbone). weight: f32[B] loss weights.
  y: f32[B, H, W, C] the clean target (None for backbone), for image-level losses.
  """
  x_t: jax.Array
  t: jax.Array
  target: jax.Array | None
  weight: jax.Array
  y: jax.Array | None


def _uniform_t(key, schedule: Schedule, cfg: DiffusionConfig, batch: int) -> jax.Array:
  del cfg
  return jax.random.randint(key, (batch,), 0, schedule.num_train_timesteps, jnp.int32)


def _inference_t(key, schedule: Schedule, cfg: DiffusionConfig, batch: int) -> jax.Array:
  ts, _ = _steps(schedule, cfg)
  return jnp.asarray(ts, jnp.int32)[jax.random.randint(key, (batch,), 0, len(ts))]


# How training draws t: name -> (key, schedule, cfg, batch) -> i32[batch].
TRAIN_TIMESTEPS: dict[str, Callable[..., jax.Array]] = {
    "uniform": _uniform_t,
    "inference": _inference_t,
}


def _train_t(key, schedule: Schedule, cfg: DiffusionConfig, batch: int) -> jax.Array:
  return TRAIN_TIMESTEPS[cfg.train_timesteps](key, schedule, cfg, batch)


def _fixed_t(cfg: DiffusionConfig, schedule: Schedule, batch: int, default: int) -> jax.Array:
  t = default if cfg.timestep is None else cfg.timestep
  if not 0 <= t < schedule.num_train_timesteps:
    raise ValueError(f"timestep {t} is outside 0..{schedule.num_train_timesteps - 1}.")
  return jnp.full((batch,), t, jnp.int32)


def _steps(schedule: Schedule, cfg: DiffusionConfig):
  ts = samplers.ddim_timesteps(schedule.num_train_timesteps, cfg.num_inference_steps,
                               cfg.timestep_spacing, cfg.steps_offset)
  prev = samplers.prev_timesteps(ts, schedule.num_train_timesteps, cfg.num_inference_steps,
                                 cfg.prev_rule)
  return ts, prev


def _mse_loss(schedule, cfg, pred, batch, mask=None):
  if batch.target is None:
    raise ValueError(f"mode {cfg.mode!r} has no diffusion target; its loss is the task head's.")
  loss = objectives.diffusion_loss(pred, batch.target, batch.weight, mask)
  x0 = objectives.pred_to_x0_eps(schedule, pred, batch.x_t, batch.t, cfg.prediction_type)[0]
  return loss, {"x0": x0}


@dataclasses.dataclass(frozen=True)
class Mode:
  """One way of using the diffusion prior (see the module docstring)."""
  name: str
  training_batch: Callable[..., TrainingBatch]
  sample: Callable[..., jax.Array]
  loss: Callable[..., tuple[jax.Array, dict]] = _mse_loss
  validate: Callable[[DiffusionConfig], None] = lambda cfg: None


# --- generalist --------------------------------------------------------------------------------


def _generalist_batch(schedule, cfg, target, image, key):
  del image  # the condition enters through the model, not the forward process
  k_t, k_n = jax.random.split(key)
  t = _train_t(k_t, schedule, cfg, target.shape[0])
  noise = jax.random.normal(k_n, target.shape, jnp.float32)
  x_t = objectives.q_sample(schedule, target, t, noise)
  tgt = objectives.target(schedule, target, noise, t, cfg.prediction_type)
  w = objectives.loss_weight(schedule, t, cfg.prediction_type, cfg.weighting, cfg.snr_gamma)
  return TrainingBatch(x_t, t, tgt, w, target)


def _generalist_sample(schedule, cfg, model_fn, image, key, model_args=()):
  """Samples from noise shaped like `image` (the RGB-encoded target has the image's shape)."""
  ts, prev = _steps(schedule, cfg)
  members = []
  for k in jax.random.split(key, cfg.ensemble_size):
    k_start, k_steps = jax.random.split(k)
    x_start = jax.random.normal(k_start, image.shape, jnp.float32)
    common = dict(prediction_type=cfg.prediction_type, key=k_steps, model_args=model_args,
                  clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_sample_range)
    if cfg.sampler == "ddpm":
      members.append(samplers.sample_ddpm(model_fn, schedule, x_start, ts, **common))
    else:
      members.append(samplers.sample_ddim(model_fn, schedule, x_start, ts, prev, eta=cfg.eta,
                                          **common))
  if len(members) == 1:
    return members[0]
  return samplers.ensemble(jnp.stack(members), cfg.ensemble, iterations=cfg.ensemble_iterations)


def _generalist_validate(cfg):
  if cfg.sampler not in ("ddim", "ddpm"):
    raise ValueError(f"generalist sampler must be 'ddim' or 'ddpm', got {cfg.sampler!r}.")
  if cfg.ensemble not in samplers.ENSEMBLERS:
    raise KeyError(f"unknown ensembling {cfg.ensemble!r}; known: {sorted(samplers.ENSEMBLERS)}")


# --- one-step (GenPercept / Lotus) ---------------------------------------------------------------


def _onestep_batch(schedule, cfg, target, image, key):
  del key
  t = _fixed_t(cfg, schedule, target.shape[0], schedule.num_train_timesteps - 1)
  tgt = objectives.onestep_target(schedule, target, image, t, cfg.prediction_type)
  return TrainingBatch(image, t, tgt, jnp.ones((target.shape[0],), jnp.float32), target)


def _onestep_sample(schedule, cfg, model_fn, image, key=None, model_args=()):
  del key
  t = schedule.num_train_timesteps - 1 if cfg.timestep is None else cfg.timestep
  return samplers.sample_onestep(model_fn, schedule, image, t,
                                 prediction_type=cfg.prediction_type, model_args=model_args,
                                 clip_sample=cfg.clip_sample,
                                 clip_sample_range=cfg.clip_sample_range)


def _deterministic_validate(allowed):
  def validate(cfg):
    if cfg.prediction_type not in allowed:
      raise ValueError(f"mode {cfg.mode!r} needs prediction_type in {list(allowed)}, got "
                       f"{cfg.prediction_type!r}.")
    if cfg.ensemble_size != 1:
      raise ValueError(f"mode {cfg.mode!r} is deterministic: ensemble_size must be 1, got "
                       f"{cfg.ensemble_size}.")
  return validate


# --- DMP interpolation diffusion ---------------------------------------------------------------


def _dmp_batch(schedule, cfg, target, image, key):
  t = _train_t(key, schedule, cfg, target.shape[0])
  z_t = objectives.dmp_forward(schedule, target, image, t)
  tgt = objectives.dmp_v_target(schedule, target, image, t)
  w = objectives.loss_weight(schedule, t, "v_prediction", cfg.weighting, cfg.snr_gamma)
  return TrainingBatch(z_t, t, tgt, w, target)


def _dmp_sample(schedule, cfg, model_fn, image, key=None, model_args=()):
  del key
  ts, prev = _steps(schedule, cfg)
  return samplers.sample_dmp(model_fn, schedule, image, ts, prev, oracle=cfg.dmp_oracle,
                             model_args=model_args, clip_sample=cfg.clip_sample,
                             clip_sample_range=cfg.clip_sample_range)


# --- backbone features (VPD) -------------------------------------------------------------------


def _backbone_batch(schedule, cfg, target, image, key):
  """x_t = the image latent (optionally noised to `timestep`), t = timestep (default 0)."""
  del target
  t = _fixed_t(cfg, schedule, image.shape[0], 0)
  x_t = image
  if cfg.backbone_noise:
    x_t = objectives.q_sample(schedule, image, t, jax.random.normal(key, image.shape, jnp.float32))
  return TrainingBatch(x_t, t, None, jnp.ones((image.shape[0],), jnp.float32), None)


def _backbone_sample(schedule, cfg, model_fn, image, key=None, model_args=()):
  """Runs model_fn once on the backbone input; returns whatever it returns (e.g. head outputs)."""
  batch = _backbone_batch(schedule, cfg, None, image, key)
  return model_fn(batch.x_t, batch.t, *model_args)


def _backbone_validate(cfg):
  if cfg.ensemble_size != 1:
    raise ValueError(f"backbone mode is deterministic: ensemble_size must be 1, got "
                     f"{cfg.ensemble_size}.")


MODES: dict[str, Mode] = {
    "generalist": Mode("generalist", _generalist_batch, _generalist_sample,
                       validate=_generalist_validate),
    "onestep": Mode("onestep", _onestep_batch, _onestep_sample,
                    validate=_deterministic_validate(("v_prediction", "sample"))),
    "dmp": Mode("dmp", _dmp_batch, _dmp_sample,
                validate=_deterministic_validate(("v_prediction",))),
    "backbone": Mode("backbone", _backbone_batch, _backbone_sample, validate=_backbone_validate),
}


def get(name: str) -> Mode:
  """The Mode registered under `name` (generalist | onestep | dmp | backbone)."""
  if name not in MODES:
    raise KeyError(f"unknown diffusion mode {name!r}; known: {sorted(MODES)}")
  return MODES[name]
