"""models/layers.py building blocks against torch, and the conv kernel-gradient modes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dense_diffusion.models import layers

torch = pytest.importorskip("torch")


@pytest.fixture(autouse=True)
def _restore_conv_mode():
  yield
  layers.set_conv_weight_grad("auto")


@pytest.mark.parametrize("k,c", [(3, 8), (5, 4)])
def test_conv_matmul_kernel_gradient_matches_xla(k, c):
  conv = layers.Conv2d(c, 6, k, padding=(k - 1) // 2, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 7, 5, c)), jnp.float32)
  kernel = conv.kernel[...]

  def f(kernel, x):
    return jnp.sum(jnp.sin(conv._conv(x, kernel)))  # the layer's convolution path.

  grads = {}
  for mode in ("xla", "matmul"):
    layers.set_conv_weight_grad(mode)
    grads[mode] = jax.grad(f, argnums=(0, 1))(kernel, x)
  for a, b in zip(grads["xla"], grads["matmul"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  # Same forward either way, and equal to torch's conv.
  ref = torch.nn.functional.conv2d(torch.from_numpy(np.array(x)).permute(0, 3, 1, 2),
                                   torch.from_numpy(np.array(kernel)).permute(3, 2, 0, 1),
                                   padding=(k - 1) // 2)
  np.testing.assert_allclose(np.asarray(conv(x)), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  with pytest.raises(ValueError, match="unknown"):
    layers.set_conv_weight_grad("fast")


def test_group_norm_matches_torch_odd_groups():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 5, 3, 12)).astype(np.float32) * 3 + 1
  gn = layers.GroupNorm(12, 3, eps=1e-6, rngs=nnx.Rngs(0))
  scale, bias = rng.standard_normal(12).astype(np.float32), rng.standard_normal(12).astype(
      np.float32)
  gn.scale.set_value(jnp.asarray(scale))
  gn.bias.set_value(jnp.asarray(bias))
  tgn = torch.nn.GroupNorm(3, 12, eps=1e-6)
  with torch.no_grad():
    tgn.weight.copy_(torch.from_numpy(scale))
    tgn.bias.copy_(torch.from_numpy(bias))
    ref = tgn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(gn(jnp.asarray(x))), ref, atol=1e-5)
  with pytest.raises(ValueError, match="divisible"):
    layers.GroupNorm(10, 3, rngs=nnx.Rngs(0))


def test_downsample_padding_and_avgpool_and_nearest_resize_match_torch():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 7, 6, 4)).astype(np.float32)
  tx = torch.from_numpy(x).permute(0, 3, 1, 2)
  for padding in (0, 1):
    down = layers.Downsample2D(4, padding=padding, rngs=nnx.Rngs(0))
    k = torch.from_numpy(np.array(down.conv.kernel[...])).permute(3, 2, 0, 1)
    b = torch.from_numpy(np.array(down.conv.bias[...]))
    tin = torch.nn.functional.pad(tx, (0, 1, 0, 1)) if padding == 0 else tx
    ref = torch.nn.functional.conv2d(tin, k, b, stride=2, padding=padding)
    np.testing.assert_allclose(np.asarray(down(jnp.asarray(x))),
                               ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  pool = layers.Downsample2D(4, use_conv=False, rngs=nnx.Rngs(0))
  ref = torch.nn.functional.avg_pool2d(tx, 2, 2)
  np.testing.assert_allclose(np.asarray(pool(jnp.asarray(x))), ref.permute(0, 2, 3, 1).numpy(),
                             atol=1e-6)
  for size in ((14, 12), (13, 11), (5, 9)):
    ref = torch.nn.functional.interpolate(tx, size=size, mode="nearest")
    np.testing.assert_array_equal(np.asarray(layers.resize_nearest(jnp.asarray(x), size)),
                                  ref.permute(0, 2, 3, 1).numpy())
