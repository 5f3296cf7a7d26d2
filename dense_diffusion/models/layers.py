"""Shared NHWC building blocks of the UNet and the VAE (diffusers semantics, Flax NNX).

Every parameter carries logical axis names (docs/sharding.md) in its `out_sharding` metadata,
created with `eager_sharding=False`: modules can be built anywhere (CPU, no mesh), and
`dense_diffusion.sharding` reads the names with `nnx.get_partition_spec(nnx.state(model))` and
maps them to mesh axes by its rules.

Parameter names follow diffusers' module names where a checkpoint is read into them
(`conv1`, `norm1`, `time_emb_proj`, `to_q`, `to_out[0]`, ...); leaf names are `kernel` / `bias`
for convolutions and dense layers and `scale` / `bias` for norms. Kernels are stored in JAX
layout: dense [in, out], convolution [kh, kw, in, out] (HWIO).

All modules take `dtype` (the compute dtype; None = float32) and `param_dtype` (float32 by
default). Normalisation statistics are always computed in float32.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dense_diffusion.models import attention as attention_lib
from dense_diffusion.models import initializers

Dtype = jnp.dtype
Axes = tuple[Optional[str], ...]

CONV_KERNEL_AXES: Axes = ("conv_height", "conv_width", "conv_in", "conv_out")
NORM_AXES: Axes = ("norm",)

_default_kernel_init = initializers.fan_in_truncated_normal


def make_param(rngs: nnx.Rngs, init, shape: Sequence[int], param_dtype, axes: Axes) -> nnx.Param:
  """A float parameter initialised by `init` with logical axis names `axes`."""
  if len(axes) != len(shape):
    raise ValueError(f"axis names {axes} do not match parameter shape {tuple(shape)}")
  value = init(rngs.params(), tuple(shape), param_dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def make_dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout:
  """`nnx.Dropout(rate)`; it holds an RNG stream only when rate > 0 (rate 0 is the identity), so
  modules without dropout have no RNG state and can be built abstractly and then loaded."""
  return nnx.Dropout(rate, rngs=rngs if rate > 0 else None)


def _compute_dtype(dtype, x: jax.Array):
  return x.dtype if dtype is None else dtype


class Dense(nnx.Module):
  """y = x @ kernel + bias over the last axis (torch `nn.Linear`).

  Attributes: kernel [in, out] with names `axes`; bias [out] with name `axes[1]`.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               axes: Axes = ("embed", "mlp"), dtype=None, param_dtype=jnp.float32,
               kernel_init=_default_kernel_init, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.dtype = dtype
    self.kernel = make_param(rngs, kernel_init, (in_features, out_features), param_dtype, axes)
    self.bias = (make_param(rngs, initializers.zeros, (out_features,), param_dtype,
                            (axes[1],)) if use_bias else None)
    # Low-rank adapter, attached by `models.lora.apply_lora` (None = no adapter).
    self.lora_down = nnx.data(None)  # LoRAParam [in, rank]
    self.lora_up = nnx.data(None)  # LoRAParam [rank, out]
    self.lora_scale = 0.0
    self.lora_merged = False

  def __call__(self, x: jax.Array, columns: Optional[tuple[int, int]] = None) -> jax.Array:
    """[..., in] -> [..., out] in the compute dtype; with `columns=(start, stop)` only those
    output features, [..., stop - start] (one product with that slice of the kernel)."""
    dtype = _compute_dtype(self.dtype, x)
    x = x.astype(dtype)
    cols = slice(None) if columns is None else slice(*columns)
    y = jnp.dot(x, self.kernel[...][:, cols].astype(dtype))
    if self.lora_down is not None and not self.lora_merged:
      low = jnp.dot(x, self.lora_down[...].astype(dtype))
      y = y + jnp.dot(low, self.lora_up[...][:, cols].astype(dtype)) * self.lora_scale
    if self.bias is not None:
      y = y + self.bias[...][cols].astype(dtype)
    return y


# How the gradient of a convolution kernel is computed (see docs/models.md, "CPU performance"):
#   "xla": XLA's own transposed convolution;
#   "matmul": a custom VJP whose kernel gradient is kh*kw matrix products of shifted inputs with
#     the output gradient (XLA:CPU's kernel-gradient convolution is 2-3x slower than oneDNN's for
#     >= 128 channels; this is 1.4-1.6x faster there);
#   "auto": "matmul" on CPU for stride-1 "same" convolutions with >= 128 input channels on
#     >= 32x32 positions, else "xla".
CONV_WEIGHT_GRAD_MODES = ("auto", "xla", "matmul")
_conv_weight_grad = "auto"
_MATMUL_GRAD_MIN_CHANNELS = 128
_MATMUL_GRAD_MIN_POSITIONS = 1024


