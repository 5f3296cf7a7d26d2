"""Every attention implementation against a plain softmax attention written out here: values and
gradients, float32 and bfloat16, masks, causal, sequence lengths that are not block multiples.
The Pallas splash kernel (TPU) runs in Pallas' interpreter on this CPU; `main compile` compiles
it for real TPUs (tests/test_compile.py)."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from dense_diffusion import errors
from dense_diffusion.models import attention as attention_lib


def _reference_np(q, k, v, mask=None, causal=False):
  """float64 numpy softmax(q k^T / sqrt(d) + mask) v; q [B, Lq, H, D]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  lq, lk = logits.shape[-2:]
  allowed = np.ones(logits.shape, bool)
  if causal:
    allowed &= np.tril(np.ones((lq, lk), bool), k=lk - lq)
  if mask is not None:
    allowed &= np.asarray(mask)
  logits = np.where(allowed, logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _reference_jnp(q, k, v, mask=None, causal=False):
  """The same in float32 jnp, for reference gradients."""
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1])
  lq, lk = logits.shape[-2:]
  allowed = jnp.ones(logits.shape, bool)
  if causal:
    allowed &= jnp.tril(jnp.ones((lq, lk), bool), k=lk - lq)
  if mask is not None:
    allowed &= mask
  logits = jnp.where(allowed, logits, -1e30)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)


def _inputs(seed, b, lq, lk, h, d, dtype):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.normal(size=(b, n, h, d)), dtype) for n in (lq, lk, lk))


def _loss(fn):
  """A scalar whose gradient weighs every output element differently."""
  def loss(q, k, v):
    out = fn(q, k, v).astype(jnp.float32)
    return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size)
  return loss


TOL = {jnp.float32: 2e-5, jnp.bfloat16: 4e-2}


# (implementation, options): the chunked form with chunks that do not divide the queries.
CPU_IMPLS = [("matmul", {}), ("xla", {}), ("chunked", {"query_chunk": 4})]
# (masking, Lq, Lk): causal with more queries than keys would leave rows without keys.
CASES = [("none", 10, 7), ("keys", 7, 10), ("full", 10, 7), ("causal", 13, 13),
         ("causal", 7, 10)]


@pytest.mark.parametrize("impl,opts", CPU_IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("masking,lq,lk", CASES)
def test_values_and_gradients_match_reference(impl, opts, dtype, masking, lq, lk):
  q, k, v = _inputs(0, 2, lq, lk, 3, 8, dtype)
  rng = np.random.default_rng(1)
  mask, causal = None, masking == "causal"
  if masking == "keys":  # a padding mask: some keys of each example are not attended.
    mask = rng.random((2, 1, 1, lk)) > 0.4
    mask[..., 0] = True
  elif masking == "full":
    mask = rng.random((2, 3, lq, lk)) > 0.4
    mask[..., 0] = True  # every query keeps a key
  jmask = None if mask is None else jnp.asarray(mask)
  with attention_lib.options(**opts):
    fn = lambda q, k, v: attention_lib.attention(q, k, v, mask=jmask, is_causal=causal,
                                                 implementation=impl)
    out = fn(q, k, v)
    grads = jax.grad(_loss(fn), argnums=(0, 1, 2))(q, k, v)
  assert out.dtype == dtype and out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             _reference_np(q, k, v, mask, causal), atol=TOL[dtype] * 4)
  ref = lambda q, k, v: _reference_jnp(q, k, v, jmask, causal)
  ref_grads = jax.grad(_loss(ref), argnums=(0, 1, 2))(*(a.astype(jnp.float32) for a in (q, k, v)))
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=TOL[dtype] * 4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lq,lk", [(200, 77), (256, 256)])
def test_splash_kernel_in_interpreter_matches_reference(dtype, lq, lk):
  """Queries and keys padded to 128-lane blocks (200 -> 256, 77 -> 128: the padded keys are a
  segment nobody attends), head dim 64 as SD's UNet, values and gradients."""
  q, k, v = _inputs(2, 1, lq, lk, 2, 64, dtype)
  with attention_lib.options(interpret=True, block_q=128, block_kv=128, block_kv_compute=128,
                             block_q_dkv=128, block_kv_dkv=128, block_q_dq=128,
                             block_kv_dq=128):
    fn = lambda q, k, v: attention_lib.attention(q, k, v, implementation="splash")
    out = fn(q, k, v)
    grads = jax.grad(_loss(fn), argnums=(0, 1, 2))(q, k, v)
  assert out.dtype == dtype and out.shape == q.shape
  np.testing.assert_allclose(np.asarray(out, np.float32), _reference_np(q, k, v),
                             atol=TOL[dtype] * 4)
  ref_grads = jax.grad(_loss(_reference_jnp), argnums=(0, 1, 2))(
      *(a.astype(jnp.float32) for a in (q, k, v)))
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r), atol=TOL[dtype] * 4)


