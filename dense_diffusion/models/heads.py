"""Dense heads on a UNet's decoder features, and VPD's text adapter (NHWC).

`DenseHead`: multi-scale features (coarsest first, e.g. the UNet's up-block outputs) fused
top-down as a semantic FPN does (a 1x1 lateral projection per scale, each coarser sum upsampled
and added to the next finer projection), a 3x3 convolution, then as many 2x upsampling stages
(bilinear, 3x3 convolution, GroupNorm, SiLU) as it takes from the finest feature to the image,
and a 3x3 output convolution started near zero (VPD initialises its last layers with std
1e-3). `upsampling="deconv"` makes each stage a 2x2 stride-2 transposed convolution (torch's
`ConvTranspose2d(kernel_size=2, stride=2)`), GroupNorm, SiLU, as VPD's depth decoder
upsamples; one fusion serves every output kind (depth, normals, class logits, RGB codes).

`SemanticFPNHead`: Semantic FPN (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks", the
semantic branch; VPD's ADE20K head through mmseg's `FPN` neck + `FPNHead`): a feature pyramid
(1x1 lateral convolutions to one width, a top-down pathway adding each coarser level upsampled
(nearest) to the next finer, a 3x3 output convolution per level), then per level a stack of
(3x3 conv, GroupNorm, ReLU, 2x bilinear upsampling) stages until the finest feature's size,
the levels summed, a 1x1 classifier and bilinear upsampling to the image.

`HEADS` names the head architectures (`model.head.type`): "dense" (`DenseHead`, the default)
and "semantic_fpn" (`SemanticFPNHead`).

`TextAdapter`: VPD's refinement of the text features, x + gamma * MLP(x), with gamma a
per-channel parameter starting at 1e-4, so the adapter starts as (almost) the identity.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

from flax import nnx
import jax
import jax.numpy as jnp

from dense_diffusion import registry
from dense_diffusion.models import initializers
from dense_diffusion.models import layers

HEAD_GROUPS = 8  # GroupNorm groups in the heads.
OUT_INIT_STD = 1e-3  # std of the output convolution's initial kernel (VPD's last layers).
ADAPTER_GAMMA_INIT = 1e-4  # VPD's initial text-adapter scale.
CLASSIFIER_INIT_STD = 0.01  # std of the Semantic FPN classifier's initial kernel (mmseg's).


def resize_to(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of [B, h, w, C] to [B, height, width, C] (identity at the same size)."""
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), "linear")


