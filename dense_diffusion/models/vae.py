"""diffusers `AutoencoderKL` (the Stable Diffusion VAE) in Flax NNX, NHWC.

The module tree mirrors diffusers' names (`encoder.{conv_in, down_blocks[i].{resnets[j],
downsamplers[0]}, mid_block.{resnets[0], attentions[0], resnets[1]}, conv_norm_out, conv_out}`,
`decoder.{conv_in, mid_block, up_blocks[i].{resnets[j], upsamplers[0]}, conv_norm_out,
conv_out}`, `quant_conv`, `post_quant_conv`) so `convert/vae.py` is a renaming rule. Building blocks
(ResnetBlock2D without time embedding, Downsample2D with diffusers' asymmetric padding,
Upsample2D, the mid-block SpatialSelfAttention with a single head) come from `models/layers.py`.

Numerics as diffusers: every ResnetBlock2D / attention / output GroupNorm uses `norm_num_groups`
groups and eps 1e-6; the encoder's `conv_out` gives 2 * latent_channels moments (mean, logvar),
`quant_conv` (1x1) follows when `use_quant_conv`; logvar is clipped to [-30, 20]; the decoder takes
`post_quant_conv(z)` when `use_post_quant_conv`. No clipping of the decoded image.

Latent scaling: diffusion runs on `(z - shift_factor) * scaling_factor` (shift 0 when the config has
none). `encode(..., scaled=True)` returns that, `decode(..., scaled=True)` inverts it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dense_diffusion.models import layers

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
VAE_EPS = 1e-6

# config.json keys that do not change the computation here (diffusers bookkeeping, tiling and
# upcasting hints, pipeline-level latent statistics).
_IGNORED_KEYS = frozenset({"sample_size", "force_upcast", "latents_mean", "latents_std"})


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers `AutoencoderKL` config keys."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple = (DOWN_BLOCK,) * 4
  up_block_types: tuple = (UP_BLOCK,) * 4
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  def __post_init__(self):
    object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
    object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
    object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
    n = len(self.block_out_channels)
    for key, types, want in (("down_block_types", self.down_block_types, DOWN_BLOCK),
                             ("up_block_types", self.up_block_types, UP_BLOCK)):
      bad = [t for t in types if t != want]
      if bad:
        raise ValueError(f"unsupported {key} {bad}: only {want!r} is implemented")
      if len(types) != n:
        raise ValueError(f"{key} has {len(types)} entries but block_out_channels has {n}")
    layers.get_activation(self.act_fn)
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(f"norm_num_groups={self.norm_num_groups} does not divide "
                         f"block_out_channels entry {c}")

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "VAEConfig":
    """From a diffusers `config.json` dict; unknown keys raise, naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if not k.startswith("_") and k not in names
                     and k not in _IGNORED_KEYS)
    if unknown:
      raise ValueError(f"unsupported AutoencoderKL config key(s) {unknown}; supported: "
                       f"{sorted(names | _IGNORED_KEYS)}")
    return cls(**{k: v for k, v in d.items() if k in names})


