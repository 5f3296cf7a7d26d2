"""The one attention function every model in the project calls, and its choice per backend.

`attention(q, k, v)` computes softmax(q k^T * scale + mask) v for q [B, Lq, H, D] and
k, v [B, Lk, H, D]. Which formulation runs is decided here only, by the *target* platform (the
platform of the devices of the mesh set with `jax.set_mesh`, so a CPU machine lowering for TPU
devices gets the TPU choice; otherwise `jax.default_backend()`), the dtype, the mask and the
query length (`implementation_for`):

| platform | long sequences (Lq >= the platform's `*_min_tokens`), no mask | otherwise |
|---|---|---|
| TPU | `splash`: the Pallas splash-attention kernel of `jax.experimental.pallas.ops.tpu` (flash-style, never materialises [Lq, Lk]; block sizes from `Options`), inside a `shard_map` over the batch (and heads) mesh axes | `xla` |
| GPU, bf16 / f16 | `cudnn`: cuDNN's fused flash kernel through `jax.nn.dot_product_attention` | `cudnn` |
| GPU, f32 | `chunked`: query chunks of `query_chunk` rows, each recomputed in the backward pass (`jax.checkpoint` under `lax.map`), so one chunk's [chunk, Lk] logits live at a time | `xla` |
| CPU | `chunked` | `matmul`: heads-major matmul / softmax / matmul (XLA:CPU runs a training step of it ~2.3x faster than `dot_product_attention`'s XLA path at 1024 tokens, docs/models.md) |

All implementations are registered in `IMPLEMENTATIONS` (name -> function) and agree within
dtype tolerance (tests/test_attention_impls.py: values and gradients, dtypes, masks, lengths;
the splash kernel through Pallas' interpreter on CPU and compiled for TPU by `main compile`).
Softmax statistics are float32 in all of them. `Options` holds every tunable number; a run sets
them from `config.model.attention` with `configure(...)`, a caller temporarily with
`with options(...)`.

`attention_probs` returns the probabilities themselves (VPD's cross-attention maps); it is the
explicit formulation by design.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from dense_diffusion import errors
from dense_diffusion import registry

_HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LANES = 128  # TPU vector lanes: the splash kernel's blocks are multiples of this.
CHECKPOINT_NAME = "attention_out"  # the name of every attention output, for remat policies.


@dataclasses.dataclass(frozen=True)
class Options:
  """Tunable numbers of the attention choice (config: `model.attention`, a dict of these keys).

  Implementation names: "auto" (the table in the module docstring) or any of `IMPLEMENTATIONS`.
  """
  tpu: str = "auto"  # TPU implementation for long sequences: auto = splash; or xla.
  gpu: str = "auto"  # GPU: auto = cudnn for bf16/f16, chunked for f32.
  cpu: str = "auto"  # CPU: auto = chunked for long sequences, matmul otherwise.
  platform: Optional[str] = None  # force the target platform (None: the mesh's devices').
  tpu_min_tokens: int = 1024  # TPU: queries from which splash replaces XLA's attention.
  gpu_min_tokens: int = 4096  # GPU f32: queries from which the chunked form replaces XLA's.
  cpu_min_tokens: int = 4096  # CPU: queries from which the chunked form replaces matmul.
  query_chunk: int = 1024  # chunked: queries per chunk (memory ~ chunk * Lk * heads per example).
  # Splash kernel blocks (TPU). Multiples of 128; clipped to the padded sequence lengths.
  block_q: int = 512  # forward: queries per block.
  block_kv: int = 512  # forward: keys per block held in VMEM.
  block_kv_compute: int = 512  # forward: keys per inner step (divides block_kv).
  block_q_dkv: int = 512  # backward dK/dV kernel: queries per block.
  block_kv_dkv: int = 512  # backward dK/dV kernel: keys per block.
  block_q_dq: int = 512  # backward dQ kernel: queries per block.
  block_kv_dq: int = 512  # backward dQ kernel: keys per block.
  interpret: bool = False  # run the Pallas kernels in Pallas' interpreter (CPU tests only).

  @classmethod
  def from_config(cls, config: Optional[Mapping[str, Any]]) -> "Options":
    """Options from `config.model.attention` (None, or a key set to None: the default);
    unknown keys -> ConfigError."""
    values = {k: v for k, v in dict(config or {}).items() if v is not None}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise errors.ConfigError(f"model.attention has unknown keys {unknown}; known: "
                               f"{sorted(known)}")
    opts = cls(**values)
    for platform in ("tpu", "gpu", "cpu"):
      name = getattr(opts, platform)
      if name != "auto" and name not in IMPLEMENTATIONS:
        raise errors.ConfigError(f"model.attention.{platform}={name!r}; choose auto or one of "
                                 f"{IMPLEMENTATIONS.names()}")
    for name in ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv",
                 "block_q_dq", "block_kv_dq"):
      value = getattr(opts, name)
      if value <= 0 or value % _LANES:
        raise errors.ConfigError(f"model.attention.{name}={value}: use a positive multiple of "
                                 f"{_LANES}")
    if opts.block_kv % opts.block_kv_compute:
      raise errors.ConfigError(f"model.attention.block_kv={opts.block_kv} must be a multiple of "
                               f"block_kv_compute={opts.block_kv_compute}")
    if opts.query_chunk <= 0:
      raise errors.ConfigError(f"model.attention.query_chunk={opts.query_chunk}: use > 0")
    return opts


_OPTIONS = [Options()]


def configure(config: Optional[Mapping[str, Any]] = None, **overrides) -> Options:
  """Sets the process-wide options from a config dict (`config.model.attention`) and keywords.

  Read when a model is traced, so call it before the first jit of the run's step.
  """
  _OPTIONS[0] = Options.from_config({**dict(config or {}), **overrides})
  return _OPTIONS[0]


@contextlib.contextmanager
def options(**overrides) -> Iterator[Options]:
  """Temporarily replaces some options (e.g. `platform="tpu"` while lowering for TPUs)."""
  previous = _OPTIONS[0]
  _OPTIONS[0] = Options.from_config({**dataclasses.asdict(previous), **overrides})
  try:
    yield _OPTIONS[0]
  finally:
    _OPTIONS[0] = previous


def current_options() -> Options:
  return _OPTIONS[0]


_KERNEL_FLOPS: list = []  # the open tallies of `count_kernel_flops`.


@contextlib.contextmanager
def count_kernel_flops() -> Iterator[list]:
  """Collects the forward matmul FLOPs (4 B H Lq Lk D) of every attention traced into a Pallas
  kernel meanwhile: XLA's cost analysis does not see inside kernels (`main compile` adds them)."""
  tally: list = []
  _KERNEL_FLOPS.append(tally)
  try:
    yield tally
  finally:
    _KERNEL_FLOPS.remove(tally)


