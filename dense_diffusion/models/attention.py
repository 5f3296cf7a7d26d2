"""The one attention function every model in the project calls.

The backend choice lives here only:
- GPU: `jax.nn.dot_product_attention`, cuDNN's fused (flash) kernel for half-precision inputs,
  its XLA lowering for float32 (which cuDNN's fused kernel does not accept);
- TPU: `jax.nn.dot_product_attention`'s XLA lowering;
- CPU: the same math written heads-major (`[B, H, L, D]` matmul, softmax, matmul): XLA:CPU runs
  a training step of it about 2.3x faster than `dot_product_attention`'s XLA path at 1024 tokens
  (docs/models.md, "CPU performance").
All compute softmax(q k^T * scale + mask) v; they differ only by floating-point summation order.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


@functools.cache
def _backend() -> str:
  return jax.default_backend()


def implementation_for(dtype) -> str:
  """Which implementation to use for inputs of `dtype`: "cudnn", "xla" or "matmul"."""
  backend = _backend()
  if backend == "gpu" and jnp.dtype(dtype) in tuple(jnp.dtype(d) for d in _CUDNN_DTYPES):
    return "cudnn"
  if backend == "cpu":
    return "matmul"
  return "xla"


def _matmul_attention(query, key, value, mask, is_causal, scale):
  """softmax(q k^T * scale) v with heads-major matmuls; softmax statistics in float32."""
  d = query.shape[-1]
  scale = (1.0 / d**0.5) if scale is None else scale
  q = jnp.swapaxes(query, 1, 2)  # [B, H, Lq, D]
  k = jnp.swapaxes(key, 1, 2)
  v = jnp.swapaxes(value, 1, 2)
  logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32) * scale  # [B,H,Lq,Lk]
  if is_causal:
    lq, lk = logits.shape[-2:]
    causal = jnp.tril(jnp.ones((lq, lk), bool), k=lk - lq)
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.swapaxes(jnp.matmul(weights, v), 1, 2)


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    is_causal: bool = False,
    scale: Optional[float] = None,
    implementation: Optional[str] = None,
) -> jax.Array:
  """Multi-head scaled dot-product attention.

  Args:
    query: [B, Lq, H, D].
    key: [B, Lk, H, D].
    value: [B, Lk, H, D].
    mask: optional boolean mask broadcastable to [B, H, Lq, Lk]; True = attend.
    is_causal: apply a causal (lower-triangular) mask (text encoders).
    scale: logit scale; defaults to 1/sqrt(D).
    implementation: force "xla", "cudnn" or "matmul"; by default chosen from backend and dtype.

  Returns:
    [B, Lq, H, D] in the dtype of `query`.
  """
  if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
    raise ValueError(
        "attention expects [batch, length, heads, head_dim] arrays, got shapes "
        f"{query.shape}, {key.shape}, {value.shape}")
  if key.shape != value.shape:
    raise ValueError(f"key and value shapes differ: {key.shape} vs {value.shape}")
  if query.shape[0] != key.shape[0] or query.shape[2:] != key.shape[2:]:
    raise ValueError(
        f"query {query.shape} and key {key.shape} disagree on batch, heads or head_dim")
  dtype = query.dtype
  key = key.astype(dtype)
  value = value.astype(dtype)
  impl = implementation or implementation_for(dtype)
  if impl == "matmul":
    return _matmul_attention(query, key, value, mask, is_causal, scale)
  return jax.nn.dot_product_attention(
      query, key, value, mask=mask, scale=scale, is_causal=is_causal, implementation=impl)


def attention_probs(query: jax.Array, key: jax.Array, *, scale: Optional[float] = None
                    ) -> jax.Array:
  """The attention probabilities softmax(q k^T * scale), f32[B, H, Lq, Lk], for callers that
  need the maps themselves (VPD's cross-attention maps); query [B, Lq, H, D], key [B, Lk, H, D]."""
  d = query.shape[-1]
  scale = (1.0 / d**0.5) if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key.astype(query.dtype)).astype(jnp.float32)
  return jax.nn.softmax(logits * scale, axis=-1)