def test_chunked_single_chunk_and_many_heads():
  """A chunk longer than the queries (one chunk), f32."""
  q, k, v = _inputs(4, 1, 9, 5, 4, 16, jnp.float32)
  with attention_lib.options(query_chunk=64):
    out = attention_lib.attention(q, k, v, implementation="chunked")
  np.testing.assert_allclose(np.asarray(out), _reference_np(q, k, v), atol=1e-5)


def test_splash_refuses_masks():
  q, k, v = _inputs(3, 1, 8, 8, 1, 8, jnp.float32)
  with pytest.raises(ValueError, match="no mask"):
    attention_lib.attention(q, k, v, is_causal=True, implementation="splash")


def test_choice_per_platform_dtype_length_and_mask():
  choose = attention_lib.implementation_for
  assert choose(jnp.bfloat16, 16384, platform="tpu") == "splash"
  assert choose(jnp.float32, 16384, platform="tpu") == "splash"
  assert choose(jnp.bfloat16, 77, platform="tpu") == "xla"  # short: XLA's own fusion
  assert choose(jnp.bfloat16, 16384, platform="tpu", masked=True) == "xla"
  assert choose(jnp.bfloat16, 16384, platform="gpu") == "cudnn"
  assert choose(jnp.float16, 64, platform="gpu") == "cudnn"
  assert choose(jnp.float32, 16384, platform="gpu") == "chunked"
  assert choose(jnp.float32, 64, platform="gpu") == "xla"
  assert choose(jnp.float32, 16384, platform="cpu") == "chunked"
  assert choose(jnp.float32, 1024, platform="cpu") == "matmul"
  with attention_lib.options(tpu="xla", cpu="matmul", tpu_min_tokens=64):
    assert choose(jnp.bfloat16, 16384, platform="tpu") == "xla"
    assert choose(jnp.float32, 16384, platform="cpu") == "matmul"
  with attention_lib.options(platform="tpu"):
    assert attention_lib.target_platform() == "tpu"
  assert attention_lib.target_platform() == jax.default_backend()


def test_options_from_config_refuse_mistakes():
  assert attention_lib.Options.from_config({"block_q": 256}).block_q == 256
  with pytest.raises(errors.ConfigError, match="unknown keys"):
    attention_lib.Options.from_config({"blockq": 256})
  with pytest.raises(errors.ConfigError, match="multiple of 128"):
    attention_lib.Options.from_config({"block_kv": 100})
  with pytest.raises(errors.ConfigError, match="choose auto or one of"):
    attention_lib.Options.from_config({"tpu": "magic"})


def test_chunked_keeps_one_chunk_of_logits_in_memory():
  """XLA:CPU's buffer assignment of a training step: the chunked form's temporaries are a
  fraction of the explicit form's [B, H, Lq, Lk] logits and probabilities."""
  b, lq, lk, h, d = 1, 2048, 2048, 2, 16
  arg = jax.ShapeDtypeStruct((b, lq, h, d), jnp.float32)

  def temp_bytes(impl):
    fn = lambda q, k, v: attention_lib.attention(q, k, v, implementation=impl)
    with attention_lib.options(query_chunk=256):
      compiled = jax.jit(jax.grad(_loss(fn), argnums=(0, 1, 2))).lower(arg, arg, arg).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  logits_bytes = b * h * lq * lk * 4
  assert temp_bytes("matmul") >= logits_bytes
  assert temp_bytes("chunked") < logits_bytes / 2


def test_the_configs_name_every_option_and_none_means_its_default():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  fields = {f.name for f in dataclasses.fields(attention_lib.Options)}
  template = demo.attention_options()
  assert set(template.keys()) == fields  # every option settable from the command line
  assert attention_lib.Options.from_config(template) == attention_lib.Options()
  template.query_chunk = 256
  template.cpu = "matmul"
  opts = attention_lib.Options.from_config(template)
  assert (opts.query_chunk, opts.cpu, opts.tpu, opts.block_q) == (256, "matmul", "auto", 512)
