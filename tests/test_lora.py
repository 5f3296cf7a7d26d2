"""LoRA adapters: zero start, only adapters train, merge/unmerge round trip, axis names."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dense_diffusion.models import lora
from dense_diffusion.models import unet as unet_lib

CONFIG = dict(
    in_channels=4, out_channels=4, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)


def _random_unet(seed=0):
  """A tiny UNet with random float32 weights (built abstractly, filled with numpy: fast)."""
  model = nnx.eval_shape(lambda: unet_lib.UNet(CONFIG, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    shape = var.get_value().shape
    if path[-1] == "scale":
      value = 1 + 0.1 * rng.standard_normal(shape)
    else:
      fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 10
      value = rng.standard_normal(shape) / np.sqrt(fan_in)
    flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def _inputs():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  t = jnp.asarray([5.0, 300.0])
  ctx = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  return x, t, ctx


@nnx.jit
def _apply(model, x, t, ctx):
  return model(x, t, ctx)


def _base_params(model):
  return {p: np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, lora.BASE_PARAMS))}


@pytest.fixture(scope="module")
def trained():
  """A UNet with adapters, its outputs before and after a few AdamW steps on the adapters."""
  model = _random_unet()
  x, t, ctx = _inputs()
  before = np.asarray(_apply(model, x, t, ctx))
  paths = lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(3))
  at_start = np.asarray(_apply(model, x, t, ctx))
  base_before = _base_params(model)
  target = jnp.asarray(np.random.default_rng(2).standard_normal(before.shape), jnp.float32)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=lora.LORA_PARAMS)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      return jnp.mean((m(x, t, ctx) - target) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lora.LORA_PARAMS))(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(4)]
  return dict(model=model, paths=paths, before=before, at_start=at_start,
              base_before=base_before, losses=losses, inputs=(x, t, ctx))


def test_adapters_on_attention_projections_start_at_zero(trained):
  paths = trained["paths"]
  # Transformers: 1 in the cross-attention down block, 1 in the mid block, 2 in the cross-attention
  # up block (layers_per_block + 1); each has attn1 and attn2 with to_q, to_k, to_v, to_out.0.
  assert len(paths) == 4 * 2 * 4
  assert all(p.split(".")[-1] in ("to_q", "to_k", "to_v", "0") for p in paths)
  np.testing.assert_array_equal(trained["at_start"], trained["before"])


def test_only_adapters_change_in_training(trained):
  model = trained["model"]
  assert trained["losses"][-1] < trained["losses"][0]
  after = _base_params(model)
  assert after.keys() == trained["base_before"].keys()
  for p, v in trained["base_before"].items():
    np.testing.assert_array_equal(after[p], v, err_msg=str(p))
  layer = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
  assert np.abs(np.asarray(layer.lora_up.get_value())).max() > 0
  x, t, ctx = trained["inputs"]
  assert np.abs(np.asarray(_apply(model, x, t, ctx)) - trained["before"]).max() > 1e-4


def test_merge_matches_unmerged_and_unmerge_restores(trained):
  model = trained["model"]
  x, t, ctx = trained["inputs"]
  unmerged_out = np.asarray(_apply(model, x, t, ctx))
  base = _base_params(model)
  assert lora.merge_lora(model) == 32
  assert lora.merge_lora(model) == 0  # idempotent
  merged_kernel = np.asarray(
      model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel.get_value())
  key = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1", "to_q", "kernel")
  layer = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
  expected = base[key] + 2.0 * (np.asarray(layer.lora_down.get_value()) @
                                np.asarray(layer.lora_up.get_value()))
  np.testing.assert_allclose(merged_kernel, expected, atol=1e-6)
  np.testing.assert_allclose(np.asarray(_apply(model, x, t, ctx)), unmerged_out, atol=1e-5)
  assert lora.unmerge_lora(model) == 32
  for p, v in _base_params(model).items():
    np.testing.assert_allclose(v, base[p], atol=1e-6, err_msg=str(p))
  np.testing.assert_allclose(np.asarray(_apply(model, x, t, ctx)), unmerged_out, atol=1e-5)


def test_conv_adapters_and_axis_names():
  model = _random_unet(seed=4)
  x, t, ctx = _inputs()
  before = np.asarray(_apply(model, x, t, ctx))
  paths = lora.apply_lora(model, r"resnets\.\d+\.conv1$", rank=3, rngs=nnx.Rngs(0))
  assert len(paths) == 8  # resnets: 1 + 1 down, 2 mid, 2 + 2 up.
  layer = model.mid_block.resnets[0].conv1
  assert layer.lora_down.get_value().shape == (3, 3, 32, 3)
  assert layer.lora_down.get_metadata()["out_sharding"] == (
      "conv_height", "conv_width", "conv_in", "lora_rank")
  assert layer.lora_up.get_metadata()["out_sharding"] == ("lora_rank", "conv_out")
  np.testing.assert_array_equal(np.asarray(_apply(model, x, t, ctx)), before)
  # Non-zero up-projections: the merged kernel reproduces the adapter path of a 3x3 conv.
  rng = np.random.default_rng(0)
  for _, node in lora.lora_layers(model, r"resnets\.\d+\.conv1$"):
    node.lora_up.set_value(jnp.asarray(rng.standard_normal(node.lora_up.get_value().shape),
                                       jnp.float32))
  unmerged = np.asarray(_apply(model, x, t, ctx))
  assert np.abs(unmerged - before).max() > 1e-3
  lora.merge_lora(model)
  np.testing.assert_allclose(np.asarray(_apply(model, x, t, ctx)), unmerged, atol=1e-4)


def test_errors():
  model = _random_unet()
  with pytest.raises(ValueError, match="matches no"):
    lora.apply_lora(model, r"no_such_layer", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="rank"):
    lora.apply_lora(model, rank=0, rngs=nnx.Rngs(0))
  lora.apply_lora(model, r"conv_in$", rank=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="already has"):
    lora.apply_lora(model, r"conv_in$", rank=1, rngs=nnx.Rngs(0))