class DownEncoderBlock2D(nnx.Module):
  """resnets[0..n-1], then downsamplers[0] (3x3 stride-2 conv, padding (0, 1)) unless last."""

  def __init__(self, cin: int, cout: int, num_layers: int, add_downsample: bool, cfg: VAEConfig,
               **kw):
    self.resnets = nnx.List([
        layers.ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None,
                             groups=cfg.norm_num_groups, eps=VAE_EPS, act_fn=cfg.act_fn, **kw)
        for i in range(num_layers)])
    self.downsamplers = (nnx.List([layers.Downsample2D(cout, use_conv=True, padding=0, **kw)])
                         if add_downsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):
  """resnets[0..n-1], then upsamplers[0] (nearest x2 + 3x3 conv) unless last."""

  def __init__(self, cin: int, cout: int, num_layers: int, add_upsample: bool, cfg: VAEConfig,
               **kw):
    self.resnets = nnx.List([
        layers.ResnetBlock2D(cin if i == 0 else cout, cout, temb_channels=None,
                             groups=cfg.norm_num_groups, eps=VAE_EPS, act_fn=cfg.act_fn, **kw)
        for i in range(num_layers)])
    self.upsamplers = (nnx.List([layers.Upsample2D(cout, use_conv=True, **kw)])
                       if add_upsample else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    for r in self.resnets:
      x = r(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class MidBlock2D(nnx.Module):
  """diffusers `UNetMidBlock2D` without time embedding: resnet, [attention], resnet."""

  def __init__(self, channels: int, cfg: VAEConfig, **kw):
    res = lambda: layers.ResnetBlock2D(channels, channels, temb_channels=None,
                                       groups=cfg.norm_num_groups, eps=VAE_EPS,
                                       act_fn=cfg.act_fn, **kw)
    self.resnets = nnx.List([res(), res()])
    self.attentions = (nnx.List([layers.SpatialSelfAttention(
        channels, heads=1, norm_groups=cfg.norm_num_groups, eps=VAE_EPS, **kw)])
                       if cfg.mid_block_add_attention else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class Encoder(nnx.Module):
  """[B, H, W, in] -> moments [B, H/f, W/f, 2 * latent] (before quant_conv)."""

  def __init__(self, cfg: VAEConfig, **kw):
    ch = cfg.block_out_channels
    self.conv_in = layers.Conv2d(cfg.in_channels, ch[0], 3, padding=1, **kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block,
                           i < len(ch) - 1, cfg, **kw) for i in range(len(ch))])
    self.mid_block = MidBlock2D(ch[-1], cfg, **kw)
    self.conv_norm_out = layers.GroupNorm(ch[-1], cfg.norm_num_groups, eps=VAE_EPS, **kw)
    self.conv_out = layers.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # conv_act is always SiLU


class Decoder(nnx.Module):
  """[B, h, w, latent] -> [B, h*f, w*f, out]."""

  def __init__(self, cfg: VAEConfig, **kw):
    rev = tuple(reversed(cfg.block_out_channels))
    self.conv_in = layers.Conv2d(cfg.latent_channels, rev[0], 3, padding=1, **kw)
    self.mid_block = MidBlock2D(rev[0], cfg, **kw)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1,
                         i < len(rev) - 1, cfg, **kw) for i in range(len(rev))])
    self.conv_norm_out = layers.GroupNorm(rev[-1], cfg.norm_num_groups, eps=VAE_EPS, **kw)
    self.conv_out = layers.Conv2d(rev[-1], cfg.out_channels, 3, padding=1, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))  # conv_act is always SiLU


class AutoencoderKL(nnx.Module):
  """The VAE. Images NHWC (in [-1, 1] for SD weights), latents NHWC.

  Attributes: `config`, `encoder`, `decoder`, `quant_conv` / `post_quant_conv` (1x1 convs, or
  None when the config disables them).
  """

  def __init__(self, config: VAEConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.encoder = Encoder(config, **kw)
    self.decoder = Decoder(config, **kw)
    lc = config.latent_channels
    self.quant_conv = (layers.Conv2d(2 * lc, 2 * lc, 1, padding=0, **kw)
                       if config.use_quant_conv else None)
    self.post_quant_conv = (layers.Conv2d(lc, lc, 1, padding=0, **kw)
                            if config.use_post_quant_conv else None)

  def _check(self, x: jax.Array, channels: int, what: str):
    if x.ndim != 4 or x.shape[-1] != channels:
      raise ValueError(f"{what} must be NHWC with {channels} channels, got shape {x.shape}")

  def encode_moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, H, W, in] -> mean, logvar [B, H/f, W/f, latent] (logvar clipped to [-30, 20]).

    H and W must be multiples of `config.downsample_factor` for an exact inverse size.
    """
    self._check(images, self.config.in_channels, "images")
    m = self.encoder(images)
    if self.quant_conv is not None:
      m = self.quant_conv(m)
    mean, logvar = jnp.split(m, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, images: jax.Array, *, rng: Optional[jax.Array] = None, sample: bool = False,
             scaled: bool = False) -> jax.Array:
    """Latents of `images` [B, H, W, in] -> [B, H/f, W/f, latent].

    Args:
      images: NHWC images.
      rng: PRNG key, required when `sample`.
      sample: draw mean + std * N(0, 1) instead of returning the mean.
      scaled: return `(z - shift_factor) * scaling_factor` (what the diffusion model sees).
    """
    mean, logvar = self.encode_moments(images)
    z = mean
    if sample:
      if rng is None:
        raise ValueError("encode(sample=True) needs an rng key")
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    return self.scale_latents(z) if scaled else z

  def scale_latents(self, z: jax.Array) -> jax.Array:
    shift = self.config.shift_factor or 0.0
    return (z - shift) * self.config.scaling_factor

  def unscale_latents(self, z: jax.Array) -> jax.Array:
    shift = self.config.shift_factor or 0.0
    return z / self.config.scaling_factor + shift

  def decode(self, latents: jax.Array, *, scaled: bool = False) -> jax.Array:
    """[B, h, w, latent] -> images [B, h*f, w*f, out] (not clipped).

    `scaled=True` takes latents in the diffusion model's scale (see `encode`).
    """
    self._check(latents, self.config.latent_channels, "latents")
    z = self.unscale_latents(latents) if scaled else latents
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Reconstruction through the posterior mean."""
    return self.decode(self.encode(images))