class Embedding(nnx.Module):
  """A lookup table `embedding` [num, dim] with logical axis names (torch `nn.Embedding`)."""

  def __init__(self, num_embeddings: int, features: int, *, axes=("vocab", "embed"),
               param_dtype=jnp.float32, init_std: float = 0.02, rngs: nnx.Rngs):
    self.num_embeddings = num_embeddings
    self.features = features
    self.embedding = make_param(rngs, initializers.normal(init_std),
                                (num_embeddings, features), param_dtype, axes)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """int [...] -> [..., dim]."""
    return jnp.take(self.embedding[...], ids, axis=0)


def set_conv_weight_grad(mode: str) -> None:
  """Selects the kernel-gradient implementation of `Conv2d` (process-wide, at trace time)."""
  global _conv_weight_grad
  if mode not in CONV_WEIGHT_GRAD_MODES:
    raise ValueError(f"conv weight-gradient mode {mode!r} unknown; choose one of "
                     f"{CONV_WEIGHT_GRAD_MODES}")
  _conv_weight_grad = mode


def _conv_same(x: jax.Array, kernel: jax.Array, p: int) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def _conv_same_matmul_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'same' convolution (odd square kernel) whose kernel gradient uses matmuls."""
  return _conv_same(x, kernel, (kernel.shape[0] - 1) // 2)


def _conv_same_fwd(x, kernel):
  return _conv_same_matmul_grad(x, kernel), (x, kernel)


def _conv_same_bwd(res, dy):
  x, kernel = res
  kh, kw, c, _ = kernel.shape
  p = (kh - 1) // 2
  # Input gradient: correlation of dy with the spatially flipped, in/out-swapped kernel.
  dx = _conv_same(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), p)
  b, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  dy2 = dy.reshape(-1, dy.shape[-1])
  taps = [jax.lax.dot_general(xp[:, i:i + h, j:j + w].reshape(-1, c), dy2,
                              (((0,), (0,)), ((), ())))
          for i in range(kh) for j in range(kw)]
  dk = jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)
  return dx.astype(x.dtype), dk


_conv_same_matmul_grad.defvjp(_conv_same_fwd, _conv_same_bwd)


def _use_matmul_grad(x_shape, kernel_shape, stride: int, padding: int) -> bool:
  kh, kw, c, _ = kernel_shape
  if stride != 1 or kh != kw or kh % 2 == 0 or padding != (kh - 1) // 2 or kh == 1:
    return False
  if _conv_weight_grad == "matmul":
    return True
  if _conv_weight_grad == "xla":
    return False
  return (jax.default_backend() == "cpu" and c >= _MATMUL_GRAD_MIN_CHANNELS
          and x_shape[1] * x_shape[2] >= _MATMUL_GRAD_MIN_POSITIONS)


class Conv2d(nnx.Module):
  """NHWC 2-D convolution with symmetric zero padding (torch `nn.Conv2d(padding=p)`).

  Attributes: kernel [kh, kw, in, out] (HWIO); bias [out].
  """

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
               stride: int = 1, padding: int = 1, use_bias: bool = True, dtype=None,
               param_dtype=jnp.float32, kernel_init=_default_kernel_init, rngs: nnx.Rngs):
    self.in_channels = in_channels
    self.out_channels = out_channels
    self.stride = stride
    self.padding = padding
    self.dtype = dtype
    self.kernel = make_param(rngs, kernel_init, (kernel_size, kernel_size, in_channels,
                                                 out_channels), param_dtype, CONV_KERNEL_AXES)
    self.bias = (make_param(rngs, initializers.zeros, (out_channels,), param_dtype,
                            ("conv_out",)) if use_bias else None)
    # Low-rank adapter, attached by `models.lora.apply_lora` (None = no adapter).
    self.lora_down = nnx.data(None)  # LoRAParam [kh, kw, in, rank]: same window as the kernel.
    self.lora_up = nnx.data(None)  # LoRAParam [rank, out]: a 1x1 convolution.
    self.lora_scale = 0.0
    self.lora_merged = False

  def _conv(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
    if kernel.shape[0] == 1 and kernel.shape[1] == 1 and self.stride == 1 and self.padding == 0:
      return jnp.dot(x, kernel[0, 0])  # 1x1 convolution = dense layer.
    if _use_matmul_grad(x.shape, kernel.shape, self.stride, self.padding):
      return _conv_same_matmul_grad(x, kernel)
    p = self.padding
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(self.stride, self.stride), padding=((p, p), (p, p)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, in] -> [B, H', W', out]."""
    dtype = _compute_dtype(self.dtype, x)
    x = x.astype(dtype)
    y = self._conv(x, self.kernel[...].astype(dtype))
    if self.lora_down is not None and not self.lora_merged:
      low = self._conv(x, self.lora_down[...].astype(dtype))
      y = y + jnp.dot(low, self.lora_up[...].astype(dtype)) * self.lora_scale
    if self.bias is not None:
      y = y + self.bias[...].astype(dtype)
    return y


