"""The paradigm unit: one way of re-using a diffusion prior, owning its loss and its inference.

A paradigm is a class registered under its name (`config.diffusion.mode`); an experiment builds
one from the run's `DiffusionConfig`, noise schedule, space (pixels or VAE latents,
`spaces.py`, the `model.latent` switch) and task objects, and calls only these methods:

  add_modules(model, model_config, rngs)   the modules it adds to the model (default: none)
  loss(model, batch, key)                  -> (f32[B] per-example loss, aux): what the train
                                           step minimises (after the per-task loss weights)
  predict(model, image, task, key)         -> f32[B, H, W, 3] the RGB-encoded answers

`model` is the network (`GeneralistModel`: `model(x_t, t, image, task, cond=cond)`, `cond` the
condition image in the network's space), `batch` a training batch `{"image": f32[B, H, W, 3] in
[-1, 1], "target": f32[B, H, W, 3] (the task encodings), "valid": bool[B, H, W, 1] (pixels
whose answer is known), "task": i32[B]}`. A paradigm never trains on unknown pixels:
`masked_target` replaces them by 0 before anything sees the target (so their content cannot
leak through the network's input, or through the VAE), and the losses leave them out.

Two losses come with the base class (`DiffusionConfig.loss_space`): "prediction", the MSE of the
network's output against the paradigm's regression target in the network's space; "image", the
answer estimate x0 implied by the output, decoded to RGB (through the VAE in latent space, with
gradients) and scored by each example's task (`Task.image_loss`: scale-and-shift-invariant L1
for affine-invariant depth, angular for normals, RGB MSE otherwise), GenPercept / E2E-FT's
recipe. The train step, the evaluator and the predictor contain no paradigm-specific code.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dense_diffusion import errors
from dense_diffusion import registry
from dense_diffusion.diffusion import objectives
from dense_diffusion.diffusion import samplers
from dense_diffusion.diffusion.schedules import PREDICTION_TYPES, Schedule
from dense_diffusion.paradigms import spaces


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
    loss_space: "prediction" (MSE in the network's output space) or "image" (the decoded
      answer scored by each task's `image_loss`: GenPercept / E2E-FT) ["prediction"].
    noise: generalist: the forward process's noise, "gaussian" or "multires" (Marigold's
      multi-resolution noise: Gaussian noise plus upsampled coarser noise) ["gaussian"].
    multires_strength: weight decay per pyramid level of multires noise [0.9].
    multires_annealed: multires strength scaled by t / T (Marigold's annealing) [True].
    backbone_noise: vpd: noise the image to `timestep` before the backbone pass [False].
    vpd_attention_maps: vpd: concatenate the cross-attention maps to the features [True].
    vpd_class_prompts: vpd: one text token per class for tasks with named classes (VPD's
      segmentation); False gives them the task's tokens like every other task [True].
    vpd_flip: vpd inference: average each head's answer with its answer on the horizontally
      mirrored image (class heads: the mean softmax probabilities, mmseg's flip test) [False].
    vpd_slide_crop, vpd_slide_stride: vpd inference: square windows of this many pixels every
      stride pixels, each head's outputs averaged per pixel over the windows covering it
      (mmseg's `mode='slide'`); 0, 0 = the whole image at once [0, 0].
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
  loss_space: str = "prediction"
  noise: str = "gaussian"
  multires_strength: float = 0.9
  multires_annealed: bool = True
  backbone_noise: bool = False
  vpd_attention_maps: bool = True
  vpd_class_prompts: bool = True
  vpd_flip: bool = False
  vpd_slide_crop: int = 0
  vpd_slide_stride: int = 0


LOSS_SPACES = ("prediction", "image")
NOISES = ("gaussian", "multires")


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
  if out.loss_space not in LOSS_SPACES:
    raise errors.ConfigError(f"diffusion.loss_space must be one of {list(LOSS_SPACES)}, got "
                             f"{out.loss_space!r}")
  if out.noise not in NOISES:
    raise errors.ConfigError(f"diffusion.noise must be one of {list(NOISES)}, got {out.noise!r}")
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
  """Base class (see the module docstring). Subclasses set `name` (by `register`) and implement
  `training_batch` and `sample`; `loss` and `predict` wrap them with the space and the loss of
  `loss_space`, and a paradigm with another loss overrides `loss`.

  Args:
    cfg: the diffusion settings. schedule: the noise schedule.
    space: `spaces.PixelSpace()` (default) or `spaces.LatentSpace()`.
    tasks: the task objects in task-index order (their `image_loss` for loss_space="image").
  """

  name: ClassVar[str] = ""

  def __init__(self, cfg: DiffusionConfig, schedule: Schedule, *, space: Any = None,
               tasks: Sequence[Any] = ()):
    self.cfg = cfg
    self.schedule = schedule
    self.space = space if space is not None else spaces.PixelSpace()
    self.tasks = tuple(tasks)
    if cfg.loss_space == "image" and not self.tasks:
      raise errors.ConfigError("diffusion.loss_space='image' scores each example with its "
                               "task's image_loss: the paradigm needs the run's tasks")

  @classmethod
  def validate(cls, cfg: DiffusionConfig) -> None:
    """Raises ConfigError for settings this paradigm cannot use."""

  def add_modules(self, model: Any, model_config: Any, rngs: Any, *,
                  embed_text: Callable[[Sequence[str], bool], Any] | None = None) -> None:
    """Adds the paradigm's own modules (heads, an adapter) to the model. Default: none.

    `embed_text(prompts, pooled)` gives frozen text-encoder embeddings of prompts ([P, L, D], or
    [P, D] pooled), or is None when the run has no text encoder.
    """
    del model, model_config, rngs, embed_text

  def unet_channels(self, condition_channels: int) -> tuple[int, int]:
    """The UNet's (in_channels, out_channels) for a condition of `condition_channels`: the
    noisy answer beside the condition in, the answer out."""
    return 2 * condition_channels, condition_channels

  @property
  def prediction_type(self) -> str:
    """What the network outputs (its regression target's parameterisation)."""
    return self.cfg.prediction_type

  def training_batch(self, target: jax.Array, cond: jax.Array, key: jax.Array
                     ) -> TrainingBatch:
    """The network input, timestep, regression target and weight, in the network's space
    (target: the clean answer, cond: the condition image)."""
    raise NotImplementedError

  def sample(self, model: Any, image: jax.Array, cond: jax.Array, task: jax.Array,
             key: jax.Array) -> jax.Array:
    """The answers f32[B, h, w, C] in the network's space."""
    raise NotImplementedError

  def sampler_loop_trips(self) -> int:
    """How often `sample`'s loop body (one network pass) runs: the sampler's steps. Cost
    analyses count a compiled loop's body once (`main compile` scales by this)."""
    return self.cfg.num_inference_steps

  def loss(self, model: Any, batch: Mapping[str, jax.Array], key: jax.Array
           ) -> tuple[jax.Array, dict]:
    """(f32[B] per-example loss, aux) of the model on a training batch."""
    image, valid = batch["image"], batch.get("valid")
    target_rgb = masked_target(batch)
    cond = self.space.encode(model, image)
    tb = self.training_batch(self.space.encode(model, target_rgb), cond, key)
    pred = model(tb.x_t, tb.t, image, batch["task"], cond=cond)
    if self.cfg.loss_space == "image":
      x0 = objectives.pred_to_x0_eps(self.schedule, pred, tb.x_t, tb.t, self.prediction_type)[0]
      answer = self.space.decode(model, x0)
      return self.task_image_loss(answer, target_rgb, valid, batch["task"]) * tb.weight, {}
    return masked_mse(pred, tb.target, self.space.known(model, valid)) * tb.weight, {}

  def task_image_loss(self, answer: jax.Array, target: jax.Array, valid: jax.Array | None,
                      task: jax.Array) -> jax.Array:
    """f32[B]: each example's task's `image_loss` of RGB answers f32[B, H, W, 3]."""
    per_task = jnp.stack([t.image_loss(answer, target, valid) for t in self.tasks], axis=-1)
    return jnp.take_along_axis(per_task, task[:, None], axis=-1)[:, 0]

  def predict(self, model: Any, image: jax.Array, task: jax.Array, key: jax.Array) -> jax.Array:
    """f32[B, H, W, 3] answers (RGB encodings) for images f32[B, H, W, 3] and tasks i32[B].

    With `ensemble_size` > 1 every member is sampled and decoded, then the RGB answers are
    combined (`ensemble`: mean, or depth_affine, Marigold's scale-and-shift alignment).
    """
    cond = self.space.encode(model, image)
    members = [self.space.decode(model, self.sample(model, image, cond, task, k))
               for k in jax.random.split(key, self.cfg.ensemble_size)]
    if len(members) == 1:
      return members[0]
    return samplers.ensemble(jnp.stack(members), self.cfg.ensemble,
                             iterations=self.cfg.ensemble_iterations)


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


def denoise_fn(x_t: jax.Array, t: jax.Array, model: Any, image: jax.Array, task: jax.Array,
               cond: jax.Array) -> jax.Array:
  """The samplers' `model_fn` (a static argument: one function for every model)."""
  return model(x_t, t, image, task, cond=cond)


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


def multires_noise(key: jax.Array, shape: tuple, strength: jax.Array) -> jax.Array:
  """Marigold's multi-resolution noise: N(0, I) plus, at every coarser level (each half the
  size of the one before, down to 1 pixel), upsampled (bilinear) N(0, I) weighted
  strength^level, normalised back to unit standard deviation per example.

  Marigold draws a random factor in [2, 4) per level; under jit shapes must be static, so the
  factor here is 2 at every level (Marigold's "power_of_two" strategy).

  Args:
    shape: (B, H, W, C). strength: f32[B] or a scalar.
  """
  b, h, w, c = shape
  keys = jax.random.split(key, 32)
  noise = jax.random.normal(keys[0], shape, jnp.float32)
  strength = jnp.broadcast_to(jnp.asarray(strength, jnp.float32), (b,))[:, None, None, None]
  level, lh, lw = 1, h, w
  while lh > 1 and lw > 1:
    lh, lw = max(1, lh // 2), max(1, lw // 2)
    coarse = jax.random.normal(keys[level], (b, lh, lw, c), jnp.float32)
    noise = noise + jax.image.resize(coarse, shape, "linear") * strength**level
    level += 1
  return noise / jnp.std(noise, axis=(1, 2, 3), keepdims=True)


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


def make(cfg: DiffusionConfig, schedule: Schedule, *, space: Any = None,
         tasks: Sequence[Any] = ()) -> Paradigm:
  """The configured paradigm for a run (space: pixels by default; tasks in task-index order)."""
  return PARADIGMS.get(cfg.mode)(cfg, schedule, space=space, tasks=tasks)
