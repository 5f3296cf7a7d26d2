"""CLIP text encoder (transformers `CLIPTextModel` numerics) and the CLIP transformer blocks.

The module tree mirrors transformers' attribute names so that `convert/clip.py` is a renaming
table: `embeddings.{token_embedding, position_embedding}`, `encoder.layers[i].{layer_norm1,
self_attn.{q_proj, k_proj, v_proj, out_proj}, layer_norm2, mlp.{fc1, fc2}}`, `final_layer_norm`.
The encoder blocks (`CLIPEncoder` and parts) are shared with the CLIP vision tower in
`image_encoder.py`.

Numerics (transformers 5.x `modeling_clip.py`): token + position embeddings; pre-LN layers
`x + attn(ln1(x))`, `x + fc2(act(fc1(ln2(x))))`; attention scale `head_dim**-0.5`, causal for
text; `hidden_act` "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP / SD 1.x) or "gelu" (exact erf,
OpenCLIP ViT-H / SD 2.x); final LayerNorm. No padding mask: Stable Diffusion pipelines run the
text encoder on max-length padded ids with the causal mask only, so padding never influences the
tokens before it.

Penultimate layer ("clip skip"): `skip_last_layers=k` runs only the first `N - k` layers and then
applies `final_layer_norm`, exactly what diffusers' `encode_prompt(clip_skip=k)` does
(`hidden_states[-(k + 1)]` followed by `final_layer_norm`). NOTE for SD 2.x: the diffusers-format
SD 2.x `text_encoder/` checkpoints already drop OpenCLIP's last layer (their config has
`num_hidden_layers: 23` of ViT-H's 24), so SD 2.x uses `skip_last_layers=0` with those weights;
`skip_last_layers=1` there would skip two OpenCLIP layers.

Pooled output: the final-normed hidden state at the end-of-text token, chosen as transformers
does: `argmax(input_ids)` when the config's `eos_token_id == 2` (legacy configs), else the first
position whose id equals `eos_token_id`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from dense_diffusion.models import attention as attention_lib
from dense_diffusion.models import layers


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# transformers `hidden_act` names -> functions.
CLIP_ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
}


def get_clip_activation(name: str):
  if name not in CLIP_ACTIVATIONS:
    raise ValueError(f"unsupported hidden_act={name!r}; supported: {sorted(CLIP_ACTIVATIONS)}")
  return CLIP_ACTIVATIONS[name]


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
  """The keys of transformers' `CLIPTextConfig` that the model uses."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  bos_token_id: int = 49406
  eos_token_id: int = 49407
  pad_token_id: int = 1

  def __post_init__(self):
    get_clip_activation(self.hidden_act)
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                       f"num_attention_heads={self.num_attention_heads}")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "CLIPTextConfig":
    """From a transformers `config.json` dict (a `CLIPConfig`'s `text_config` is accepted too)."""
    if "text_config" in d and "hidden_size" not in d:
      d = d["text_config"]
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names and v is not None})


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with q/k/v/out projections (all with biases)."""

  def __init__(self, dim: int, heads: int, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.head_dim = dim // heads
    self.q_proj = layers.Dense(dim, dim, axes=("embed", "heads"), **kw)
    self.k_proj = layers.Dense(dim, dim, axes=("embed", "heads"), **kw)
    self.v_proj = layers.Dense(dim, dim, axes=("embed", "heads"), **kw)
    self.out_proj = layers.Dense(dim, dim, axes=("heads", "embed"), **kw)

  def __call__(self, x: jax.Array, *, causal: bool, mask: Optional[jax.Array] = None
               ) -> jax.Array:
    """[B, L, D] -> [B, L, D]; `mask` bool broadcastable to [B, H, L, L] (True = attend)."""
    b, n, d = x.shape
    split = lambda t: t.reshape(b, n, self.heads, self.head_dim)
    o = attention_lib.attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                split(self.v_proj(x)), mask=mask, is_causal=causal,
                                scale=self.head_dim ** -0.5)
    return self.out_proj(o.reshape(b, n, d))


class CLIPMLP(nnx.Module):
  """fc1 -> activation -> fc2."""

  def __init__(self, dim: int, hidden: int, act: str, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = get_clip_activation(act)
    self.fc1 = layers.Dense(dim, hidden, axes=("embed", "mlp"), **kw)
    self.fc2 = layers.Dense(hidden, dim, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-LN transformer layer: x + attn(ln1(x)); x + mlp(ln2(x))."""

  def __init__(self, dim: int, heads: int, hidden: int, act: str, eps: float, *, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm1 = layers.LayerNorm(dim, eps=eps, **kw)
    self.self_attn = CLIPAttention(dim, heads, **kw)
    self.layer_norm2 = layers.LayerNorm(dim, eps=eps, **kw)
    self.mlp = CLIPMLP(dim, hidden, act, **kw)

  def __call__(self, x: jax.Array, *, causal: bool, mask: Optional[jax.Array] = None
               ) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), causal=causal, mask=mask)
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
  """A stack of `CLIPEncoderLayer`s (`layers[i]`)."""

  def __init__(self, num_layers: int, dim: int, heads: int, hidden: int, act: str, eps: float,
               *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.layers = nnx.List([
        CLIPEncoderLayer(dim, heads, hidden, act, eps, dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs) for _ in range(num_layers)])

  def __call__(self, x: jax.Array, *, causal: bool, num_layers: Optional[int] = None,
               mask: Optional[jax.Array] = None) -> jax.Array:
    """Runs the first `num_layers` layers (all if None). [B, L, D] -> [B, L, D]."""
    n = len(self.layers) if num_layers is None else num_layers
    for layer in list(self.layers)[:n]:
      x = layer(x, causal=causal, mask=mask)
    return x


def layers_to_run(total: int, skip_last_layers: int) -> int:
  """How many layers run when the last `skip_last_layers` are skipped (validated)."""
  if not 0 <= skip_last_layers < total:
    raise ValueError(f"skip_last_layers={skip_last_layers} must be in [0, {total - 1}] for a "
                     f"{total}-layer encoder")
  return total - skip_last_layers


class CLIPTextEmbeddings(nnx.Module):
  """token_embedding(ids) + position_embedding(0..L-1)."""

  def __init__(self, config: CLIPTextConfig, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.token_embedding = layers.Embedding(
        config.vocab_size, config.hidden_size, axes=("vocab", "embed"), param_dtype=param_dtype,
        rngs=rngs)
    self.position_embedding = layers.Embedding(
        config.max_position_embeddings, config.hidden_size, axes=("position", "embed"),
        param_dtype=param_dtype, init_std=0.01, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    n = ids.shape[-1]
    if n > self.position_embedding.num_embeddings:
      raise ValueError(f"sequence length {n} exceeds max_position_embeddings="
                       f"{self.position_embedding.num_embeddings}")
    return self.token_embedding(ids) + self.position_embedding.embedding[...][:n]


class TextEncoder(nnx.Module):
  """CLIP text transformer (transformers `CLIPTextModel`).

  Attributes: `config` (CLIPTextConfig), `embeddings`, `encoder`, `final_layer_norm`.
  """

  def __init__(self, config: CLIPTextConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.embeddings = CLIPTextEmbeddings(config, param_dtype=param_dtype, rngs=rngs)
    self.encoder = CLIPEncoder(config.num_hidden_layers, config.hidden_size,
                               config.num_attention_heads, config.intermediate_size,
                               config.hidden_act, config.layer_norm_eps, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    self.final_layer_norm = layers.LayerNorm(config.hidden_size, eps=config.layer_norm_eps,
                                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def encode(self, input_ids: jax.Array, *, skip_last_layers: int = 0,
             final_norm: bool = True, attention_mask: Optional[jax.Array] = None
             ) -> tuple[jax.Array, jax.Array]:
    """Hidden states and pooled (end-of-text) output.

    Args:
      input_ids: int32 [B, L], L <= max_position_embeddings (77 for SD).
      skip_last_layers: 0 = last layer (`last_hidden_state`); 1 = penultimate layer ("clip skip"
        1), ... (see the module docstring for SD 2.x).
      final_norm: apply `final_layer_norm` to the chosen layer's output (transformers and
        diffusers do).
      attention_mask: optional [B, L] (1 = token, 0 = padding) hiding padding keys, as
        transformers' `attention_mask`; the SD 1.x / 2.x pipelines pass none (the default).

    Returns:
      hidden [B, L, D] and pooled [B, D], in the compute dtype.
    """
    n = layers_to_run(self.config.num_hidden_layers, skip_last_layers)
    x = self.embeddings(input_ids)
    if self.dtype is not None:
      x = x.astype(self.dtype)
    mask = None
    if attention_mask is not None:
      mask = (jnp.asarray(attention_mask) > 0)[:, None, None, :]
    x = self.encoder(x, causal=True, num_layers=n, mask=mask)
    if final_norm:
      x = self.final_layer_norm(x)
    pooled = x[jnp.arange(x.shape[0]), self.eos_positions(input_ids)]
    return x, pooled

  def eos_positions(self, input_ids: jax.Array) -> jax.Array:
    """int32 [B]: where transformers takes the pooled output (see module docstring)."""
    if self.config.eos_token_id == 2:
      return jnp.argmax(input_ids, axis=-1)
    return jnp.argmax((input_ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)

  def __call__(self, input_ids: jax.Array, *, skip_last_layers: int = 0) -> jax.Array:
    """int32 [B, L] -> hidden states [B, L, D] (final layer norm applied)."""
    return self.encode(input_ids, skip_last_layers=skip_last_layers)[0]


def embed_prompts(encoder: TextEncoder, tokenizer, prompts, *, skip_last_layers: int = 0,
                  batch_size: int = 16) -> jax.Array:
  """Text-encoder embeddings of fixed prompts, to compute once and cache (frozen encoder).

  Args:
    encoder: the `TextEncoder`.
    tokenizer: a callable texts -> int32 [B, L] (e.g. `models.tokenizer.CLIPTokenizer`).
    prompts: a sequence of strings.
    skip_last_layers: see `TextEncoder.encode`.
    batch_size: prompts per encoder call.

  Returns:
    float32 [len(prompts), L, D], with no gradient path to the encoder.
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError("embed_prompts needs at least one prompt")
  ids = jnp.asarray(tokenizer(prompts), jnp.int32)
  run = nnx.jit(lambda m, i: m(i, skip_last_layers=skip_last_layers))
  out = [run(encoder, ids[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
  return jax.lax.stop_gradient(jnp.concatenate(out, axis=0).astype(jnp.float32))
