"""VPD (Zhao et al. 2023): the diffusion UNet as a perception backbone feeding dense heads.

What flows where, for a batch of images (each with its task):
1. The image, in the paradigm's space (its VAE latent, or its pixels), goes through the UNet
   once at a fixed small t (`diffusion.timestep`, VPD: 1), optionally noised to that t first
   (`diffusion.backbone_noise`, VPD's ablation).
2. The UNet's cross-attention context is the task's text tokens refined by the text adapter
   (x + gamma * MLP(x), gamma starting at 1e-4): for a task with named classes (semantic
   segmentation with `categories`) one token per class, "a photo of a {class}" through the
   frozen text encoder (its pooled embedding, computed once and cached), or a learned token per
   class without one; for other tasks (and for every task with `diffusion.vpd_class_prompts`
   off) the model's task prompt tokens (frozen embeddings or learned task tokens). Tasks
   trained together need as many tokens each.
3. The UNet's decoder features (one per resolution, coarsest first) and, unless turned off,
   the cross-attention maps of every `attn2` (averaged over heads and modules, resized to each
   feature scale and concatenated to it, one channel per token) feed each task's dense head
   (`Task.head`: depth, normals, classes or rgb; `model.head.type` the architecture, the dense
   head or VPD's Semantic FPN: `models/heads.py`), trained end to end with the UNet (or with
   the UNet frozen: `model.frozen`).
4. Losses on the heads' direct outputs, on the known pixels: depth, VPD's scale-invariant log
   loss (lambda 0.5) of the sigmoid depth code; normals, the mean angle; classes,
   cross-entropy; rgb, the task's `image_loss` on a tanh RGB code.
5. Inference returns each head's answer written as its task's RGB encoding (a class's palette
   colour, the depth code as grey, the unit normal), an exact round trip through the task's
   `decode`, so evaluation and prediction treat VPD like every other paradigm. Optionally over
   sliding windows and averaged with the mirrored image's answer (`diffusion.vpd_slide_crop` /
   `vpd_slide_stride`, `vpd_flip`: VPD's test protocol; `test_time.py`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from dense_diffusion import errors
from dense_diffusion import registry
from dense_diffusion.diffusion import objectives
from dense_diffusion.models import heads as heads_lib
from dense_diffusion.paradigms import base
from dense_diffusion.paradigms import test_time
from dense_diffusion.tasks import base as task_base

SILOG_LAMBDA = 0.5  # VPD's scale-invariant log loss: sqrt(mean(g^2) - lambda * mean(g)^2).
DEPTH_EPS = 1e-3  # depth codes are clipped at this before the log (VPD clips depth at 1e-3).
CLASS_PROMPT = "a photo of a {}"  # VPD's class prompts.


@dataclasses.dataclass(frozen=True)
class HeadKind:
  """A kind of dense head: its output channels, its loss and its answer as the task's RGB code.

  channels(task) -> int; loss(task, out f32[B,H,W,C], target f32[B,H,W,3], valid) -> f32[B];
  to_rgb(task, out) -> f32[B, H, W, 3] (exactly what `task.decode` turns into the answer).
  flip_mean(out, mirrored out) -> out: one output whose answer is the mean of the two (for
  `diffusion.vpd_flip`); None where the kind has no such mean.
  """
  channels: Callable[[Any], int]
  loss: Callable[..., jax.Array]
  to_rgb: Callable[[Any, jax.Array], jax.Array]
  flip_mean: Callable[[jax.Array, jax.Array], jax.Array] | None = None


HEAD_KINDS: registry.Registry[HeadKind] = registry.Registry("head kind")


def _grey(v: jax.Array) -> jax.Array:
  return jnp.repeat(v * 2.0 - 1.0, 3, axis=-1)


def _depth_loss(task, out, target, valid):
  del task
  pred = jnp.clip(jax.nn.sigmoid(out[..., 0]), DEPTH_EPS, 1.0)
  true = jnp.clip((jnp.mean(target, axis=-1) + 1.0) * 0.5, DEPTH_EPS, 1.0)
  m = jnp.ones_like(pred) if valid is None else jnp.asarray(valid[..., 0], pred.dtype)
  g = jnp.log(true) - jnp.log(pred)
  n = jnp.maximum(jnp.sum(m, axis=(1, 2)), 1.0)
  mean_g = jnp.sum(g * m, axis=(1, 2)) / n
  mean_g2 = jnp.sum(g * g * m, axis=(1, 2)) / n
  return jnp.sqrt(jnp.maximum(mean_g2 - SILOG_LAMBDA * mean_g**2, 1e-12))


HEAD_KINDS.register("depth", HeadKind(
    channels=lambda task: 1, loss=_depth_loss,
    to_rgb=lambda task, out: _grey(jax.nn.sigmoid(out[..., :1]))))


def _unit(out):
  return out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-6)


HEAD_KINDS.register("normals", HeadKind(
    channels=lambda task: 3, loss=lambda task, out, target, valid: task.image_loss(
        _unit(out), target, valid),
    to_rgb=lambda task, out: _unit(out)))


def class_of_rgb(task, rgb: jax.Array) -> jax.Array:
  """i32[B, H, W] classes of clean palette colours f32[B, H, W, 3] (the semantic encoding)."""
  levels = task.levels
  digits = jnp.clip(jnp.round((rgb + 1.0) * 0.5 * (levels - 1)), 0, levels - 1).astype(jnp.int32)
  colour = digits[..., 0] * levels**2 + digits[..., 1] * levels + digits[..., 2]
  return jnp.clip(colour - 1, 0, task.num_classes - 1)


def _class_loss(task, out, target, valid):
  labels = class_of_rgb(task, target)
  log_probs = jax.nn.log_softmax(out.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)
  return task_base.masked_mean(nll, valid)


HEAD_KINDS.register("classes", HeadKind(
    channels=lambda task: task.num_classes, loss=_class_loss,
    to_rgb=lambda task, out: jnp.asarray(task.palette)[jnp.argmax(out, axis=-1) + 1],
    flip_mean=test_time.mean_probabilities))  # mmseg: the mean of the class probabilities

HEAD_KINDS.register("rgb", HeadKind(
    channels=lambda task: 3,
    loss=lambda task, out, target, valid: task.image_loss(jnp.tanh(out), target, valid),
    to_rgb=lambda task, out: jnp.tanh(out)))


class VPDModules(nnx.Module):
  """What the paradigm adds to the model: per-task text tokens, the adapter, the heads."""

  def __init__(self, tokens: jax.Array, learned: bool, heads: Sequence[nnx.Module],
               adapter: nnx.Module):
    value = jnp.asarray(tokens, jnp.float32)
    # Learned tokens train; text-encoder embeddings are frozen (not a Param).
    self.tokens = (nnx.Param(value, out_sharding=(None, None, "embed"), eager_sharding=False)
                   if learned else nnx.Variable(value))
    self.heads = nnx.List(list(heads))
    self.adapter = adapter


@base.register("vpd")
class VPD(base.Paradigm):
  """The UNet once at a small t as a backbone; a dense head per task (module docstring)."""

  DEFAULT_TIMESTEP = 1  # VPD runs the UNet at t = 1.

  @classmethod
  def validate(cls, cfg):
    if cfg.ensemble_size != 1:
      raise errors.ConfigError("diffusion.mode='vpd' is deterministic: ensemble_size must be 1")
    if cfg.loss_space != "prediction":
      raise errors.ConfigError("diffusion.mode='vpd' trains its heads on their own losses: "
                               "leave diffusion.loss_space at 'prediction'")
    crop, stride = cfg.vpd_slide_crop, cfg.vpd_slide_stride
    if crop < 0 or (crop == 0 and stride != 0) or (crop > 0 and not 0 < stride <= crop):
      raise errors.ConfigError(
          f"diffusion.vpd_slide_crop={crop}, vpd_slide_stride={stride}: sliding windows need "
          "a crop > 0 and 0 < stride <= crop (crop 0 and stride 0: the whole image at once)")

  @property
  def timestep(self) -> int:
    return base.fixed_timestep(self.cfg, self.schedule, self.DEFAULT_TIMESTEP)

  def unet_channels(self, condition_channels: int) -> tuple[int, int]:
    """The UNet sees the image alone (no noisy answer beside it)."""
    return condition_channels, condition_channels

  def add_modules(self, model, model_config, rngs, *, embed_text=None):
    """model.vpd: tokens, adapter and a head per task (`embed_text(prompts, pooled)` gives
    frozen text embeddings, or None without a text encoder)."""
    build_head = head_builder(model_config.get("head"))
    if self.cfg.vpd_flip:
      kinds = sorted({t.head for t in self.tasks if HEAD_KINDS.get(t.head).flip_mean is None})
      if kinds:
        raise errors.ConfigError(f"diffusion.vpd_flip averages class probabilities; heads of "
                                 f"kind {kinds} have no flip mean: turn vpd_flip off")
    unet = model.unet
    dim = unet.config["cross_attention_dim"]
    tokens, learned = self._tokens(model, embed_text, dim, rngs)
    channels = list(unet.config["block_out_channels"])[::-1]  # decoder features, coarsest first
    if self.cfg.vpd_attention_maps:
      channels = [c + tokens.shape[1] for c in channels]
    factor = 1 if self.space.name == "pixel" else model.vae.config.downsample_factor
    dtype = model.unet.dtype
    heads = [build_head(channels, HEAD_KINDS.get(t.head).channels(t), upsample=factor,
                        dtype=dtype, rngs=rngs) for t in self.tasks]
    model.vpd = VPDModules(tokens, learned, heads,
                           heads_lib.TextAdapter(dim, dtype=dtype, rngs=rngs))

  def _tokens(self, model, embed_text, dim, rngs) -> tuple[jax.Array, bool]:
    """f32[T, L, dim] text tokens per task, and whether they are learned."""
    per_task = []
    learned = embed_text is None
    for i, task in enumerate(self.tasks):
      names = [c.get("name") for c in getattr(task, "categories", ())]
      if self.cfg.vpd_class_prompts and names and all(names):
        if learned:
          init = jax.random.normal(rngs.params(), (len(names), dim), jnp.float32) * 0.02
          per_task.append(init)
        else:
          per_task.append(jnp.asarray(embed_text([CLASS_PROMPT.format(n) for n in names], True)))
      elif model.prompts is not None:
        per_task.append(jnp.asarray(model.prompts[...][i]))
      else:
        # (traced when the model is built abstractly: kept as a jax array)
        per_task.append(model.task_embedding[...][i])
        learned = True
    counts = sorted({t.shape[0] for t in per_task})
    if len(counts) > 1:
      raise errors.ConfigError(
          f"diffusion.mode='vpd' trains tasks {[t.name for t in self.tasks]} with different "
          f"numbers of text tokens {counts} (one per class for segmentation): train them in "
          "separate runs")
    return jnp.stack(per_task).astype(jnp.float32), learned

  def features(self, model, image: jax.Array, task: jax.Array, key: jax.Array | None
               ) -> list[jax.Array]:
    """The heads' input: decoder features (coarsest first), with the attention maps."""
    x = self.space.encode(model, image)
    t = jnp.full((x.shape[0],), self.timestep, jnp.int32)
    if self.cfg.backbone_noise:
      if key is None:
        raise ValueError("backbone_noise needs a key")
      x = objectives.q_sample(self.schedule, x, t, jax.random.normal(key, x.shape, x.dtype))
    context = model.vpd.adapter(jnp.take(model.vpd.tokens[...], task, axis=0))
    if not self.cfg.vpd_attention_maps:
      _, feats = model.unet(x, t, context, return_features=True)
      return feats
    _, feats, maps = model.unet(x, t, context, return_features=True, return_attention_maps=True)
    return attach_attention_maps(feats, maps)

  def _head_outputs(self, model, image, task, key):
    feats = self.features(model, image, task, key)
    return [head(feats) for head in model.vpd.heads]

  def loss(self, model, batch, key):
    outs = self._head_outputs(model, batch["image"], batch["task"], key)
    target, valid = masked_target_and_valid(batch)
    per_task = jnp.stack([HEAD_KINDS.get(t.head).loss(t, o, target, valid)
                          for t, o in zip(self.tasks, outs)], axis=-1)
    return jnp.take_along_axis(per_task, batch["task"][:, None], axis=-1)[:, 0], {}

  def sampler_loop_trips(self) -> int:
    return 1  # one network pass, no loop.

  def inference_outputs(self, model, image, task, key) -> list[jax.Array]:
    """Each head's output f32[B, H, W, C] at evaluation: over sliding windows
    (`diffusion.vpd_slide_crop` / `vpd_slide_stride`, the windows' mean per pixel) and averaged
    with the horizontal mirror's (`diffusion.vpd_flip`, each kind's `flip_mean`) when set."""
    cfg = self.cfg
    fn = lambda x: self._head_outputs(model, x, task, key)
    if cfg.vpd_slide_crop:
      whole = fn
      fn = lambda x: test_time.sliding_window(whole, x, cfg.vpd_slide_crop, cfg.vpd_slide_stride)
    if cfg.vpd_flip:
      return test_time.flip_average(fn, image, [HEAD_KINDS.get(t.head).flip_mean
                                                for t in self.tasks])
    return fn(image)

  def predict(self, model, image, task, key):
    key = key if self.cfg.backbone_noise else None
    outs = self.inference_outputs(model, image, task, key)
    rgb = jnp.stack([HEAD_KINDS.get(t.head).to_rgb(t, o) for t, o in zip(self.tasks, outs)],
                    axis=1)  # [B, T, H, W, 3]
    return jnp.take_along_axis(rgb, task[:, None, None, None, None], axis=1)[:, 0]