def target_platform() -> str:
  """"tpu", "gpu" or "cpu": the platform the traced program will run on.

  The abstract mesh set by `jax.set_mesh` knows its devices' platform even when they are not
  this machine's (ahead-of-time compilation for a TPU topology on a CPU host).
  """
  forced = _OPTIONS[0].platform
  if forced:
    return forced
  platform = None
  mesh = jax.sharding.get_abstract_mesh()
  device = getattr(mesh, "abstract_device", None)
  if not mesh.empty and device is not None:
    platform = device.platform
  platform = platform or jax.default_backend()
  return "gpu" if platform in ("cuda", "rocm") else platform


def implementation_for(dtype, q_len: int = 0, *, masked: bool = False,
                       platform: Optional[str] = None) -> str:
  """The implementation `attention` uses for `dtype` inputs with `q_len` queries."""
  opts = _OPTIONS[0]
  platform = platform or target_platform()
  half = jnp.dtype(dtype) in _HALF_DTYPES
  if platform == "tpu":
    if masked or q_len < opts.tpu_min_tokens:
      return "xla"
    return "splash" if opts.tpu == "auto" else opts.tpu
  if platform == "gpu":
    if opts.gpu != "auto":
      return opts.gpu
    if half:
      return "cudnn"
    return "chunked" if q_len >= opts.gpu_min_tokens else "xla"
  if opts.cpu != "auto":
    return opts.cpu
  return "chunked" if q_len >= opts.cpu_min_tokens else "matmul"


# name -> fn(query, key, value, mask, is_causal, scale, options) -> [B, Lq, H, D].
IMPLEMENTATIONS: registry.Registry[Callable] = registry.Registry("attention implementation")


def _scale(query, scale):
  return (1.0 / query.shape[-1]**0.5) if scale is None else scale


def _causal_mask(q_len: int, k_len: int, q_offset=0) -> jax.Array:
  """bool[q_len, k_len]: query i (at position q_offset + i) sees keys <= i + k_len - Lq_total."""
  rows = jnp.arange(q_len)[:, None] + q_offset
  return jnp.arange(k_len)[None, :] <= rows