class GroupNorm(nnx.Module):
  """Group normalisation over the channel (last) axis, as torch `nn.GroupNorm`.

  Statistics over all non-batch positions and the channels of each group, in float32, biased
  variance, `(x - mean) / sqrt(var + eps) * scale + bias`.
  """

  def __init__(self, num_channels: int, num_groups: int, *, eps: float = 1e-5,
               affine: bool = True, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by "
                       f"num_groups={num_groups}")
    self.num_channels = num_channels
    self.num_groups = num_groups
    self.eps = eps
    self.dtype = dtype
    if affine:
      self.scale = make_param(rngs, initializers.ones, (num_channels,), param_dtype, NORM_AXES)
      self.bias = make_param(rngs, initializers.zeros, (num_channels,), param_dtype, NORM_AXES)
    else:
      self.scale = None
      self.bias = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, ..., C] -> same shape, in the compute dtype."""
    dtype = _compute_dtype(self.dtype, x)
    shape = x.shape
    g = self.num_groups
    xg = x.astype(jnp.float32).reshape(shape[0], -1, g, shape[-1] // g)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    centred = xg - mean
    var = jnp.mean(jnp.square(centred), axis=(1, 3), keepdims=True)
    y = (centred * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    if self.scale is not None:
      y = y * self.scale[...] + self.bias[...]
    return y.astype(dtype)


class LayerNorm(nnx.Module):
  """Layer normalisation over the last axis (torch `nn.LayerNorm`), statistics in float32."""

  def __init__(self, dim: int, *, eps: float = 1e-5, elementwise_affine: bool = True,
               use_bias: bool = True, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dim = dim
    self.eps = eps
    self.dtype = dtype
    self.scale = (make_param(rngs, initializers.ones, (dim,), param_dtype, NORM_AXES)
                  if elementwise_affine else None)
    self.bias = (make_param(rngs, initializers.zeros, (dim,), param_dtype, NORM_AXES)
                 if elementwise_affine and use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = _compute_dtype(self.dtype, x)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...]
    if self.bias is not None:
      y = y + self.bias[...]
    return y.astype(dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}


def get_activation(name: str):
  if name not in ACTIVATIONS:
    raise KeyError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


class ResnetBlock2D(nnx.Module):
  """diffusers `ResnetBlock2D` (pre-norm, time_embedding_norm="default").

  norm1 - act - conv1 (+ time_emb_proj(act(temb)) per channel) - norm2 - act - dropout - conv2,
  plus the input (through a 1x1 `conv_shortcut` when channels change), divided by
  `output_scale_factor`. `temb_channels=None` (the VAE) has no time projection.
  """

  def __init__(self, in_channels: int, out_channels: Optional[int] = None, *,
               temb_channels: Optional[int] = 512, groups: int = 32,
               groups_out: Optional[int] = None, eps: float = 1e-6, dropout: float = 0.0,
               act_fn: str = "silu", output_scale_factor: float = 1.0,
               use_in_shortcut: Optional[bool] = None, conv_shortcut_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    out_channels = in_channels if out_channels is None else out_channels
    groups_out = groups if groups_out is None else groups_out
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = get_activation(act_fn)
    self.output_scale_factor = output_scale_factor
    self.norm1 = GroupNorm(in_channels, groups, eps=eps, **kw)
    self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, **kw)
    # Its output is a bias per conv1 channel: named like conv1's channels, not "mlp" (which
    # the tensor axis splits, and would carry over into the convolutions).
    self.time_emb_proj = (Dense(temb_channels, out_channels, axes=("embed", "conv_out"), **kw)
                          if temb_channels is not None else None)
    self.norm2 = GroupNorm(out_channels, groups_out, eps=eps, **kw)
    self.dropout = make_dropout(dropout, rngs)
    self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, **kw)
    if use_in_shortcut is None:
      use_in_shortcut = in_channels != out_channels
    self.conv_shortcut = (Conv2d(in_channels, out_channels, 1, padding=0,
                                 use_bias=conv_shortcut_bias, **kw)
                          if use_in_shortcut else None)

  def __call__(self, x: jax.Array, temb: Optional[jax.Array] = None) -> jax.Array:
    """x [B, H, W, Cin], temb [B, T] (or None) -> [B, H, W, Cout]."""
    h = self.conv1(self.act(self.norm1(x)))
    if self.time_emb_proj is not None:
      if temb is None:
        raise ValueError("ResnetBlock2D with temb_channels needs a time embedding")
      h = h + self.time_emb_proj(self.act(temb))[:, None, None, :].astype(h.dtype)
    h = self.conv2(self.dropout(self.act(self.norm2(h))))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    out = x.astype(h.dtype) + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nnx.Module):
  """diffusers `Downsample2D`: 3x3 stride-2 `conv` (padding p; p=0 pads right/bottom by one
  first, as diffusers), or 2x2 average pooling when `use_conv=False`."""

  def __init__(self, channels: int, *, use_conv: bool = True, out_channels: Optional[int] = None,
               padding: int = 1, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    out_channels = channels if out_channels is None else out_channels
    self.padding = padding
    if use_conv:
      self.conv = Conv2d(channels, out_channels, 3, stride=2, padding=padding, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    else:
      if out_channels != channels:
        raise ValueError("Downsample2D without conv cannot change the channel count")
      self.conv = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H//2, W//2, Cout]."""
    if self.conv is None:
      b, h, w, c = x.shape
      x = x[:, :h // 2 * 2, :w // 2 * 2]
      return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return self.conv(x)


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize of [B, H, W, C] to `size`, torch `F.interpolate(mode="nearest")`
  (source index floor(dst * in / out))."""
  b, h, w, c = x.shape
  oh, ow = size
  if (oh, ow) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32)
  cols = jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32)
  return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  """diffusers `Upsample2D`: nearest x2 (or to `output_size`), then a 3x3 `conv`."""

  def __init__(self, channels: int, *, use_conv: bool = True, out_channels: Optional[int] = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    out_channels = channels if out_channels is None else out_channels
    self.conv = (Conv2d(channels, out_channels, 3, padding=1, dtype=dtype,
                        param_dtype=param_dtype, rngs=rngs) if use_conv else None)

  def __call__(self, x: jax.Array, output_size: Optional[tuple[int, int]] = None) -> jax.Array:
    """[B, H, W, C] -> [B, 2H, 2W, Cout] (or output_size)."""
    size = (2 * x.shape[1], 2 * x.shape[2]) if output_size is None else tuple(output_size)
    x = resize_nearest(x, size)
    return x if self.conv is None else self.conv(x)


class SpatialSelfAttention(nnx.Module):
  """diffusers `Attention` as used in the VAE mid-block: group norm, self-attention over the
  H*W positions (`heads` heads, biases on q/k/v/out), residual connection, division by
  `rescale_output_factor`. Parameters: group_norm, to_q, to_k, to_v, to_out[0]."""

  def __init__(self, channels: int, *, heads: int = 1, norm_groups: int = 32,
               eps: float = 1e-6, rescale_output_factor: float = 1.0, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if channels % heads:
      raise ValueError(f"channels={channels} not divisible by heads={heads}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.rescale_output_factor = rescale_output_factor
    self.group_norm = GroupNorm(channels, norm_groups, eps=eps, **kw)
    self.to_q = Dense(channels, channels, axes=("embed", "heads"), **kw)
    self.to_k = Dense(channels, channels, axes=("embed", "heads"), **kw)
    self.to_v = Dense(channels, channels, axes=("embed", "heads"), **kw)
    self.to_out = nnx.List([Dense(channels, channels, axes=("heads", "embed"), **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, H, W, C]."""
    b, h, w, c = x.shape
    y = self.group_norm(x).reshape(b, h * w, c)
    split = lambda t: t.reshape(b, h * w, self.heads, c // self.heads)
    q, k, v = split(self.to_q(y)), split(self.to_k(y)), split(self.to_v(y))
    o = attention_lib.attention(q, k, v).reshape(b, h * w, c)
    o = self.to_out[0](o).reshape(b, h, w, c)
    out = o + x.astype(o.dtype)
    if self.rescale_output_factor != 1.0:
      out = out / self.rescale_output_factor
    return out