class Deconv2x(nnx.Module):
  """2x2 transposed convolution with stride 2: [B, h, w, in] -> [B, 2h, 2w, out].

  Each input pixel paints its own 2x2 output block: y[2i + a, 2j + b] = x[i, j] @ kernel[a, b]
  + bias (torch `ConvTranspose2d(in, out, 2, stride=2)`, whose weight [in, out, a, b] is this
  kernel [a, b, in, out]).
  """

  def __init__(self, in_channels: int, out_channels: int, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dtype = dtype
    self.kernel = layers.make_param(rngs, initializers.fan_in_truncated_normal,
                                    (2, 2, in_channels, out_channels), param_dtype,
                                    layers.CONV_KERNEL_AXES)
    self.bias = layers.make_param(rngs, initializers.zeros, (out_channels,), param_dtype,
                                  ("conv_out",))

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    b, h, w, _ = x.shape
    y = jnp.einsum("bijc,pqco->bipjqo", x.astype(dtype), self.kernel[...].astype(dtype))
    return y.reshape(b, 2 * h, 2 * w, -1) + self.bias[...].astype(dtype)


UPSAMPLINGS = ("bilinear", "deconv")


class DenseHead(nnx.Module):
  """Multi-scale features -> a dense output at `upsample` x the finest feature's size.

  Args:
    feature_channels: channels of each input feature, coarsest first.
    out_channels: channels of the output (1 for depth, 3 for normals / RGB, K for classes).
    upsample: the image size over the finest feature's size (a power of 2; 1 in pixel space,
      the VAE factor in latent space).
    width: channels inside the head.
    upsampling: "bilinear" (resize, 3x3 conv) or "deconv" (2x2 stride-2 transposed conv) in
      each 2x stage.
  """

  def __init__(self, feature_channels: Sequence[int], out_channels: int, *, upsample: int = 1,
               width: int = 64, upsampling: str = "bilinear", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if upsampling not in UPSAMPLINGS:
      raise ValueError(f"head upsampling must be one of {UPSAMPLINGS}, got {upsampling!r}")
    _power_of_two(upsample)
    if width % HEAD_GROUPS:
      raise ValueError(f"head width {width} is not a multiple of {HEAD_GROUPS} groups")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lateral = nnx.List([layers.Conv2d(c, width, 1, padding=0, **kw)
                             for c in feature_channels])
    self.fuse = layers.Conv2d(width, width, 3, **kw)
    self.fuse_norm = layers.GroupNorm(width, HEAD_GROUPS, **kw)
    stages = int(math.log2(upsample))
    self.upsampling = upsampling
    make_stage = ((lambda: Deconv2x(width, width, **kw)) if upsampling == "deconv" else
                  (lambda: layers.Conv2d(width, width, 3, **kw)))
    self.up_convs = nnx.List([make_stage() for _ in range(stages)])
    self.up_norms = nnx.List([layers.GroupNorm(width, HEAD_GROUPS, **kw) for _ in range(stages)])
    self.out = layers.Conv2d(width, out_channels, 3,
                             kernel_init=initializers.normal(OUT_INIT_STD), **kw)

  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    """features[i] f32[B, h_i, w_i, C_i] (coarsest first) -> f32[B, H, W, out_channels]."""
    if len(features) != len(self.lateral):
      raise ValueError(f"the head was built for {len(self.lateral)} feature scales, got "
                       f"{len(features)}")
    x = self.lateral[0](features[0])
    for lateral, feature in zip(self.lateral[1:], features[1:]):
      x = resize_to(x, *feature.shape[1:3]) + lateral(feature)
    x = jax.nn.silu(self.fuse_norm(self.fuse(x)))
    for conv, norm in zip(self.up_convs, self.up_norms):
      if self.upsampling == "bilinear":
        x = resize_to(x, 2 * x.shape[1], 2 * x.shape[2])
      x = jax.nn.silu(norm(conv(x)))
    return self.out(x).astype(jnp.float32)


def _power_of_two(upsample: int) -> None:
  if upsample < 1 or upsample & (upsample - 1):
    raise ValueError(f"head upsampling must be a power of 2, got {upsample}")


class SemanticFPNHead(nnx.Module):
  """Semantic FPN: multi-scale features -> a dense output at `upsample` x the finest's size.

  Pyramid (mmseg `FPN`, no norm, no activation): p_i = lateral_i(f_i) (1x1 to `fpn_width`);
  top-down, each p_i += nearest-upsampled p_{i-1} (its coarser neighbour); o_i = fpn_convs_i(p_i)
  (3x3). Semantic branch (mmseg `FPNHead`, Panoptic FPN's GroupNorm): level i, k levels coarser
  than the finest, goes through max(1, k) stages of (3x3 conv to `head_width`, GroupNorm, ReLU)
  each followed by a 2x bilinear upsampling while it is coarser than the finest (the finest gets
  one stage, no upsampling); the levels are summed (each resized to the finest's size, the
  identity when the scales halve), a 1x1 `classifier` (started at std 0.01) gives the output
  channels, and a bilinear resize brings it to `upsample` x the finest size (the image).

  Args:
    feature_channels: channels of each input feature, coarsest first (each scale twice the
      previous one's size, as a UNet decoder's).
    out_channels: output channels (K class logits for segmentation).
    upsample: the image size over the finest feature's size (a power of 2).
    fpn_width: channels of the pyramid (mmseg FPN `out_channels`; VPD: 256).
    head_width: channels of the semantic branch (mmseg FPNHead `channels`; VPD: 256).
    norm_groups: GroupNorm groups in the semantic branch (Panoptic FPN: 32).
  """

  def __init__(self, feature_channels: Sequence[int], out_channels: int, *, upsample: int = 1,
               fpn_width: int = 256, head_width: int = 256, norm_groups: int = 32, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    _power_of_two(upsample)
    if head_width % norm_groups:
      raise ValueError(f"semantic FPN head_width {head_width} is not a multiple of "
                       f"{norm_groups} groups")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    levels = len(feature_channels)
    self.upsample = upsample
    self.lateral = nnx.List([layers.Conv2d(c, fpn_width, 1, padding=0, **kw)
                             for c in feature_channels])
    self.fpn_convs = nnx.List([layers.Conv2d(fpn_width, fpn_width, 3, **kw)
                               for _ in feature_channels])
    self.stage_convs, self.stage_norms = nnx.List([]), nnx.List([])
    for i in range(levels):
      stages = max(1, levels - 1 - i)  # level i is levels-1-i halvings coarser than the finest
      self.stage_convs.append(nnx.List([
          layers.Conv2d(fpn_width if s == 0 else head_width, head_width, 3, **kw)
          for s in range(stages)]))
      self.stage_norms.append(nnx.List([layers.GroupNorm(head_width, norm_groups, **kw)
                                        for _ in range(stages)]))
    self.classifier = layers.Conv2d(head_width, out_channels, 1, padding=0,
                                    kernel_init=initializers.normal(CLASSIFIER_INIT_STD), **kw)

  def pyramid(self, features: Sequence[jax.Array]) -> list[jax.Array]:
    """features[i] [B, h_i, w_i, C_i] (coarsest first) -> [B, h_i, w_i, fpn_width] each."""
    if len(features) != len(self.lateral):
      raise ValueError(f"the head was built for {len(self.lateral)} feature scales, got "
                       f"{len(features)}")
    merged = []
    for lateral, feature in zip(self.lateral, features):
      p = lateral(feature)
      if merged:
        p = p + layers.resize_nearest(merged[-1], p.shape[1:3]).astype(p.dtype)
      merged.append(p)
    return [conv(p) for conv, p in zip(self.fpn_convs, merged)]

  def __call__(self, features: Sequence[jax.Array]) -> jax.Array:
    """features[i] f32[B, h_i, w_i, C_i] (coarsest first) -> f32[B, H, W, out_channels],
    (H, W) = `upsample` x the finest feature's (h, w)."""
    pyramid = self.pyramid(features)
    finest = pyramid[-1].shape[1:3]
    total = None
    for x, convs, norms in zip(pyramid, self.stage_convs, self.stage_norms):
      for conv, norm in zip(convs, norms):
        x = jax.nn.relu(norm(conv(x)))
        if x.shape[1:3] != finest:
          x = resize_to(x, 2 * x.shape[1], 2 * x.shape[2])
      x = resize_to(x, *finest)
      total = x if total is None else total + x
    out = self.classifier(total).astype(jnp.float32)
    return resize_to(out, finest[0] * self.upsample, finest[1] * self.upsample)


@dataclasses.dataclass(frozen=True)
class HeadArchitecture:
  """A head architecture `model.head.type` can name: its builder and its options' defaults.

  build(feature_channels, out_channels, *, upsample, dtype, rngs, **options) -> nnx.Module
  whose __call__(features coarsest first) -> f32[B, H, W, out_channels]; check(settings) says
  what is wrong with a full set of options (None when nothing is).
  """
  build: Callable[..., nnx.Module]
  options: Mapping[str, Any]
  check: Callable[[Mapping[str, Any]], str | None] = lambda settings: None


def _check_dense(settings: Mapping[str, Any]) -> str | None:
  if settings["upsampling"] not in UPSAMPLINGS:
    return f"upsampling={settings['upsampling']!r}: use one of {', '.join(UPSAMPLINGS)}"
  return None


HEADS: registry.Registry[HeadArchitecture] = registry.Registry("head type")
HEADS.register("dense", HeadArchitecture(
    build=lambda *a, **kw: DenseHead(*a, **kw),
    options={"width": 64, "upsampling": "bilinear"}, check=_check_dense))
HEADS.register("semantic_fpn", HeadArchitecture(
    build=lambda *a, **kw: SemanticFPNHead(*a, **kw),
    options={"fpn_width": 256, "head_width": 256, "norm_groups": 32}))


class TextAdapter(nnx.Module):
  """x + gamma * (Dense - GELU - Dense)(x) over [..., dim] text features; gamma f32[dim] starts
  at 1e-4 (VPD)."""

  def __init__(self, dim: int, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = layers.Dense(dim, dim, axes=("embed", "mlp"), **kw)
    self.fc2 = layers.Dense(dim, dim, axes=("mlp", "embed"), **kw)
    self.gamma = nnx.Param(jnp.full((dim,), ADAPTER_GAMMA_INIT, param_dtype),
                           out_sharding=("embed",), eager_sharding=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    refined = self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))
    return x + self.gamma[...] * refined.astype(x.dtype)
