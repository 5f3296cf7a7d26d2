"""Image encoder for cross-attention context: a CLIP vision tower (ViT) + a learned projection.

`ImageEncoder.vision_model` is a `CLIPVisionTransformer` whose attribute names mirror
transformers' `CLIPVisionModel` (`embeddings.{class_embedding, patch_embedding,
position_embedding}`, `pre_layrnorm` (sic), `encoder.layers[i]...`, `post_layernorm`), so
`convert.load_transformers_clip_vision` fills it from a `CLIPVisionModel` or
`CLIPVisionModelWithProjection` checkpoint (the latter's `visual_projection` goes to
`vision_model.visual_projection`). It is equally usable from random initialisation with a tiny
config (the demo trains from scratch).

Input: NHWC images in [-1, 1], any size. Inside, they are mapped to [0, 1], resized to the tower's
`image_size` x `image_size` (bilinear with antialiasing, `jax.image.resize`; the whole image, no
centre crop, because dense tasks need every pixel; aspect ratio is not kept) and normalised by
the CLIP mean/std (`CLIP_MEAN`, `CLIP_STD`, the constants of every OpenAI/OpenCLIP preprocessor
config; override with `mean=`/`std=`).

Output: tokens of a chosen layer (`layer=-1` the last encoder layer = transformers'
`last_hidden_state`, `-2` the penultimate one as IP-Adapter uses), all tokens (class token first)
or patch tokens only or the class token only (`tokens="all" | "patch" | "cls"`), optionally passed
through `post_layernorm`, then projected by `proj` (a Dense, logical axes ("embed", "context")) to
the UNet's `cross_attention_dim` (no projection when `context_dim` is None).

Freezing the tower: with `trainable=False` the tower's output goes through `stop_gradient` (no
backward pass through it), and the optimizer must also leave its parameters out (weight decay
would otherwise still move them). The tower's parameters all live under the path component
`FROZEN_TOWER_PATH` ("vision_model"), so the optimizer filter is
`nnx.All(nnx.Param, nnx.Not(nnx.PathContains(FROZEN_TOWER_PATH)))` (for `nnx.Optimizer(...,
wrt=...)`; it works from any enclosing model as long as no other sub-module is called
"vision_model"). `ImageEncoder.optimizer_filter()` returns that filter (or plain `nnx.Param` when
trainable). The projection `proj` is always trainable.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dense_diffusion.models import initializers
from dense_diffusion.models import layers
from dense_diffusion.models import text_encoder as clip_blocks

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FROZEN_TOWER_PATH = "vision_model"
TOKEN_CHOICES = ("all", "patch", "cls")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  """The keys of transformers' `CLIPVisionConfig` that the model uses."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: Optional[int] = None  # set: the tower has `visual_projection` (WithProjection)

  def __post_init__(self):
    clip_blocks.get_clip_activation(self.hidden_act)
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], *, with_projection: bool = False
                ) -> "CLIPVisionConfig":
    """From a transformers `config.json` dict (a `CLIPConfig`'s `vision_config` is accepted).

    `projection_dim` is kept only when `with_projection` (the dict of a plain `CLIPVisionModel`
    carries an unused `projection_dim` too).
    """
    if "vision_config" in d and "hidden_size" not in d:
      d = d["vision_config"]
    names = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
    kw = {k: v for k, v in d.items() if k in names and v is not None}
    if with_projection:
      if "projection_dim" not in d:
        raise ValueError("with_projection=True but the config has no 'projection_dim'")
      kw["projection_dim"] = d["projection_dim"]
    return cls(**kw)


class CLIPVisionEmbeddings(nnx.Module):
  """[class] + patch tokens (conv without bias, stride = patch) + position embeddings."""

  def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    d = config.hidden_size
    self.patch_size = config.patch_size
    self.class_embedding = layers.make_param(rngs, initializers.normal(d ** -0.5), (d,),
                                             param_dtype, ("embed",))
    self.patch_embedding = layers.Conv2d(config.num_channels, d, config.patch_size,
                                         stride=config.patch_size, padding=0, use_bias=False,
                                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.position_embedding = layers.Embedding(config.num_patches + 1, d,
                                               axes=("position", "embed"),
                                               param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    """Normalised pixels [B, S, S, C] -> tokens [B, 1 + (S/p)^2, D]."""
    x = self.patch_embedding(pixels)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, d))
    x = jnp.concatenate([cls, x], axis=1)
    return x + self.position_embedding.embedding[...].astype(x.dtype)


