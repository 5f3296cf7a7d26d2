"""Marigold depth / normals / intrinsics pipelines in JAX, from diffusers-format folders.

    from dense_diffusion.pipelines import MarigoldDepthPipeline
    pipe = MarigoldDepthPipeline.from_pretrained("path/to/marigold-depth-v1-1")
    out = pipe(image, num_inference_steps=4, ensemble_size=3, output_uncertainty=True)
    out.prediction  # f32[N, H, W, 1] in [0, 1]; out.uncertainty f32[N, H, W, 1]

A folder written by diffusers' `Marigold{Depth,Normals,Intrinsics}Pipeline.save_pretrained`
loads without torch: the UNet, VAE and CLIP text encoder through `dense_diffusion.convert`, the
tokenizer through `models.tokenizer`, the scheduler config through `diffusion.schedules`, and
`model_index.json` for the defaults (`default_denoising_steps`, `default_processing_resolution`)
and the task properties (`scale_invariant` / `shift_invariant`, `use_full_z_range`,
`target_properties`). The call mirrors diffusers' `__call__` argument for argument (`latents` is
NHWC; `key` replaces `generator`; outputs are numpy NHWC, as diffusers' `output_type="np"`).

What one call does, and where the numbers follow diffusers:
1. Empty-prompt conditioning: "" tokenised without padding ([bos, eos]) through the text
   encoder, once at load time (diffusers caches it on the first call).
2. Preprocessing (`marigold_processing`, host numpy): images to [0, 1] float, x * 2 - 1, an
   antialiased resize so the longer side is `processing_resolution` (torch's interpolation
   weights), replicate padding to a multiple of the VAE downsampling.
3. Image latents: the VAE encoder's posterior mean times `scaling_factor` (diffusers'
   `latent_dist.mode()`; no shift factor), repeated `ensemble_size` times per image
   (repeat_interleave order: image-major).
4. Denoising: for each chunk of `batch_size` latents one jitted `lax.scan` over the timesteps of
   UNet(concat[image_latent, pred_latent], t, empty embedding) and the scheduler step: DDIM
   (`samplers.sample_ddim`, diffusers' DDIMScheduler timesteps and previous-timestep rule) or
   LCM (`samplers.sample_lcm`), as the scheduler config's `_class_name` says. The last chunk is
   padded to `batch_size` so one shape compiles.
5. Decoding: VAE decoder on latents / scaling_factor, then the task's mapping (depth: channel
   mean, clip to [-1, 1], to [0, 1]; normals: clip, optional half-range z, unit length;
   intrinsics: each 4-channel group of the latent is one target, clip, to [0, 1]).
6. Unpadding, ensembling with uncertainty (`marigold_processing`), resizing back to the input
   size without antialiasing (`resample_method_output`), normals renormalised after it.

Multi-step LCM re-noises between steps with noise diffusers draws from its torch generator; the
draws can be passed as `step_noise` to reproduce a diffusers run, otherwise they come from `key`.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dense_diffusion import errors
from dense_diffusion.convert import clip as clip_convert
from dense_diffusion.convert import unet as unet_convert
from dense_diffusion.convert import vae as vae_convert
from dense_diffusion.diffusion import samplers, schedules
from dense_diffusion.models import tokenizer as tokenizer_lib
from dense_diffusion.pipelines import marigold_processing as processing
from dense_diffusion.registry import Registry

__all__ = [
    "MarigoldDepthPipeline", "MarigoldNormalsPipeline", "MarigoldIntrinsicsPipeline",
    "MarigoldDepthOutput", "MarigoldNormalsOutput", "MarigoldIntrinsicsOutput", "SAMPLING_PLANS",
]


@dataclasses.dataclass
class MarigoldDepthOutput:
  """prediction f32[N, H, W, 1] in [0, 1]; uncertainty f32[N, H, W, 1] (ensembles with
  `output_uncertainty`) or None; latent f32[N * E, h, w, 4] (with `output_latent`) or None."""
  prediction: np.ndarray
  uncertainty: np.ndarray | None
  latent: np.ndarray | None = None


@dataclasses.dataclass
class MarigoldNormalsOutput:
  """prediction f32[N, H, W, 3] unit normals in [-1, 1]; uncertainty f32[N, H, W, 1] or None;
  latent f32[N * E, h, w, 4] or None."""
  prediction: np.ndarray
  uncertainty: np.ndarray | None
  latent: np.ndarray | None = None


@dataclasses.dataclass
class MarigoldIntrinsicsOutput:
  """prediction f32[N * T, H, W, 3] in [0, 1] (T targets per image, image-major);
  uncertainty f32[N * T, H, W, 3] or None; latent f32[N * E, h, w, T * 4] or None."""
  prediction: np.ndarray
  uncertainty: np.ndarray | None
  latent: np.ndarray | None = None


def _unet_fn(pred_latent, t, unet, image_latent, text):
  """The samplers' model_fn: the image latent goes first, as diffusers concatenates."""
  return unet(jnp.concatenate([image_latent, pred_latent], axis=-1), t, text)


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
  """How a chunk is denoised: `run(x_start, model_args, key, noise)`; `noise_draws` is the
  number of re-noising draws per chunk (LCM: steps - 1; DDIM: 0)."""
  run: Callable[..., jax.Array]
  noise_draws: int


