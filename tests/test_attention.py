"""The shared attention function against a direct softmax(q k^T / sqrt(d)) v transcription."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from dense_diffusion.models import attention as attention_lib


def _reference(q, k, v, mask=None, causal=False):
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if causal:
    lq, lk = logits.shape[-2:]
    mask = np.tril(np.ones((lq, lk), bool))[None, None]
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("lq,lk", [(7, 7), (5, 11)])
def test_matches_reference(lq, lk):
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, lq, 3, 8)).astype(np.float32)
  k = rng.normal(size=(2, lk, 3, 8)).astype(np.float32)
  v = rng.normal(size=(2, lk, 3, 8)).astype(np.float32)
  out = attention_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v), atol=1e-5)


def test_causal_and_mask():
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(1, 6, 2, 4)).astype(np.float32) for _ in range(3))
  out = attention_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), is_causal=True)
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, causal=True), atol=1e-5)
  mask = rng.random((1, 1, 6, 6)) > 0.3
  mask[..., 0] = True  # every query keeps one key so no row is all -inf
  out = attention_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, mask=mask), atol=1e-5)


def test_bf16_close_to_fp32():
  rng = np.random.default_rng(2)
  q, k, v = (rng.normal(size=(2, 9, 2, 16)).astype(np.float32) for _ in range(3))
  full = attention_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  half = attention_lib.attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(full), atol=5e-2)


def test_implementation_choice():
  backend = jax.default_backend()
  expected = {"gpu": ("cudnn", "xla"), "cpu": ("matmul", "matmul")}.get(backend, ("xla", "xla"))
  assert attention_lib.implementation_for(jnp.bfloat16) == expected[0]
  assert attention_lib.implementation_for(jnp.float32) == expected[1]


@pytest.mark.parametrize("causal", [False, True])
def test_matmul_and_xla_implementations_agree_with_gradients(causal):
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 7, 3, 8)), jnp.float32) for _ in range(3))
  def loss(impl, q, k, v):
    out = attention_lib.attention(q, k, v, is_causal=causal, implementation=impl)
    return jnp.sum(jnp.sin(out))
  for argnum in range(3):
    g_xla = jax.grad(lambda *a: loss("xla", *a), argnums=argnum)(q, k, v)
    g_mm = jax.grad(lambda *a: loss("matmul", *a), argnums=argnum)(q, k, v)
    np.testing.assert_allclose(np.asarray(g_mm), np.asarray(g_xla), atol=1e-5)


def test_bad_shapes_raise():
  x = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match="batch, length, heads"):
    attention_lib.attention(x[0], x, x)
  with pytest.raises(ValueError, match="disagree"):
    attention_lib.attention(x, jnp.zeros((1, 4, 3, 8)), jnp.zeros((1, 4, 3, 8)))
