"""Chunked parameter initialisers: Flax's distributions, one compilation, same values when traced."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dense_diffusion.models import initializers
from dense_diffusion.models import layers


def test_fan_in_truncated_normal_matches_flax_distribution():
  shape = (3, 3, 64, 96)  # fan_in 576; 55,296 values, several chunks' worth of statistics
  ours = np.asarray(initializers.fan_in_truncated_normal(jax.random.key(0), shape))
  flax_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
  theirs = np.asarray(flax_init(jax.random.key(1), shape, jnp.float32))
  assert ours.shape == shape and ours.dtype == np.float32
  target_std = 1.0 / math.sqrt(576)
  for x in (ours, theirs):
    assert abs(x.std() - target_std) < 0.02 * target_std
    assert abs(x.mean()) < 0.02 * target_std
  # Both truncate at 2 standard deviations of the underlying (pre-truncation) normal.
  bound = 2 * target_std / initializers.TRUNCATED_NORMAL_STD
  assert np.abs(ours).max() <= bound * (1 + 1e-6)
  assert np.abs(ours).max() > 0.98 * bound
  assert np.abs(ours).max() == pytest.approx(np.abs(theirs).max(), rel=0.02)


def test_normal_std_and_constants():
  x = np.asarray(initializers.normal(0.02)(jax.random.key(3), (300, 200)))
  assert abs(x.std() - 0.02) < 0.0005 and abs(x.mean()) < 0.0005
  assert np.abs(x).max() > 3 * 0.02  # untruncated
  np.testing.assert_array_equal(initializers.zeros(None, (2, 3), jnp.float32), np.zeros((2, 3)))
  np.testing.assert_array_equal(initializers.ones(None, (4,), jnp.float32), np.ones(4))


@pytest.mark.parametrize("shape", [(5, 7), (initializers.CHUNK_SIZE + 3, 2), (0, 4)])
def test_eager_and_traced_values_are_identical(shape):
  key = jax.random.key(7)
  for init in (initializers.fan_in_truncated_normal, initializers.normal(0.5)):
    eager = np.asarray(init(key, shape, jnp.float32))
    traced = np.asarray(jax.jit(lambda k, init=init: init(k, shape, jnp.float32))(key))
    np.testing.assert_array_equal(eager, traced)


def test_values_are_the_keys_stream_cut_to_size():
  """A parameter's values are its key's chunked stream cut to size: different keys differ."""
  a = np.asarray(initializers.normal(1.0)(jax.random.key(0), (10,)))
  b = np.asarray(initializers.normal(1.0)(jax.random.key(0), (4, 5)))
  c = np.asarray(initializers.normal(1.0)(jax.random.key(1), (10,)))
  np.testing.assert_array_equal(a, b.reshape(-1)[:10])
  assert not np.allclose(a, c)


def test_building_many_shapes_compiles_each_distribution_once():
  initializers._draw_chunk.clear_cache()
  rngs = nnx.Rngs(0)
  for width in (3, 5, 8, 13):
    layers.Conv2d(width, width + 1, 3, rngs=rngs)
    layers.Dense(width, 2 * width, rngs=rngs)
  # truncated normal (kernels) only: biases are host constants.
  assert initializers._draw_chunk._cache_size() == 1


def test_bfloat16_and_errors():
  x = initializers.fan_in_truncated_normal(jax.random.key(0), (8, 8), jnp.bfloat16)
  assert x.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="rank >= 2"):
    initializers.fan_in_truncated_normal(jax.random.key(0), (8,))
  with pytest.raises(ValueError, match="unknown distribution 'uniform'"):
    initializers.standard_draws(jax.random.key(0), (2,), "uniform")