# diffusers scheduler class name -> (scheduler config, steps) -> SamplingPlan.
SAMPLING_PLANS: Registry[Callable[[schedules.SchedulerConfig, int], SamplingPlan]] = Registry(
    "Marigold scheduler")


def _as_config_error(build):
  try:
    return build()
  except errors.UserError:
    raise
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


@SAMPLING_PLANS.register("DDIMScheduler")
def _ddim_plan(cfg: schedules.SchedulerConfig, steps: int) -> SamplingPlan:
  total = cfg.schedule.num_train_timesteps
  ts = _as_config_error(lambda: samplers.ddim_timesteps(total, steps, cfg.timestep_spacing,
                                                        cfg.steps_offset))
  prev = samplers.prev_timesteps(ts, total, steps, rule="diffusers")

  def run(x, model_args, key, noise):
    del key, noise  # deterministic (eta = 0, as diffusers' Marigold pipelines)
    return samplers.sample_ddim(_unet_fn, cfg.schedule, x, ts, prev,
                                prediction_type=cfg.prediction_type, model_args=model_args,
                                clip_sample=cfg.clip_sample,
                                clip_sample_range=cfg.clip_sample_range)
  return SamplingPlan(run, 0)


@SAMPLING_PLANS.register("LCMScheduler")
def _lcm_plan(cfg: schedules.SchedulerConfig, steps: int) -> SamplingPlan:
  ts = _as_config_error(lambda: samplers.lcm_timesteps(
      cfg.schedule.num_train_timesteps, steps, cfg.original_inference_steps))

  def run(x, model_args, key, noise):
    return samplers.sample_lcm(_unet_fn, cfg.schedule, x, ts,
                               prediction_type=cfg.prediction_type,
                               timestep_scaling=cfg.timestep_scaling, key=key, noise=noise,
                               model_args=model_args, clip_sample=cfg.clip_sample,
                               clip_sample_range=cfg.clip_sample_range)
  return SamplingPlan(run, steps - 1)


def _read_json(path: pathlib.Path) -> dict:
  if not path.is_file():
    raise errors.MissingError(f"{path} does not exist; pass a folder written by diffusers' "
                              "save_pretrained.")
  return json.loads(path.read_text(encoding="utf-8"))


@jax.jit
def _encode(vae, images):
  """images f32[B, H, W, 3] in [-1, 1] -> scaled posterior means f32[B, h, w, 4]."""
  mean, _ = vae.encode_moments(images)
  return mean.astype(jnp.float32) * vae.config.scaling_factor