class CLIPVisionTransformer(nnx.Module):
  """transformers `CLIPVisionModel` (plus `visual_projection` when `config.projection_dim`)."""

  def __init__(self, config: CLIPVisionConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.embeddings = CLIPVisionEmbeddings(config, **kw)
    self.pre_layrnorm = layers.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
    self.encoder = clip_blocks.CLIPEncoder(config.num_hidden_layers, config.hidden_size,
                                           config.num_attention_heads, config.intermediate_size,
                                           config.hidden_act, config.layer_norm_eps, **kw)
    self.post_layernorm = layers.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, **kw)
    self.visual_projection = (
        layers.Dense(config.hidden_size, config.projection_dim, use_bias=False,
                     axes=("embed", "mlp"), **kw) if config.projection_dim else None)

  def __call__(self, pixels: jax.Array, *, layer: int = -1) -> jax.Array:
    """CLIP-normalised pixels [B, S, S, C] -> hidden states [B, 1 + N, D] of `layer`.

    `layer=-1` is the output of the last encoder layer (transformers' `last_hidden_state`, no
    post_layernorm); `layer=-k` the output of layer N-k+1 (transformers' `hidden_states[-k]`).
    """
    s = self.config.image_size
    if pixels.shape[1:3] != (s, s):
      raise ValueError(f"pixels must be [B, {s}, {s}, C], got {pixels.shape}")
    n = self.config.num_hidden_layers
    if not -n <= layer <= -1:
      raise ValueError(f"layer={layer} must be in [-{n}, -1]")
    x = self.pre_layrnorm(self.embeddings(pixels))
    return self.encoder(x, causal=False, num_layers=n + 1 + layer)

  def pooled(self, hidden: jax.Array) -> jax.Array:
    """post_layernorm of the class token: [B, 1 + N, D] -> [B, D] (transformers' pooler)."""
    return self.post_layernorm(hidden[:, 0])


class ImageEncoder(nnx.Module):
  """CLIP vision tower + projection to the cross-attention width.

  Args:
    config: the tower's `CLIPVisionConfig`.
    context_dim: output width (the UNet's `cross_attention_dim`); None = no projection.
    layer: which encoder layer's tokens (-1 last, -2 penultimate, ...).
    tokens: "all" (class token first), "patch" (without the class token) or "cls".
    post_layernorm: apply the tower's `post_layernorm` to the returned tokens.
    trainable: False = no gradient through the tower (see the module docstring for the optimizer
      filter).
    mean, std: per-channel normalisation applied to [0, 1] pixels (CLIP constants by default).
  """

  def __init__(self, config: CLIPVisionConfig, *, context_dim: Optional[int] = None,
               layer: int = -1, tokens: str = "all", post_layernorm: bool = False,
               trainable: bool = False, mean: Sequence[float] = CLIP_MEAN,
               std: Sequence[float] = CLIP_STD, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if tokens not in TOKEN_CHOICES:
      raise ValueError(f"tokens={tokens!r} must be one of {TOKEN_CHOICES}")
    if len(mean) != config.num_channels or len(std) != config.num_channels:
      raise ValueError(f"mean/std need {config.num_channels} values, got {mean}, {std}")
    self.config = config
    self.layer = layer
    self.tokens = tokens
    self.use_post_layernorm = post_layernorm
    self.trainable = trainable
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.context_dim = context_dim
    self.vision_model = CLIPVisionTransformer(config, dtype=dtype, param_dtype=param_dtype,
                                              rngs=rngs)
    self.proj = self.make_proj(rngs)

  def make_proj(self, rngs: nnx.Rngs) -> Optional[layers.Dense]:
    """A freshly initialised projection to `context_dim` (None when `context_dim` is None)."""
    if self.context_dim is None:
      return None
    return layers.Dense(self.config.hidden_size, self.context_dim, axes=("embed", "context"),
                        dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

  @property
  def num_tokens(self) -> int:
    return {"all": self.config.num_patches + 1, "patch": self.config.num_patches,
            "cls": 1}[self.tokens]

  def preprocess(self, images: jax.Array) -> jax.Array:
    """NHWC [-1, 1] images of any size -> CLIP-normalised [B, S, S, C] (float32)."""
    if images.ndim != 4 or images.shape[-1] != self.config.num_channels:
      raise ValueError(f"images must be [B, H, W, {self.config.num_channels}], got "
                       f"{images.shape}")
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    s = self.config.image_size
    if x.shape[1:3] != (s, s):
      x = jax.image.resize(x, (x.shape[0], s, s, x.shape[3]), method="bilinear", antialias=True)
    return (x - jnp.asarray(self.mean)) / jnp.asarray(self.std)

  def features(self, pixels: jax.Array) -> jax.Array:
    """CLIP-normalised [B, S, S, C] -> selected tokens [B, T, D] before the projection."""
    h = self.vision_model(pixels, layer=self.layer)
    if self.use_post_layernorm:
      h = self.vision_model.post_layernorm(h)
    h = {"all": h, "patch": h[:, 1:], "cls": h[:, :1]}[self.tokens]
    if not self.trainable:
      h = jax.lax.stop_gradient(h)
    return h

  def __call__(self, images: jax.Array) -> jax.Array:
    """NHWC images in [-1, 1] [B, H, W, 3] -> context tokens [B, T, context_dim]."""
    x = self.preprocess(images)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    h = self.features(x)
    return self.proj(h) if self.proj is not None else h

  def optimizer_filter(self):
    """The NNX filter of the parameters an optimizer should update."""
    if self.trainable:
      return nnx.Param
    return nnx.All(nnx.Param, nnx.Not(nnx.PathContains(FROZEN_TOWER_PATH)))