def _heads_major(query, key, value, mask, scale):
  """softmax(q k^T * scale + mask) v with [B, H, L, D] matmuls; statistics in float32."""
  q = jnp.swapaxes(query, 1, 2)  # [B, H, Lq, D]
  k = jnp.swapaxes(key, 1, 2)
  v = jnp.swapaxes(value, 1, 2)
  logits = jnp.matmul(q, jnp.swapaxes(k, -1, -2)).astype(jnp.float32) * scale  # [B,H,Lq,Lk]
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
  return jnp.swapaxes(jnp.matmul(weights, v), 1, 2)


@IMPLEMENTATIONS.register("matmul")
def _matmul_attention(query, key, value, mask, is_causal, scale, opts):
  del opts
  lq, lk = query.shape[1], key.shape[1]
  if is_causal:
    causal = _causal_mask(lq, lk, q_offset=lk - lq)
    mask = causal if mask is None else jnp.logical_and(mask, causal)
  return _heads_major(query, key, value, mask, _scale(query, scale))


@IMPLEMENTATIONS.register("chunked")
def _chunked_attention(query, key, value, mask, is_causal, scale, opts):
  """Query chunks of `opts.query_chunk` rows, one at a time (`lax.map`), each under
  `jax.checkpoint`: the forward keeps no probabilities and the backward recomputes one chunk's
  at a time, so memory is O(chunk * Lk) instead of O(Lq * Lk). Rows are independent, so the
  result is the matmul formulation's, row by row."""
  b, lq, h, d = query.shape
  lk = key.shape[1]
  chunk = min(opts.query_chunk, lq)
  n = -(-lq // chunk)
  pad = n * chunk - lq
  scale = _scale(query, scale)
  q = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q = jnp.moveaxis(q.reshape(b, n, chunk, h, d), 1, 0)  # [n, B, chunk, H, D]
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)  # [b|1, h|1, lq|1, lk|1]
    if mask.shape[2] != 1:
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
      mask = jnp.moveaxis(mask.reshape(*mask.shape[:2], n, chunk, mask.shape[3]), 2, 0)
    else:
      mask = jnp.broadcast_to(mask[None], (n, *mask.shape))
  starts = jnp.arange(n) * chunk

  @jax.checkpoint
  def one(args):
    q_chunk, mask_chunk, start = args
    m = mask_chunk
    if is_causal:
      causal = _causal_mask(chunk, lk, q_offset=start + lk - lq)
      m = causal if m is None else jnp.logical_and(m, causal)
    return _heads_major(q_chunk, key, value, m, scale)

  out = jax.lax.map(one, (q, mask, starts))  # [n, B, chunk, H, D]
  return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, h, d)[:, :lq]


def _library_attention(query, key, value, mask, is_causal, scale, implementation):
  """`jax.nn.dot_product_attention`; its causal mask is top-left aligned, ours (and torch's
  for Lq < Lk with a cache) bottom-right, so unequal lengths get the mask written out."""
  lq, lk = query.shape[1], key.shape[1]
  if is_causal and lq != lk:
    causal = _causal_mask(lq, lk, q_offset=lk - lq)
    mask = causal if mask is None else jnp.logical_and(mask, causal)
    is_causal = False
  return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale,
                                      is_causal=is_causal, implementation=implementation)


@IMPLEMENTATIONS.register("xla")
def _xla_attention(query, key, value, mask, is_causal, scale, opts):
  del opts
  return _library_attention(query, key, value, mask, is_causal, scale, "xla")


