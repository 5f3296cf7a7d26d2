"""The conditional diffusion UNet (diffusers `UNet2DConditionModel`, SD 1.x / 2.x), Flax NNX, NHWC.

The model is configured by the keys of a diffusers `config.json` (`UNET_CONFIG_KEYS` lists every
key with its default and the values we accept; `UNET_METADATA_KEYS` are accepted and ignored). A
key or value outside those raises a ValueError naming it, so a checkpoint we cannot reproduce is
never loaded silently wrong.

Module and parameter names mirror diffusers' (`down_blocks[i].attentions[j].transformer_blocks[k]
.attn1.to_q.kernel`, ...), so the converter maps checkpoint keys by renaming the leaf only.

    unet = UNet(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    eps = unet(sample, timesteps, context)            # [B,H,W,Cin], [B] or (), [B,L,D] -> [B,H,W,Cout]
    eps, feats = unet(sample, t, context, return_features=True)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dense_diffusion import errors
from dense_diffusion import registry
from dense_diffusion import sharding
from dense_diffusion.models import attention as attention_lib
from dense_diffusion.models import layers

_CROSS_DOWN = "CrossAttnDownBlock2D"
_PLAIN_DOWN = "DownBlock2D"
_CROSS_UP = "CrossAttnUpBlock2D"
_PLAIN_UP = "UpBlock2D"
_CROSS_MID = "UNetMidBlock2DCrossAttn"


# ------------------------------------------------------------------------------------------------
# Config table.


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int_or_list(v) -> bool:
  return _is_int(v) or (isinstance(v, (list, tuple)) and all(_is_int(x) for x in v))


def _one_of(*allowed):
  def check(v):
    return any(v is a or (a is not None and type(v) is type(a) and v == a) or
               (isinstance(a, float) and _is_number(v) and v == a) for a in allowed)
  check.desc = " or ".join(repr(a) for a in allowed)
  return check


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _desc(fn, text):
  fn.desc = text
  return fn


_POSITIVE_INT = _desc(lambda v: _is_int(v) and v > 0, "a positive int")
_NUMBER = _desc(_is_number, "a number")
_BOOL = _desc(lambda v: isinstance(v, bool), "true or false")
_INT_OR_LIST = _desc(_int_or_list, "an int or a list of ints (one per block)")
_OPT_INT_OR_LIST = _desc(lambda v: v is None or _int_or_list(v), "null, an int or a list of ints")
_BOOL_OR_LIST = _desc(
    lambda v: isinstance(v, bool) or (isinstance(v, (list, tuple)) and
                                     all(isinstance(x, bool) for x in v)),
    "a bool or a list of bools (one per block)")
_ODD_INT = _desc(lambda v: _is_int(v) and v > 0 and v % 2 == 1, "an odd positive int")
_DOWN_TYPES = _desc(
    lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and
    all(x in (_CROSS_DOWN, _PLAIN_DOWN) for x in v),
    f"a non-empty list of {_CROSS_DOWN!r} / {_PLAIN_DOWN!r}")
_UP_TYPES = _desc(
    lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and
    all(x in (_CROSS_UP, _PLAIN_UP) for x in v),
    f"a non-empty list of {_CROSS_UP!r} / {_PLAIN_UP!r}")
_CHANNELS = _desc(
    lambda v: isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_int(x) and x > 0 for x in v),
    "a non-empty list of positive ints")
_TRANSFORMER_LAYERS = _desc(
    lambda v: _int_or_list(v) or (isinstance(v, (list, tuple)) and
                                  all(_int_or_list(x) for x in v)),
    "an int, a list of ints per block, or a list of per-layer lists")
_OPT_TRANSFORMER_LAYERS = _desc(
    lambda v: v is None or _TRANSFORMER_LAYERS(v), "null or " + _TRANSFORMER_LAYERS.desc)
_OPT_POSITIVE_INT = _desc(lambda v: v is None or (_is_int(v) and v > 0), "null or a positive int")
_OPT_BOOL = _desc(lambda v: v is None or isinstance(v, bool), "null, true or false")
_ANY_INT = _desc(_is_int, "an int (unused without addition_embed_type)")

# key: (default, check). Every key of diffusers' UNet2DConditionModel.__init__ is listed; keys
# whose only accepted value is the default are features we do not implement.
UNET_CONFIG_KEYS: dict[str, tuple[Any, Callable[[Any], bool]]] = {
    "in_channels": (4, _POSITIVE_INT),
    "out_channels": (4, _POSITIVE_INT),
    "center_input_sample": (False, _BOOL),
    "flip_sin_to_cos": (True, _BOOL),
    "freq_shift": (0, _NUMBER),
    "down_block_types": ((_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _PLAIN_DOWN), _DOWN_TYPES),
    "mid_block_type": (_CROSS_MID, _one_of(_CROSS_MID, None)),
    "up_block_types": ((_PLAIN_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP), _UP_TYPES),
    "only_cross_attention": (False, _BOOL_OR_LIST),
    "block_out_channels": ((320, 640, 1280, 1280), _CHANNELS),
    "layers_per_block": (2, _INT_OR_LIST),
    "downsample_padding": (1, _desc(lambda v: _is_int(v) and v >= 0, "a non-negative int")),
    "mid_block_scale_factor": (1.0, _NUMBER),
    "dropout": (0.0, _desc(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")),
    "act_fn": ("silu", _desc(lambda v: v in ("silu", "swish"), "'silu' or 'swish'")),
    "norm_num_groups": (32, _POSITIVE_INT),
    "norm_eps": (1e-5, _NUMBER),
    "cross_attention_dim": (1280, _INT_OR_LIST),
    "transformer_layers_per_block": (1, _TRANSFORMER_LAYERS),
    "reverse_transformer_layers_per_block": (None, _OPT_TRANSFORMER_LAYERS),
    "attention_head_dim": (8, _INT_OR_LIST),
    "num_attention_heads": (None, _OPT_INT_OR_LIST),
    "use_linear_projection": (False, _BOOL),
    "upcast_attention": (False, _BOOL),
    "resnet_time_scale_shift": ("default", _one_of("default")),
    "time_embedding_type": ("positional", _one_of("positional")),
    "time_embedding_dim": (None, _OPT_POSITIVE_INT),
    "conv_in_kernel": (3, _ODD_INT),
    "conv_out_kernel": (3, _ODD_INT),
    "mid_block_only_cross_attention": (None, _OPT_BOOL),  # diffusers' mid block ignores it too.
    # A learned embedding per class label, added to the timestep embedding (with
    # class_embed_type None, as diffusers does); the generalist passes the task index.
    "num_class_embeds": (None, _OPT_POSITIVE_INT),
    # "projection": `class_embedding` is a TimestepEmbedding (linear_1 - silu - linear_2) from
    # a vector of projection_class_embeddings_input_dim to the timestep embedding's width, added
    # to it (num_class_embeds is then unused, as in diffusers); the generalist passes the task
    # prompt's pooled embedding.
    "class_embed_type": (None, _one_of(None, "projection")),
    "projection_class_embeddings_input_dim": (None, _OPT_POSITIVE_INT),
    # Features not implemented: only the default is accepted.
    "encoder_hid_dim": (None, _one_of(None)),
    "encoder_hid_dim_type": (None, _one_of(None)),
    "dual_cross_attention": (False, _one_of(False)),
    "addition_embed_type": (None, _one_of(None)),
    "addition_time_embed_dim": (None, _one_of(None)),
    "addition_embed_type_num_heads": (64, _ANY_INT),
    "resnet_skip_time_act": (False, _one_of(False)),
    "resnet_out_scale_factor": (1.0, _one_of(1.0)),
    "time_embedding_act_fn": (None, _one_of(None)),
    "timestep_post_act": (None, _one_of(None)),
    "time_cond_proj_dim": (None, _one_of(None)),
    "attention_type": ("default", _one_of("default")),
    "class_embeddings_concat": (False, _one_of(False)),
    "cross_attention_norm": (None, _one_of(None)),
}

# Keys of a diffusers config.json that do not change the computation.
UNET_METADATA_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size",
})


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
  """Validates a diffusers UNet config and fills defaults.

  Returns a plain dict with every key of `UNET_CONFIG_KEYS` (metadata keys dropped). Raises
  ValueError naming each unknown key, or the key, value and accepted values of an unsupported
  setting.
  """
  unknown = sorted(k for k in config if k not in UNET_CONFIG_KEYS and k not in UNET_METADATA_KEYS)
  if unknown:
    raise ValueError(f"UNet config: unknown key(s) {unknown}; supported keys: "
                     f"{sorted(UNET_CONFIG_KEYS)} (ignored metadata: {sorted(UNET_METADATA_KEYS)})")
  out = {}
  for key, (default, check) in UNET_CONFIG_KEYS.items():
    value = config.get(key, default)
    if isinstance(value, list):
      value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if not check(value):
      raise ValueError(f"UNet config: {key}={value!r} is not supported; accepted: {check.desc}")
    out[key] = value
  _check_lengths(out)
  if out["class_embed_type"] == "projection":
    if not out["projection_class_embeddings_input_dim"]:
      raise ValueError("UNet config: class_embed_type='projection' needs "
                       "projection_class_embeddings_input_dim (the width of the vectors it "
                       "projects)")
    if out["num_class_embeds"] is not None:
      # diffusers ignores it silently; a config asking for both means one of them by mistake.
      raise ValueError("UNet config: num_class_embeds is unused with class_embed_type="
                       "'projection' (the class embedding projects vectors): remove one")
  return out


def class_conditioning(c: Mapping[str, Any]) -> Optional[str]:
  """What the UNet's `class_labels` are for a normalized config: "labels" (i32[B] indices of
  `num_class_embeds`), "vectors" (f32[B, projection_class_embeddings_input_dim], projected by
  class_embed_type "projection"), or None (the UNet takes no class_labels)."""
  if c["class_embed_type"] == "projection":
    return "vectors"
  return "labels" if c["num_class_embeds"] is not None else None


def make_class_embedding(c: Mapping[str, Any], time_dim: int, *, dtype=None,
                         param_dtype=jnp.float32, rngs: nnx.Rngs) -> Optional[nnx.Module]:
  """The `class_embedding` module of a normalized config (diffusers' layout and names), or None.

  Labels: an embedding table initialised as torch's nn.Embedding, N(0, 1), as diffusers' UNet
  gets it. Vectors: `TimestepEmbedding(projection_class_embeddings_input_dim, time_dim)` with
  silu, whatever the config's act_fn (diffusers builds it with its default activation).
  """
  kind = class_conditioning(c)
  if kind == "vectors":
    return TimestepEmbedding(c["projection_class_embeddings_input_dim"], time_dim, act_fn="silu",
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if kind == "labels":
    return layers.Embedding(c["num_class_embeds"], time_dim, axes=("classes", "embed"),
                            init_std=1.0, param_dtype=param_dtype, rngs=rngs)
  return None


def _check_lengths(c: dict) -> None:
  n = len(c["down_block_types"])
  if len(c["up_block_types"]) != n:
    raise ValueError(f"UNet config: up_block_types {c['up_block_types']} and down_block_types "
                     f"{c['down_block_types']} differ in length")
  for key in ("block_out_channels", "only_cross_attention", "layers_per_block",
              "cross_attention_dim", "attention_head_dim", "num_attention_heads",
              "transformer_layers_per_block"):
    v = c[key]
    if isinstance(v, tuple) and len(v) != n:
      raise ValueError(f"UNet config: {key}={v!r} must have one entry per block ({n})")


def _per_block(value, n: int) -> list:
  return list(value) if isinstance(value, tuple) else [value] * n


def _per_layer(value, n: int) -> list[int]:
  return list(value) if isinstance(value, tuple) else [value] * n


# ------------------------------------------------------------------------------------------------
# Transformer parts.


class Attention(nnx.Module):
  """diffusers `Attention` (AttnProcessor2_0) without norms: to_q/to_k/to_v (no bias), to_out[0].

  `cross_attention_dim=None` is self-attention. `upcast` computes the attention in float32.
  """

  def __init__(self, query_dim: int, *, heads: int, dim_head: int,
               cross_attention_dim: Optional[int] = None, upcast: bool = False,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    inner = heads * dim_head
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.dim_head = dim_head
    self.upcast = upcast
    kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
    kv_axes = ("embed", "heads") if cross_attention_dim is None else ("context", "heads")
    self.to_q = layers.Dense(query_dim, inner, use_bias=False, axes=("embed", "heads"), **kw)
    self.to_k = layers.Dense(kv_dim, inner, use_bias=False, axes=kv_axes, **kw)
    self.to_v = layers.Dense(kv_dim, inner, use_bias=False, axes=kv_axes, **kw)
    self.to_out = nnx.List([layers.Dense(inner, query_dim, axes=("heads", "embed"), **kw)])

  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None, *,
               return_probs: bool = False):
    """x [B, L, query_dim], context [B, Lk, kv_dim] (None = x) -> [B, L, query_dim].

    With `return_probs`, also the attention probabilities f32[B, heads, L, Lk] (computed
    explicitly, as diffusers' `get_attention_scores`, instead of by the fused kernel).
    """
    context = x if context is None else context
    b, l, _ = x.shape
    q = self.to_q(x).reshape(b, l, self.heads, self.dim_head)
    k = self.to_k(context).reshape(b, context.shape[1], self.heads, self.dim_head)
    v = self.to_v(context).reshape(b, context.shape[1], self.heads, self.dim_head)
    dtype = q.dtype
    if self.upcast:
      q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    if return_probs:
      probs = attention_lib.attention_probs(q, k)
      o = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).astype(dtype)
    else:
      o = attention_lib.attention(q, k, v).astype(dtype)
    out = self.to_out[0](o.reshape(b, l, self.heads * self.dim_head))
    return (out, probs) if return_probs else out


class GEGLU(nnx.Module):
  """proj to 2*inner, split into (hidden, gate), hidden * gelu(gate) (exact gelu)."""

  def __init__(self, dim: int, inner: int, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.proj = layers.Dense(dim, 2 * inner, axes=("embed", "mlp"), dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    # Two products with the kernel's halves, each split over the tensor axis: one product of the
    # whole kernel, split there, would give one device all of `hidden` and the other all of
    # `gate`, and their product would exchange activations (here the kernel halves move).
    inner = self.proj.out_features // 2
    names = ("batch",) + (None,) * (x.ndim - 2) + ("mlp",)
    hidden = sharding.constrain(self.proj(x, columns=(0, inner)), names)
    gate = sharding.constrain(self.proj(x, columns=(inner, 2 * inner)), names)
    return hidden * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """diffusers `FeedForward(activation_fn="geglu")`: net = [GEGLU, Dropout, Dense]."""

  def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    inner = dim * mult
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.net = nnx.List([GEGLU(dim, inner, **kw), layers.make_dropout(dropout, rngs),
                         layers.Dense(inner, dim, axes=("mlp", "embed"), **kw)])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net[2](self.net[1](self.net[0](x)))


class BasicTransformerBlock(nnx.Module):
  """Self-attention (or cross-attention when `only_cross_attention`), cross-attention and a GEGLU
  feed-forward, each pre-LayerNorm (eps 1e-5) with a residual."""

  def __init__(self, dim: int, *, heads: int, dim_head: int, cross_attention_dim: int,
               only_cross_attention: bool = False, upcast_attention: bool = False,
               dropout: float = 0.0, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.only_cross_attention = only_cross_attention
    self.norm1 = layers.LayerNorm(dim, eps=1e-5, **kw)
    self.attn1 = Attention(dim, heads=heads, dim_head=dim_head,
                           cross_attention_dim=cross_attention_dim if only_cross_attention else None,
                           upcast=upcast_attention, **kw)
    self.norm2 = layers.LayerNorm(dim, eps=1e-5, **kw)
    self.attn2 = Attention(dim, heads=heads, dim_head=dim_head,
                           cross_attention_dim=cross_attention_dim, upcast=upcast_attention, **kw)
    self.norm3 = layers.LayerNorm(dim, eps=1e-5, **kw)
    self.ff = FeedForward(dim, dropout=dropout, **kw)

  def __call__(self, x: jax.Array, context: jax.Array, *, return_probs: bool = False):
    """x [B, L, dim], context [B, Lk, cross_attention_dim] -> [B, L, dim] (and, with
    `return_probs`, attn2's probabilities f32[B, heads, L, Lk])."""
    x = x + self.attn1(self.norm1(x), context if self.only_cross_attention else None)
    cross = self.attn2(self.norm2(x), context, return_probs=return_probs)
    cross, probs = cross if return_probs else (cross, None)
    x = x + cross
    x = x + self.ff(self.norm3(x))
    return (x, probs) if return_probs else x


class Transformer2D(nnx.Module):
  """diffusers `Transformer2DModel` on continuous NHWC input: GroupNorm (eps 1e-6), proj_in
  (1x1 conv, or dense when `use_linear_projection`), transformer blocks, proj_out, residual."""

  def __init__(self, channels: int, *, heads: int, dim_head: int, num_layers: int,
               cross_attention_dim: int, norm_groups: int, use_linear_projection: bool,
               only_cross_attention: bool, upcast_attention: bool, dropout: float = 0.0,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    self.norm = layers.GroupNorm(channels, norm_groups, eps=1e-6, **kw)
    if use_linear_projection:
      # In and out of the residual stream of the transformer layers: model width on both sides
      # (not "heads", which the tensor axis splits: the stream stays whole on every device).
      self.proj_in = layers.Dense(channels, inner, axes=("embed", "embed"), **kw)
      self.proj_out = layers.Dense(inner, channels, axes=("embed", "embed"), **kw)
    else:
      self.proj_in = layers.Conv2d(channels, inner, 1, padding=0, **kw)
      self.proj_out = layers.Conv2d(inner, channels, 1, padding=0, **kw)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(inner, heads=heads, dim_head=dim_head,
                              cross_attention_dim=cross_attention_dim,
                              only_cross_attention=only_cross_attention,
                              upcast_attention=upcast_attention, dropout=dropout, **kw)
        for _ in range(num_layers)])

  def __call__(self, x: jax.Array, context: jax.Array, *, return_maps: bool = False,
               run: Optional[Runner] = None):
    """x [B, H, W, C], context [B, L, D] -> [B, H, W, C] (and, with `return_maps`,
    {"transformer_blocks.k.attn2": f32[B, heads, H*W, L]}).

    `run` runs each stage (projection in, each transformer layer, projection out): plainly
    (None) or under `jax.checkpoint` (`model.remat` at layer scope)."""
    run = run or run_plainly
    y = run(Transformer2D.tokens_in, self, x)
    maps = {}
    for k, block in enumerate(self.transformer_blocks):
      if return_maps:
        y, maps[f"transformer_blocks.{k}.attn2"] = run(_call, block, y, context,
                                                       return_probs=True)
      else:
        y = run(_call, block, y, context)
    y = run(Transformer2D.tokens_out, self, y, x)
    return (y, maps) if return_maps else y

  def tokens_in(self, x: jax.Array) -> jax.Array:
    """GroupNorm and proj_in: x [B, H, W, C] -> tokens [B, H*W, inner]."""
    b, h, w, c = x.shape
    # A 1x1 conv and a dense layer are the same map in NHWC, so both projections act on tokens.
    return self.proj_in(self.norm(x).reshape(b, h * w, c))

  def tokens_out(self, y: jax.Array, x: jax.Array) -> jax.Array:
    """proj_out of tokens y [B, H*W, inner], plus the input x [B, H, W, C] -> [B, H, W, C]."""
    y = self.proj_out(y).reshape(x.shape)
    return y + x.astype(y.dtype)


def _prefixed(prefix: str, maps: dict) -> dict:
  return {f"{prefix}.{k}": v for k, v in maps.items()}


# ------------------------------------------------------------------------------------------------
# Running a part: plainly, or as one `jax.checkpoint` (model.remat, see REMAT_POLICIES).

# run(fn, module, *args, **static) -> fn(module, *args, **static), possibly checkpointed:
# `module`'s state and `args` are the checkpoint's inputs (what the backward pass keeps of it),
# `static` are Python values (flags, sizes).
Runner = Callable[..., Any]


def _call(module, *args, **kwargs):
  return module(*args, **kwargs)


def run_plainly(fn, module, *args, **static):
  """A `Runner` that calls fn(module, *args, **static) as it is."""
  return fn(module, *args, **static)


def checkpointed(policy: Optional[Callable]) -> Runner:
  """A `Runner` that calls fn(module, ...) under `jax.checkpoint(policy=policy)`.

  Functional (split, then merge inside): the parts change no state in a call, and `nnx.remat`'s
  write-back of that state fails under an outer transform that traces the parameters
  (value_and_grad over LoRA adapters, the sampler's scan).
  """
  def run(fn, module, *args, **static):
    graphdef, state = nnx.split(module)

    def apply(state, *a):
      return fn(nnx.merge(graphdef, state), *a, **static)
    return jax.checkpoint(apply, policy=policy)(state, *args)
  return run


def _resnet_on_concat(resnet, x, skip, temb):
  """An up block's layer input: hidden state and skip concatenated (hidden first), then the
  resnet; one part, so a checkpoint keeps x and skip rather than their concatenation."""
  return resnet(jnp.concatenate([x, skip.astype(x.dtype)], axis=-1), temb)


# ------------------------------------------------------------------------------------------------
# UNet blocks.


def _resnet(in_ch, out_ch, temb, c, kw, output_scale_factor=1.0):
  return layers.ResnetBlock2D(in_ch, out_ch, temb_channels=temb, groups=c["norm_num_groups"],
                              eps=c["norm_eps"], dropout=c["dropout"], act_fn=c["act_fn"],
                              output_scale_factor=output_scale_factor, **kw)


def _transformer(ch, heads, n_layers, cross_dim, only_cross, c, kw):
  if ch % heads:
    raise ValueError(f"UNet config: {ch} channels are not divisible by {heads} attention heads")
  return Transformer2D(ch, heads=heads, dim_head=ch // heads, num_layers=n_layers,
                       cross_attention_dim=cross_dim, norm_groups=c["norm_num_groups"],
                       use_linear_projection=c["use_linear_projection"],
                       only_cross_attention=only_cross, upcast_attention=c["upcast_attention"],
                       dropout=c["dropout"], **kw)


class DownBlock(nnx.Module):
  """`CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without)."""

  def __init__(self, in_ch: int, out_ch: int, temb: int, *, num_layers: int,
               cross: bool, heads: int, transformer_layers: list[int], cross_dim: int,
               only_cross: bool, add_downsample: bool, c: dict, kw: dict):
    self.resnets = nnx.List([_resnet(in_ch if i == 0 else out_ch, out_ch, temb, c, kw)
                             for i in range(num_layers)])
    self.attentions = (nnx.List([_transformer(out_ch, heads, transformer_layers[i], cross_dim,
                                              only_cross, c, kw) for i in range(num_layers)])
                       if cross else None)
    self.downsamplers = (nnx.List([layers.Downsample2D(out_ch, use_conv=True, out_channels=out_ch,
                                                       padding=c["downsample_padding"], **kw)])
                         if add_downsample else None)

  def __call__(self, x, temb, context, return_maps: bool = False, run: Optional[Runner] = None):
    """Returns (output, tuple of skip tensors) (and, with `return_maps`, the cross-attention
    maps by their path in the block). `run` runs each layer (`Runner`; None: plainly)."""
    run = run or run_plainly
    skips, maps = [], {}
    for i, resnet in enumerate(self.resnets):
      x = run(_call, resnet, x, temb)
      if self.attentions is not None:
        if return_maps:
          x, m = self.attentions[i](x, context, return_maps=True, run=run)
          maps.update(_prefixed(f"attentions.{i}", m))
        else:
          x = self.attentions[i](x, context, run=run)
      skips.append(x)
    if self.downsamplers is not None:
      x = run(_call, self.downsamplers[0], x)
      skips.append(x)
    return (x, tuple(skips), maps) if return_maps else (x, tuple(skips))


class MidBlock(nnx.Module):
  """`UNetMidBlock2DCrossAttn`: resnet, then (attention, resnet) per layer."""

  def __init__(self, ch: int, temb: int, *, heads: int, transformer_layers: list[int],
               cross_dim: int, c: dict, kw: dict, num_layers: int = 1):
    scale = c["mid_block_scale_factor"]
    self.resnets = nnx.List([_resnet(ch, ch, temb, c, kw, scale) for _ in range(num_layers + 1)])
    self.attentions = nnx.List([_transformer(ch, heads, transformer_layers[i], cross_dim, False,
                                             c, kw) for i in range(num_layers)])

  def __call__(self, x, temb, context, return_maps: bool = False, run: Optional[Runner] = None):
    run = run or run_plainly
    x = run(_call, self.resnets[0], x, temb)
    maps = {}
    for i, (attn, resnet) in enumerate(zip(self.attentions, self.resnets[1:])):
      if return_maps:
        x, m = attn(x, context, return_maps=True, run=run)
        maps.update(_prefixed(f"attentions.{i}", m))
      else:
        x = attn(x, context, run=run)
      x = run(_call, resnet, x, temb)
    return (x, maps) if return_maps else x


class UpBlock(nnx.Module):
  """`CrossAttnUpBlock2D` (with `attentions`) or `UpBlock2D`: each layer concatenates the hidden
  state with a skip (hidden first, channel axis), then resnet (+ transformer)."""

  def __init__(self, in_ch: int, out_ch: int, prev_out_ch: int, temb: int, *, num_layers: int,
               cross: bool, heads: int, transformer_layers: list[int], cross_dim: int,
               only_cross: bool, add_upsample: bool, c: dict, kw: dict):
    resnets = []
    for i in range(num_layers):
      skip_ch = in_ch if i == num_layers - 1 else out_ch
      res_in = prev_out_ch if i == 0 else out_ch
      resnets.append(_resnet(res_in + skip_ch, out_ch, temb, c, kw))
    self.resnets = nnx.List(resnets)
    self.attentions = (nnx.List([_transformer(out_ch, heads, transformer_layers[i], cross_dim,
                                              only_cross, c, kw) for i in range(num_layers)])
                       if cross else None)
    self.upsamplers = (nnx.List([layers.Upsample2D(out_ch, use_conv=True, out_channels=out_ch,
                                                   **kw)]) if add_upsample else None)

  def __call__(self, x, skips, temb, context, upsample_size=None, return_maps: bool = False,
               run: Optional[Runner] = None):
    """Returns (output, features before the upsampler) (and, with `return_maps`, the
    cross-attention maps by their path in the block). `run` runs each layer (`Runner`; None:
    plainly)."""
    run = run or run_plainly
    skips = list(skips)
    maps = {}
    for i, resnet in enumerate(self.resnets):
      x = run(_resnet_on_concat, resnet, x, skips.pop(), temb)
      if self.attentions is not None:
        if return_maps:
          x, m = self.attentions[i](x, context, return_maps=True, run=run)
          maps.update(_prefixed(f"attentions.{i}", m))
        else:
          x = self.attentions[i](x, context, run=run)
    features = x
    if self.upsamplers is not None:
      x = run(_call, self.upsamplers[0], x, output_size=upsample_size)
    return (x, features, maps) if return_maps else (x, features)


class TimestepEmbedding(nnx.Module):
  """linear_1 - act - linear_2."""

  def __init__(self, in_dim: int, dim: int, *, act_fn: str, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = layers.get_activation(act_fn)
    self.linear_1 = layers.Dense(in_dim, dim, axes=("embed", "mlp"), **kw)
    self.linear_2 = layers.Dense(dim, dim, axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.linear_2(self.act(self.linear_1(x)))


def timestep_embedding(timesteps: jax.Array, dim: int, *, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of [B] timesteps -> [B, dim] float32 (diffusers
  `get_timestep_embedding` with scale 1)."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


# ------------------------------------------------------------------------------------------------
# The UNet.


# Rematerialisation (`model.remat`): a name is a scope and a policy, "<policy>" at block scope,
# "layer" / "layer_<policy>" at layer scope.
#
# What one checkpoint spans (the backward pass recomputes one at a time, holding all of its
# intermediates at once):
#   block scope: each down / mid / up block. Fewest kept inputs, but recomputing the first up
#     block holds 3 resnets' and 3 transformer layers' intermediates at full resolution at once.
#   layer scope ("layer_"): each resnet (an up block's with its skip concatenation), each
#     transformer layer, each transformer's projection in (GroupNorm, proj_in) and out (proj_out,
#     residual), each down / upsampler: the backward holds one layer's intermediates at a time,
#     and the inputs of every layer are kept.
#
# What a checkpoint saves from its forward pass besides its inputs (each value makes a
# `jax.checkpoint` policy): "full": nothing (least memory, one more forward of everything);
# "save_attention": every attention output (the backward pass then recomputes the
# convolutions, norms and projections, not the attention: worth it where attention is the slow
# part, at long sequences without a flash kernel); "save_dots": every matmul / conv result
# without a batch dimension (XLA's dots_with_no_batch_dims_saveable).
REMAT_POLICIES: registry.Registry[Callable[[], Optional[Callable]]] = registry.Registry(
    "remat policy")
REMAT_POLICIES.register("full")(lambda: None)
REMAT_POLICIES.register("save_attention")(
    lambda: jax.checkpoint_policies.save_only_these_names(attention_lib.CHECKPOINT_NAME))
REMAT_POLICIES.register("save_dots")(
    lambda: jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

REMAT_LAYER_PREFIX = "layer"  # "layer" = layer scope, policy "full"; "layer_<policy>" otherwise.


def remat_names() -> list[str]:
  """Every `model.remat` name besides "none": the policies (block scope), then layer scope."""
  policies = REMAT_POLICIES.names()
  return policies + [REMAT_LAYER_PREFIX if p == "full" else f"{REMAT_LAYER_PREFIX}_{p}"
                     for p in policies]


def remat_policy_name(remat: bool | str | None) -> str:
  """`model.remat` -> "none" or one of `remat_names()` (True = "full", False = "none")."""
  if remat is None or remat is False:
    return "none"
  if remat is True:
    return "full"
  if remat == "none" or remat in remat_names():
    return remat
  raise errors.ConfigError(f"model.remat={remat!r}: use False, True, 'none' or one of "
                           f"{remat_names()}")


def remat_scope(name: str) -> tuple[str, Optional[str]]:
  """A `remat_policy_name` -> (scope "none" / "block" / "layer", REMAT_POLICIES name or None)."""
  if name == "none":
    return "none", None
  if name == REMAT_LAYER_PREFIX:
    return "layer", "full"
  if name.startswith(REMAT_LAYER_PREFIX + "_"):
    return "layer", name[len(REMAT_LAYER_PREFIX) + 1:]
  return "block", name


class UNet(nnx.Module):
  """diffusers `UNet2DConditionModel` in NHWC.

  Args:
    config: a diffusers UNet config (dict of `config.json`); validated by `normalize_config`.
    dtype: compute dtype (None / float32, or bfloat16). Norm statistics and the timestep
      embedding's sinusoids are float32; the output is float32.
    param_dtype: parameter dtype.
    remat: what the backward pass keeps (`remat_names`): False / "none" (every activation);
      True / "full" (only each down/mid/up block's inputs: recompute the rest), "save_attention",
      "save_dots" (block scope, other `REMAT_POLICIES`); "layer" (only each resnet's and
      transformer layer's inputs), "layer_save_attention", "layer_save_dots" (layer scope).
    rngs: parameter initialisation (and dropout) keys.
  """

  def __init__(self, config: Mapping[str, Any], *, dtype=None, param_dtype=jnp.float32,
               remat: bool | str = False, rngs: nnx.Rngs):
    c = normalize_config(config)
    self.config = c
    self.dtype = dtype
    self.remat = remat_policy_name(remat)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    n = len(c["down_block_types"])
    channels = list(c["block_out_channels"])
    if c["num_attention_heads"] is not None:
      heads = _per_block(c["num_attention_heads"], n)
    else:  # diffusers' naming quirk: attention_head_dim is the number of heads.
      heads = _per_block(c["attention_head_dim"], n)
    only_cross = _per_block(c["only_cross_attention"], n)
    layers_per_block = _per_block(c["layers_per_block"], n)
    cross_dims = _per_block(c["cross_attention_dim"], n)
    tlpb = _per_block(c["transformer_layers_per_block"], n)
    for ch in channels:
      if ch % c["norm_num_groups"]:
        raise ValueError(f"UNet config: block_out_channels entry {ch} is not divisible by "
                         f"norm_num_groups={c['norm_num_groups']}")

    time_dim = c["time_embedding_dim"] or channels[0] * 4
    self.time_proj_dim = channels[0]
    self.time_embedding = TimestepEmbedding(channels[0], time_dim, act_fn=c["act_fn"], **kw)
    self.class_embedding = make_class_embedding(c, time_dim, **kw)
    k_in = c["conv_in_kernel"]
    self.conv_in = layers.Conv2d(c["in_channels"], channels[0], k_in, padding=(k_in - 1) // 2,
                                 **kw)

    down = []
    out_ch = channels[0]
    for i, block_type in enumerate(c["down_block_types"]):
      in_ch, out_ch = out_ch, channels[i]
      down.append(DownBlock(
          in_ch, out_ch, time_dim, num_layers=layers_per_block[i], cross=block_type == _CROSS_DOWN,
          heads=heads[i], transformer_layers=_per_layer(tlpb[i], layers_per_block[i]),
          cross_dim=cross_dims[i], only_cross=only_cross[i], add_downsample=i < n - 1, c=c, kw=kw))
    self.down_blocks = nnx.List(down)

    if c["mid_block_type"] == _CROSS_MID:
      self.mid_block = MidBlock(channels[-1], time_dim, heads=heads[-1],
                                transformer_layers=_per_layer(tlpb[-1], 1),
                                cross_dim=cross_dims[-1], c=c, kw=kw)
    else:
      self.mid_block = None

    rev_ch = channels[::-1]
    rev_heads = heads[::-1]
    rev_layers = layers_per_block[::-1]
    rev_cross = cross_dims[::-1]
    rev_only = only_cross[::-1]
    if c["reverse_transformer_layers_per_block"] is not None:
      rev_tlpb = _per_block(c["reverse_transformer_layers_per_block"], n)
    else:
      rev_tlpb = tlpb[::-1]
    up = []
    out_ch = rev_ch[0]
    for i, block_type in enumerate(c["up_block_types"]):
      prev_out, out_ch = out_ch, rev_ch[i]
      in_ch = rev_ch[min(i + 1, n - 1)]
      num_layers = rev_layers[i] + 1
      up.append(UpBlock(
          in_ch, out_ch, prev_out, time_dim, num_layers=num_layers,
          cross=block_type == _CROSS_UP, heads=rev_heads[i],
          transformer_layers=_per_layer(rev_tlpb[i], num_layers), cross_dim=rev_cross[i],
          only_cross=rev_only[i], add_upsample=i < n - 1, c=c, kw=kw))
    self.up_blocks = nnx.List(up)

    self.conv_norm_out = layers.GroupNorm(channels[0], c["norm_num_groups"], eps=c["norm_eps"],
                                          **kw)
    self.act = layers.get_activation(c["act_fn"])
    k_out = c["conv_out_kernel"]
    self.conv_out = layers.Conv2d(channels[0], c["out_channels"], k_out,
                                  padding=(k_out - 1) // 2, **kw)

  def _runners(self) -> tuple[Runner, Runner]:
    """(how each block runs, how each layer inside a block runs), from `self.remat`."""
    scope, policy = remat_scope(remat_policy_name(self.remat))
    if scope == "none":
      return run_plainly, run_plainly
    run = checkpointed(REMAT_POLICIES.get(policy)())
    return (run, run_plainly) if scope == "block" else (run_plainly, run)

  def _class_embed(self, class_labels, batch: int, dtype) -> jax.Array:
    """The class embedding added to the timestep embedding ([B, time_dim], or 0 without one)."""
    c = self.config
    kind = class_conditioning(c)
    if kind is None:
      if class_labels is not None:
        raise ValueError("class_labels given, but the UNet config has no class embedding "
                         "(num_class_embeds or class_embed_type)")
      return jnp.zeros((), dtype)
    if kind == "labels":
      if class_labels is None:
        raise ValueError(f"this UNet has num_class_embeds={c['num_class_embeds']}: pass "
                         "class_labels (i32[B])")
      labels = jnp.broadcast_to(jnp.asarray(class_labels).reshape(-1), (batch,))
      return self.class_embedding(labels)
    width = c["projection_class_embeddings_input_dim"]
    if class_labels is None or jnp.ndim(class_labels) != 2 or class_labels.shape[-1] != width:
      got = None if class_labels is None else jnp.shape(class_labels)
      raise ValueError(f"this UNet has class_embed_type='projection': pass class_labels as "
                       f"f32[B, {width}] vectors, got {got}")
    vectors = jnp.broadcast_to(jnp.asarray(class_labels), (batch, width)).astype(dtype)
    return self.class_embedding(vectors)

  def __call__(self, sample: jax.Array, timesteps, encoder_hidden_states: jax.Array, *,
               class_labels: Optional[jax.Array] = None, return_features: bool = False,
               return_attention_maps: bool = False):
    """Predicts the noise (or v / x0) for `sample`.

    Args:
      sample: [B, H, W, in_channels].
      timesteps: scalar or [B] (int or float).
      encoder_hidden_states: [B, L, cross_attention_dim] context tokens.
      class_labels: required exactly when the config has a class embedding
        (`class_conditioning`): i32[B] indices into it (`num_class_embeds`), or
        f32[B, projection_class_embeddings_input_dim] vectors (class_embed_type "projection",
        e.g. a prompt's pooled text embedding).
      return_features: also return the decoder features.
      return_attention_maps: also return every cross-attention (`attn2`) module's attention
        probabilities, {diffusers module path, e.g.
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2": f32[B, heads, h*w, L]}
        (VPD's cross-attention maps; equal to diffusers' `get_attention_scores`).

    Returns:
      [B, H, W, out_channels] float32; with `return_features`, also a list with the output of
      every up block before its upsampler, coarsest first (e.g. for SD: H/8, H/4, H/2, H); with
      `return_attention_maps`, also the maps: (sample[, features][, maps]).
    """
    c = self.config
    if sample.ndim != 4 or sample.shape[-1] != c["in_channels"]:
      raise ValueError(f"UNet expects NHWC sample with {c['in_channels']} channels, got "
                       f"{sample.shape}")
    b = sample.shape[0]
    dtype = jnp.float32 if self.dtype is None else self.dtype
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
    t_emb = timestep_embedding(t, self.time_proj_dim, flip_sin_to_cos=c["flip_sin_to_cos"],
                               freq_shift=c["freq_shift"]).astype(dtype)
    temb = self.time_embedding(t_emb)
    temb = temb + self._class_embed(class_labels, b, dtype).astype(temb.dtype)
    context = encoder_hidden_states.astype(dtype)

    x = sample.astype(dtype)
    if c["center_input_sample"]:
      x = 2 * x - 1.0
    x = self.conv_in(x)
    skips = [x]
    maps = {}
    run_block, run_layer = self._runners()
    want = dict(return_maps=True, run=run_layer) if return_attention_maps else dict(run=run_layer)
    for i, block in enumerate(self.down_blocks):
      out = run_block(_call, block, x, temb, context, **want)
      x, block_skips = out[:2]
      if return_attention_maps:
        maps.update(_prefixed(f"down_blocks.{i}", out[2]))
      skips.extend(block_skips)
    if self.mid_block is not None:
      out = run_block(_call, self.mid_block, x, temb, context, **want)
      if return_attention_maps:
        x, m = out
        maps.update(_prefixed("mid_block", m))
      else:
        x = out
    features = []
    for i, block in enumerate(self.up_blocks):
      n_res = len(block.resnets)
      block_skips, skips = tuple(skips[-n_res:]), skips[:-n_res]
      size = tuple(skips[-1].shape[1:3]) if skips else None
      out = run_block(_call, block, x, block_skips, temb, context, upsample_size=size, **want)
      x, feat = out[:2]
      if return_attention_maps:
        maps.update(_prefixed(f"up_blocks.{i}", out[2]))
      features.append(feat)
    x = self.conv_out(self.act(self.conv_norm_out(x))).astype(jnp.float32)
    outputs = (x,) + ((features,) if return_features else ()) + (
        (maps,) if return_attention_maps else ())
    return outputs if len(outputs) > 1 else x


# ------------------------------------------------------------------------------------------------
# Input widening.

INPUT_WIDENING_RULES = ("copy_scale", "zeros")


def widen_input_kernel(kernel: jax.Array, in_channels: int, rule: str = "copy_scale") -> jax.Array:
  """Widens a pretrained conv_in kernel [kh, kw, c, out] to `in_channels` input channels.

  Rules:
    "copy_scale": when in_channels is a multiple r of c, the kernel is tiled r times over the
      input axis and divided by r, so the output is unchanged when all r input groups are equal
      (Marigold: 4 -> 8 duplicates and halves). Otherwise the pretrained kernel keeps the first c
      channels and the extra channels get zeros (output unchanged for any extra input).
    "zeros": pretrained kernel on the first c channels, zeros on the rest.
  """
  c = kernel.shape[2]
  if rule not in INPUT_WIDENING_RULES:
    raise ValueError(f"input_widening={rule!r} is unknown; choose one of {INPUT_WIDENING_RULES}")
  if in_channels < c:
    raise ValueError(f"cannot narrow conv_in from {c} to {in_channels} input channels")
  if in_channels == c:
    return kernel
  if rule == "copy_scale" and in_channels % c == 0:
    r = in_channels // c
    return jnp.tile(kernel, (1, 1, r, 1)) / r
  pad = jnp.zeros(kernel.shape[:2] + (in_channels - c, kernel.shape[3]), kernel.dtype)
  return jnp.concatenate([kernel, pad], axis=2)