def head_builder(options: Mapping[str, Any] | None) -> Callable[..., nnx.Module]:
  """`model.head` -> build(feature_channels, out_channels, *, upsample, dtype, rngs).

  `model.head.type` names the architecture (`heads.HEADS`: "dense", the default, or
  "semantic_fpn"); its other keys are that architecture's options (defaults in `HEADS`).
  """
  options = dict(options or {})
  name = str(options.pop("type", "dense"))
  arch = heads_lib.HEADS.get(name)
  unknown = set(options) - set(arch.options)
  if unknown:
    raise errors.ConfigError(
        f"model.head has unknown keys {sorted(unknown)}: type={name!r} takes type and "
        f"{', '.join(sorted(arch.options))}")
  settings = {**arch.options, **options}
  problem = arch.check(settings)
  if problem:
    raise errors.ConfigError(f"model.head: {problem}")
  return lambda *args, **kw: arch.build(*args, **kw, **settings)


def masked_target_and_valid(batch: Mapping[str, jax.Array]):
  return base.masked_target(batch), batch.get("valid")


def attach_attention_maps(features: Sequence[jax.Array], maps: Mapping[str, jax.Array]
                          ) -> list[jax.Array]:
  """Each feature [B, h, w, C] with the cross-attention maps concatenated: every module's map
  f32[B, heads, h'*w', L] averaged over heads, the modules of each resolution averaged, each
  resolution resized to (h, w), then averaged: [B, h, w, C + L]."""
  by_size: dict[int, list[jax.Array]] = {}
  for probs in maps.values():
    by_size.setdefault(probs.shape[2], []).append(jnp.mean(probs, axis=1))
  if not by_size:
    raise ValueError("the UNet has no cross-attention maps: turn diffusion.vpd_attention_maps "
                     "off for this UNet")
  out = []
  for feature in features:
    b, h, w, _ = feature.shape
    resized = []
    for hw, group in by_size.items():
      side_h, side_w = _grid(hw, h, w)
      mean = jnp.mean(jnp.stack(group), axis=0).reshape(b, side_h, side_w, -1)
      resized.append(jax.image.resize(mean, (b, h, w, mean.shape[-1]), "linear"))
    attn = jnp.mean(jnp.stack(resized), axis=0).astype(feature.dtype)
    out.append(jnp.concatenate([feature, attn], axis=-1))
  return out


def _grid(tokens: int, h: int, w: int) -> tuple[int, int]:
  """The (rows, columns) of a map of `tokens` positions with the aspect ratio of (h, w)."""
  for rows in range(1, tokens + 1):
    if tokens % rows == 0 and rows * w == (tokens // rows) * h:
      return rows, tokens // rows
  raise ValueError(f"cannot lay {tokens} attention positions out as a {h}:{w} grid")
