"""The one attention function every model in the project calls.

Everything goes through `jax.nn.dot_product_attention`, so the backend choice lives here only:
cuDNN's fused (flash) kernel on GPU for half-precision inputs, XLA's reference lowering elsewhere
(CPU, TPU, and float32 on GPU, which cuDNN's fused kernel does not accept). Both compute
softmax(q k^T * scale + bias) v; they differ only by floating-point summation order.
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
  """Which `jax.nn.dot_product_attention` implementation to use for inputs of `dtype`."""
  if _backend() == "gpu" and jnp.dtype(dtype) in tuple(jnp.dtype(d) for d in _CUDNN_DTYPES):
    return "cudnn"
  return "xla"


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
    implementation: force "xla" or "cudnn"; by default chosen from the backend and dtype.

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
  return jax.nn.dot_product_attention(
      query, key, value, mask=mask, scale=scale, is_causal=is_causal, implementation=impl)