class _MarigoldPipeline:
  """What the three Marigold pipelines share; subclasses give the task's decoding/ensembling."""

  pipeline_class: str = ""
  output_class: type = MarigoldDepthOutput
  ensembling_keys: tuple[str, ...] = ("reduction",)

  def __init__(self, unet, vae, text_encoder, tokenizer: tokenizer_lib.CLIPTokenizer,
               scheduler: schedules.SchedulerConfig, config: dict[str, Any]):
    """Components as loaded by `from_pretrained`; `config` is model_index.json's dict."""
    SAMPLING_PLANS.get(scheduler.class_name or "?")  # refuse other schedulers early
    self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
    self.scheduler = dataclasses.replace(scheduler, schedule=jax.device_put(scheduler.schedule))
    self.config = dict(config)
    self.default_denoising_steps = config.get("default_denoising_steps")
    self.default_processing_resolution = config.get("default_processing_resolution")
    self.vae_scale_factor = vae.config.downsample_factor
    self.latent_channels = vae.config.latent_channels
    self.n_targets = unet.config["out_channels"] // self.latent_channels
    # diffusers tokenises "" with padding="do_not_pad": just [bos, eos].
    ids = jnp.asarray([[tokenizer.bos_id, tokenizer.eos_id]], jnp.int32)
    self.empty_text_embedding = jax.jit(lambda m, i: m(i))(text_encoder, ids).astype(jnp.float32)
    self._decode = jax.jit(self._decode_latents)

  @classmethod
  def from_pretrained(cls, folder, *, variant: str | None = None, dtype=None):
    """Loads a diffusers-format Marigold folder (no torch).

    Args:
      folder: what `Marigold*Pipeline.save_pretrained` wrote (model_index.json, unet/, vae/,
        text_encoder/, tokenizer/, scheduler/).
      variant: weight variant ("fp16" reads *.fp16.safetensors, as float32).
      dtype: compute dtype of the networks (None = float32, or jnp.bfloat16).
    Raises:
      MissingError: no such folder / file. ConfigError: a folder of another pipeline or an
      unsupported scheduler.
    """
    folder = pathlib.Path(folder)
    config = _read_json(folder / "model_index.json")
    found = config.get("_class_name", cls.pipeline_class)
    if found != cls.pipeline_class:
      marigold = {c.pipeline_class for c in _MarigoldPipeline.__subclasses__()}
      hint = (f"load it with dense_diffusion.pipelines.{found}" if found in marigold
              else f"pass a folder written by diffusers' {cls.pipeline_class}")
      raise errors.ConfigError(f"{folder} holds a {found}, not a {cls.pipeline_class}; {hint}.")
    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
    scheduler = schedules.from_diffusers_config(scheduler_config)
    if scheduler.class_name not in SAMPLING_PLANS:
      raise errors.ConfigError(f"{folder}/scheduler is a {scheduler.class_name}; Marigold "
                               f"pipelines run {SAMPLING_PLANS.names()}.")
    return cls(unet_convert.load_diffusers_unet(folder, variant=variant, dtype=dtype),
               vae_convert.load_diffusers_vae(folder, variant=variant, dtype=dtype),
               clip_convert.load_transformers_clip_text(folder, variant=variant, dtype=dtype),
               tokenizer_lib.CLIPTokenizer.from_folder(folder), scheduler, config)

  # -- the task's parts (subclasses) ----------------------------------------------------------

  def _prediction_from_rgb(self, rgb: jax.Array) -> jax.Array:
    """Decoded f32[B, H, W, 3] -> the task's prediction (traced inside the decode jit)."""
    raise NotImplementedError

  def _ensemble(self, members: np.ndarray, output_uncertainty: bool, kwargs: dict):
    """f32[E * T, PH, PW, C] of one image -> (prediction, uncertainty or None)."""
    raise NotImplementedError

  def _finish(self, prediction: np.ndarray) -> np.ndarray:
    """After resizing back to the input size (normals: renormalise)."""
    return prediction

  # -- the call -------------------------------------------------------------------------------

  def _decode_latents(self, vae, latents):
    rgb = vae.decode(latents / vae.config.scaling_factor).astype(jnp.float32)
    return self._prediction_from_rgb(rgb)

  def _check(self, steps, ensemble_size, resolution, methods, batch_size, ensembling_kwargs,
             output_uncertainty):
    checks = [
        (steps is None, "num_inference_steps is not given and model_index.json has no "
                        "default_denoising_steps; pass num_inference_steps."),
        (steps is not None and steps < 1, f"num_inference_steps={steps}; pass >= 1."),
        (ensemble_size < 1, f"ensemble_size={ensemble_size}; pass >= 1."),
        (ensemble_size == 1 and output_uncertainty,
         "output_uncertainty needs an ensemble; pass ensemble_size > 1."),
        (resolution is None, "processing_resolution is not given and model_index.json has no "
                             "default_processing_resolution; pass processing_resolution."),
        (resolution is not None and resolution < 0,
         f"processing_resolution={resolution}; pass 0 (native) or a positive size."),
        (resolution is not None and resolution % self.vae_scale_factor != 0,
         f"processing_resolution={resolution} must be a multiple of {self.vae_scale_factor}."),
        (batch_size < 1, f"batch_size={batch_size}; pass >= 1."),
        (ensembling_kwargs is not None and not isinstance(ensembling_kwargs, dict),
         "ensembling_kwargs must be a dict."),
    ]
    known_methods = list(processing.RESAMPLE_METHODS)
    for method in methods:
      checks.append((method not in known_methods,
                     f"resample method {method!r}; use one of {known_methods}."))
    unknown = sorted(set(ensembling_kwargs or {}) - set(self.ensembling_keys))
    checks.append((bool(unknown), f"ensembling_kwargs {unknown} are unknown; known: "
                                  f"{list(self.ensembling_keys)}."))
    for failed, message in checks:
      if failed:
        raise errors.ConfigError(message)

  def _preprocess(self, image, resolution: int, method: str):
    images = processing.load_images(image)
    x = images * np.float32(2.0) - np.float32(1.0)
    if resolution > 0:
      x = processing.resize_to_max_edge(x, resolution, method)
    x, padding = processing.pad(x, self.vae_scale_factor)
    return x, padding, images.shape[1:3]

  def _check_array(self, name: str, value, shape: tuple[int, ...]) -> jax.Array:
    value = jnp.asarray(value, jnp.float32)
    if tuple(value.shape) != shape:
      raise errors.ConfigError(f"{name} has shape {tuple(value.shape)}; this call needs {shape} "
                               "(NHWC).")
    return value

  def _in_chunks(self, fn, arrays, batch_size: int) -> jax.Array:
    """fn over chunks of `batch_size` rows of every array; the last chunk is padded with copies
    of its last row so every call has one shape (one compilation)."""
    total = arrays[0].shape[0]
    outs = []
    for index, start in enumerate(range(0, total, batch_size)):
      chunk = [a[start:start + batch_size] for a in arrays]
      n = chunk[0].shape[0]
      if n < batch_size:
        chunk = [jnp.concatenate([c, jnp.repeat(c[-1:], batch_size - n, axis=0)]) for c in chunk]
      outs.append(fn(index, *chunk)[:n])
    return jnp.concatenate(outs, axis=0)

  def __call__(self, image, num_inference_steps: int | None = None, ensemble_size: int = 1,
               processing_resolution: int | None = None, match_input_resolution: bool = True,
               resample_method_input: str = "bilinear", resample_method_output: str = "bilinear",
               batch_size: int = 1, ensembling_kwargs: dict | None = None, latents=None,
               output_uncertainty: bool = False, output_latent: bool = False, *,
               key: jax.Array | None = None, step_noise=None):
    """Predicts for `image` as diffusers' pipeline `__call__` does (same arguments).

    Args:
      image: a PIL image, numpy [H, W], [H, W, C] or [N, H, W, C] (uint8, or float in [0, 1]),
        or a list of these of one size.
      num_inference_steps: denoising steps (default: model_index.json's).
      ensemble_size: predictions per image, ensembled (E).
      processing_resolution: longer side the image is resized to (0: native; default:
        model_index.json's); a multiple of the VAE downsampling.
      match_input_resolution: resize the output back to the input size.
      resample_method_input / resample_method_output: "nearest", "nearest-exact", "bilinear",
        "bicubic", "area" (torch's rules; input antialiased for bilinear / bicubic).
      batch_size: latents per device call (all N * E latents are processed in such chunks).
      ensembling_kwargs: depth: reduction ("median" | "mean"), regularizer_strength, max_iter,
        tol, max_res; normals: reduction ("closest" | "mean"); intrinsics: reduction
        ("median" | "mean").
      latents: the initial noise f32[N * E, h, w, T * 4] NHWC (diffusers' NCHW `latents`
        transposed), h, w = padded processing size / VAE downsampling.
      output_uncertainty: also return the ensemble's uncertainty (needs E > 1).
      output_latent: also return the final latents.
      key: PRNG key for the initial noise when `latents` is None and for multi-step LCM
        re-noising (default jax.random.key(0): calls are reproducible).
      step_noise: multi-step LCM only: f32[steps - 1, N * E, h, w, T * 4] re-noising draws
        (diffusers' generator draws, NHWC) instead of draws from `key`.
    Returns:
      The task's output dataclass (numpy, NHWC).
    Raises:
      ConfigError: for arguments that cannot work, saying what to change.
    """
    steps = self.default_denoising_steps if num_inference_steps is None else num_inference_steps
    resolution = (self.default_processing_resolution if processing_resolution is None
                  else processing_resolution)
    self._check(steps, ensemble_size, resolution,
                (resample_method_input, resample_method_output), batch_size, ensembling_kwargs,
                output_uncertainty)
    plan = SAMPLING_PLANS.get(self.scheduler.class_name)(self.scheduler, int(steps))
    x, padding, input_size = self._preprocess(image, int(resolution), resample_method_input)
    members = x.shape[0] * ensemble_size
    latent_shape = (members, x.shape[1] // self.vae_scale_factor,
                    x.shape[2] // self.vae_scale_factor, self.n_targets * self.latent_channels)
    key = jax.random.key(0) if key is None else key
    key_start, key_steps = jax.random.split(key)
    if latents is None:
      latents = jax.random.normal(key_start, latent_shape, jnp.float32)
    latents = self._check_array("latents", latents, latent_shape)
    if step_noise is not None and plan.noise_draws == 0:
      raise errors.ConfigError("step_noise is only used by multi-step LCM schedulers; leave it "
                               "out.")
    if step_noise is not None:
      step_noise = jnp.moveaxis(self._check_array(
          "step_noise", step_noise, (plan.noise_draws,) + latent_shape), 1, 0)

    image_latent = self._in_chunks(lambda _, im: _encode(self.vae, im), [jnp.asarray(x)],
                                   batch_size)
    image_latent = jnp.repeat(image_latent, ensemble_size, axis=0)
    text = jnp.broadcast_to(self.empty_text_embedding,
                            (batch_size,) + self.empty_text_embedding.shape[1:])

    def denoise(index, image_chunk, latent_chunk, *noise_chunk):
      noise = jnp.moveaxis(noise_chunk[0], 0, 1) if noise_chunk else None
      return plan.run(latent_chunk, (self.unet, image_chunk, text),
                      jax.random.fold_in(key_steps, index), noise)

    arrays = [image_latent, latents] + ([step_noise] if step_noise is not None else [])
    pred_latent = self._in_chunks(denoise, arrays, batch_size)
    targets = pred_latent.reshape(pred_latent.shape[:3] + (self.n_targets, self.latent_channels))
    targets = jnp.moveaxis(targets, 3, 1).reshape((-1,) + pred_latent.shape[1:3] +
                                                  (self.latent_channels,))
    decoded = self._in_chunks(lambda _, z: self._decode(self.vae, z), [targets], batch_size)
    prediction = processing.unpad(np.asarray(decoded), padding)
    prediction, uncertainty = self._ensemble_all(prediction, ensemble_size, output_uncertainty,
                                                 dict(ensembling_kwargs or {}))
    if match_input_resolution:
      prediction = self._finish(processing.resize(prediction, input_size, resample_method_output))
      if uncertainty is not None:
        uncertainty = processing.resize(uncertainty, input_size, resample_method_output)
    return self.output_class(prediction=prediction, uncertainty=uncertainty,
                             latent=np.asarray(pred_latent) if output_latent else None)

  def _ensemble_all(self, prediction, ensemble_size, output_uncertainty, kwargs):
    if ensemble_size == 1:
      return prediction, None
    groups = prediction.reshape((-1, ensemble_size * self.n_targets) + prediction.shape[1:])
    results = [self._ensemble(group, output_uncertainty, kwargs) for group in groups]
    prediction = np.concatenate([p for p, _ in results], axis=0)
    uncertainty = (np.concatenate([u for _, u in results], axis=0) if output_uncertainty
                   else None)
    return prediction, uncertainty


class MarigoldDepthPipeline(_MarigoldPipeline):
  """Monocular depth (or disparity): prediction f32[N, H, W, 1] in [0, 1]."""

  pipeline_class = "MarigoldDepthPipeline"
  output_class = MarigoldDepthOutput
  ensembling_keys = ("reduction", "regularizer_strength", "max_iter", "tol", "max_res")

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.scale_invariant = bool(self.config.get("scale_invariant", True))
    self.shift_invariant = bool(self.config.get("shift_invariant", True))

  def _prediction_from_rgb(self, rgb):
    depth = jnp.clip(jnp.mean(rgb, axis=-1, keepdims=True), -1.0, 1.0)
    return (depth + 1.0) / 2.0

  def _ensemble(self, members, output_uncertainty, kwargs):
    return processing.ensemble_depth(members, self.scale_invariant, self.shift_invariant,
                                     output_uncertainty, **kwargs)


class MarigoldNormalsPipeline(_MarigoldPipeline):
  """Surface normals: prediction f32[N, H, W, 3], unit length, in [-1, 1]."""

  pipeline_class = "MarigoldNormalsPipeline"
  output_class = MarigoldNormalsOutput

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.use_full_z_range = bool(self.config.get("use_full_z_range", True))

  def _prediction_from_rgb(self, rgb):
    normals = jnp.clip(rgb, -1.0, 1.0)
    if not self.use_full_z_range:  # z was trained on [0, 1] only
      normals = normals.at[..., 2].set(normals[..., 2] * 0.5 + 0.5)
    norm = jnp.sqrt(jnp.sum(jnp.square(normals), axis=-1, keepdims=True))
    return normals / jnp.maximum(norm, 1e-6)

  def _ensemble(self, members, output_uncertainty, kwargs):
    return processing.ensemble_normals(members, output_uncertainty, **kwargs)

  def _finish(self, prediction):
    return processing.normalize_normals(prediction)


class MarigoldIntrinsicsPipeline(_MarigoldPipeline):
  """Intrinsic image decomposition: prediction f32[N * T, H, W, 3] in [0, 1], T targets per
  image (names and meaning in `target_properties`, from model_index.json)."""

  pipeline_class = "MarigoldIntrinsicsPipeline"
  output_class = MarigoldIntrinsicsOutput

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.target_properties = self.config.get("target_properties")

  def _prediction_from_rgb(self, rgb):
    return (jnp.clip(rgb, -1.0, 1.0) + 1.0) / 2.0

  def _ensemble(self, members, output_uncertainty, kwargs):
    targets = members.reshape((-1, self.n_targets) + members.shape[1:])  # [E, T, PH, PW, 3]
    return processing.ensemble_intrinsics(targets, output_uncertainty, **kwargs)