@IMPLEMENTATIONS.register("cudnn")
def _cudnn_attention(query, key, value, mask, is_causal, scale, opts):
  del opts
  return _library_attention(query, key, value, mask, is_causal, scale, "cudnn")


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _blocks(length: int, wanted: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
  """(padded length, blocks): each block clipped to the length rounded up to 128 lanes; the
  padded length a multiple of every block (they are powers-of-two multiples of 128 in use)."""
  cap = _round_up(length, _LANES)
  blocks = tuple(min(b, cap) for b in wanted)
  return _round_up(length, math.lcm(*blocks)), blocks


def _sharded_over_mesh(fn, query, key, value):
  """Runs fn(q, k, v) [b, L, h, D] per device in a `shard_map` over the batch and head axes of
  the context mesh (a Pallas kernel is one device's program: XLA cannot partition it)."""
  from dense_diffusion import sharding  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return fn(query, key, value)
  batch_axes, shards = [], 1
  for axis in sharding.BATCH_AXES:
    size = mesh.shape.get(axis, 1)
    if size > 1 and query.shape[0] % (shards * size) == 0:
      batch_axes.append(axis)
      shards *= size
  head_axis = sharding.ShardingRules().mesh_axis("heads")
  if head_axis is None or mesh.shape.get(head_axis, 1) == 1 or query.shape[2] % mesh.shape[
      head_axis]:
    head_axis = None
  spec = jax.sharding.PartitionSpec(tuple(batch_axes) or None, None, head_axis, None)
  return jax.shard_map(fn, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(query, key, value)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, lq: int, lk: int, blocks: tuple, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  bq, bkv, bkv_compute, bq_dkv, bkv_dkv, bq_dq, bkv_dq = blocks
  block_sizes = splash.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv_compute, block_q_dkv=bq_dkv,
      block_kv_dkv=bkv_dkv, block_kv_dkv_compute=bkv_dkv, block_q_dq=bq_dq, block_kv_dq=bkv_dq)
  mask = splash.MultiHeadMask([splash.FullMask((lq, lk))] * heads)
  return splash.make_splash_mha(mask, block_sizes=block_sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


@IMPLEMENTATIONS.register("splash")
def _splash_attention(query, key, value, mask, is_causal, scale, opts):
  """The Pallas splash kernel (TPU; Pallas' interpreter with `opts.interpret`). Queries and keys
  are padded to whole blocks; padded keys are a second segment that no query attends to."""
  if mask is not None or is_causal:
    raise ValueError("the splash implementation takes no mask (use xla or matmul)")
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # pylint: disable=g-import-not-at-top
  b, lq, h, d = query.shape
  lk = key.shape[1]
  for tally in _KERNEL_FLOPS:
    tally.append(4 * b * h * lq * lk * d)
  lq_pad, (bq, bq_dkv, bq_dq) = _blocks(lq, (opts.block_q, opts.block_q_dkv, opts.block_q_dq))
  lk_pad, (bkv, bkv_compute, bkv_dkv, bkv_dq) = _blocks(
      lk, (opts.block_kv, opts.block_kv_compute, opts.block_kv_dkv, opts.block_kv_dq))
  bkv_compute = math.gcd(bkv, bkv_compute)
  query = query * jnp.asarray(_scale(query, scale), query.dtype)
  segment_ids = None
  if lk_pad != lk:
    segment_ids = splash.SegmentIds(q=jnp.zeros((lq_pad,), jnp.int32),
                                    kv=(jnp.arange(lk_pad) >= lk).astype(jnp.int32))

  def per_device(q, k, v):  # [b, L, h, D] -> [b, Lq, h, D]
    heads = q.shape[2]
    kernel = _splash_kernel(heads, lq_pad, lk_pad,
                            (bq, bkv, bkv_compute, bq_dkv, bkv_dkv, bq_dq, bkv_dq),
                            opts.interpret)
    q = jnp.pad(jnp.swapaxes(q, 1, 2), ((0, 0), (0, 0), (0, lq_pad - lq), (0, 0)))
    k, v = (jnp.pad(jnp.swapaxes(t, 1, 2), ((0, 0), (0, 0), (0, lk_pad - lk), (0, 0)))
            for t in (k, v))
    out = jax.vmap(functools.partial(kernel, segment_ids=segment_ids))(q, k, v)
    return jnp.swapaxes(out[:, :, :lq], 1, 2)

  return _sharded_over_mesh(per_device, query, key, value)


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
    implementation: force one of `IMPLEMENTATIONS`; by default `implementation_for(...)`.

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
  impl = implementation or implementation_for(
      dtype, query.shape[1], masked=mask is not None or is_causal)
  out = IMPLEMENTATIONS.get(impl)(query, key, value, mask, is_causal, scale, _OPTIONS[0])
  # Named for remat policies: `model.remat="save_attention"` keeps this output from the forward
  # pass and recomputes the rest of the block (models/unet.py REMAT_POLICIES).
  return checkpoint_name(out.astype(dtype), CHECKPOINT_NAME)


def attention_probs(query: jax.Array, key: jax.Array, *, scale: Optional[float] = None
                    ) -> jax.Array:
  """The attention probabilities softmax(q k^T * scale), f32[B, H, Lq, Lk], for callers that
  need the maps themselves (VPD's cross-attention maps); query [B, Lq, H, D], key [B, Lk, H, D]."""
  d = query.shape[-1]
  scale = (1.0 / d**0.5) if scale is None else scale
  logits = jnp.einsum("bqhd,bkhd->bhqk", query, key.astype(query.dtype)).astype(jnp.float32)
  return jax.nn.softmax(logits * scale, axis=-1)
