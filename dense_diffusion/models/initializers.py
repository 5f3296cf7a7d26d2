"""Parameter initialisers with one XLA compilation per distribution, not one per shape.

Flax's initialisers (`nnx.initializers.variance_scaling`, `normal`, `zeros`) are JAX programs
specialised to the parameter's shape. Run eagerly (a model built outside `jit`), every new shape
is a new XLA:CPU compilation: ~2 s for a truncated normal on a 2-core VM, ~30 s for the demo
model's ~270 parameters before its first training step. Jitting the whole construction is no
better (one program with ~100 random-number generators compiles for ~40 s). These initialisers
draw the same distributions in fixed-size chunks (one compiled program per distribution, reused
for every parameter), then cut, reshape and scale on the host.

Under a JAX trace (`nnx.eval_shape`, a jitted construction) the same chunks come from one
vmapped draw and are cut with `jnp`, so a parameter's value does not depend on how the model was
built.

Every initialiser has Flax's signature `init(key, shape, dtype) -> Array`.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]

# Values drawn per compiled call: large enough that a 2-core CPU spends its time drawing, not
# dispatching; the last chunk of a parameter is cut to size.
CHUNK_SIZE = 2**16

# Standard deviation of a unit normal truncated to [-2, 2]; dividing by it gives the truncated
# draws unit variance (as `nnx.initializers.variance_scaling` does).
TRUNCATED_NORMAL_STD = 0.87962566103423978

# distribution name -> function(key) -> f32[CHUNK_SIZE] standard draws.
STANDARD_DISTRIBUTIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "normal": lambda key: jax.random.normal(key, (CHUNK_SIZE,), jnp.float32),
    "truncated_normal": lambda key: jax.random.truncated_normal(
        key, -2.0, 2.0, (CHUNK_SIZE,), jnp.float32),
}


@functools.partial(jax.jit, static_argnums=2)
def _draw_chunk(key: jax.Array, index: jax.Array, distribution: str) -> jax.Array:
  return STANDARD_DISTRIBUTIONS[distribution](jax.random.fold_in(key, index))


def _traced(key) -> bool:
  return isinstance(key, jax.core.Tracer)


def standard_draws(key: jax.Array, shape: Sequence[int], distribution: str):
  """f32[*shape] draws of a standard `distribution` (numpy when `key` is concrete)."""
  if distribution not in STANDARD_DISTRIBUTIONS:
    raise ValueError(f"unknown distribution {distribution!r}; known: "
                     f"{sorted(STANDARD_DISTRIBUTIONS)}")
  shape = tuple(int(d) for d in shape)
  size = math.prod(shape)
  num_chunks = -(-size // CHUNK_SIZE)
  if _traced(key):
    # One vmapped draw: a loop of per-chunk calls would trace thousands of them for an SD-size
    # model under `nnx.eval_shape` (4x slower). Same values as the eager loop below.
    indices = jnp.arange(num_chunks, dtype=jnp.int32)
    flat = jax.vmap(lambda i: _draw_chunk(key, i, distribution))(indices).reshape(-1)
  else:
    chunks = [np.asarray(_draw_chunk(key, i, distribution)) for i in range(num_chunks)]
    flat = np.concatenate(chunks) if chunks else np.zeros((0,), np.float32)
  return flat[:size].reshape(shape)


def _as_param_value(value, dtype) -> jax.Array:
  if isinstance(value, np.ndarray):
    # Cast on the host and `device_put`: an eager `astype` or `jnp.asarray` compiles once per
    # shape again.
    return jax.device_put(value.astype(dtype))
  return value.astype(dtype)


def fan_in_truncated_normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32
                            ) -> jax.Array:
  """Flax's `variance_scaling(1.0, "fan_in", "truncated_normal")` (its default kernel init).

  Variance 1 / fan_in, where fan_in is the product of all axes but the last (output) one:
  `in` for a dense kernel [in, out], kh * kw * in for a convolution kernel [kh, kw, in, out].
  """
  if len(shape) < 2:
    raise ValueError(f"fan-in initialisation needs a kernel of rank >= 2, got shape {shape}")
  std = math.sqrt(1.0 / max(1, math.prod(shape[:-1]))) / TRUNCATED_NORMAL_STD
  return _as_param_value(standard_draws(key, shape, "truncated_normal") * np.float32(std),
                         dtype)


def normal(stddev: float) -> Initializer:
  """N(0, stddev^2) (Flax's `nnx.initializers.normal`)."""

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    return _as_param_value(standard_draws(key, shape, "normal") * np.float32(stddev), dtype)

  return init


def constant(value: float) -> Initializer:
  """Every entry `value` (built on the host: no compilation at all)."""

  def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    del key
    return jax.device_put(np.full(tuple(shape), value, dtype=dtype))

  return init


zeros = constant(0.0)
ones = constant(1.0)
