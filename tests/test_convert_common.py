"""Tests of the generic checkpoint reader: safetensors parsing, sharded index, strict assignment."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dense_diffusion.convert import common

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")


class TinyTorch(torch.nn.Module):
  """A torch model whose attribute names our tiny NNX module mirrors."""

  def __init__(self):
    super().__init__()
    self.conv_in = torch.nn.Conv2d(3, 4, 3, padding=1)
    self.norm = torch.nn.GroupNorm(2, 4)
    self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 5), torch.nn.Linear(5, 4, bias=False)])
    self.ln = torch.nn.LayerNorm(4)
    self.emb = torch.nn.Embedding(7, 4)
    self.proj = torch.nn.Conv2d(4, 6, 1)  # 1x1 conv, loaded into a Dense
    self.cls = torch.nn.Parameter(torch.randn(4))

  def forward(self, x):  # x: NCHW
    h = self.norm(self.conv_in(x))
    h = h.permute(0, 2, 3, 1)  # NHWC
    h = self.blocks[1](torch.nn.functional.gelu(self.blocks[0](h)))
    h = self.ln(h) + self.cls
    return torch.nn.functional.linear(h, self.proj.weight[:, :, 0, 0], self.proj.bias)


class TinyNNX(nnx.Module):

  def __init__(self, rngs):
    self.conv_in = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)
    self.norm = nnx.GroupNorm(4, num_groups=2, epsilon=1e-5, rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(4, 5, rngs=rngs),
                            nnx.Linear(5, 4, use_bias=False, rngs=rngs)])
    self.ln = nnx.LayerNorm(4, epsilon=1e-5, rngs=rngs)
    self.emb = nnx.Embed(7, 4, rngs=rngs)
    self.proj = nnx.Linear(4, 6, rngs=rngs)
    self.cls = nnx.Param(jnp.zeros((4,)))

  def __call__(self, x):  # x: NHWC
    h = self.norm(self.conv_in(x))
    h = self.blocks[1](nnx.gelu(self.blocks[0](h), approximate=False))
    return self.proj(self.ln(h) + self.cls[...])


def _randomised_torch():
  torch.manual_seed(0)
  m = TinyTorch()
  with torch.no_grad():
    for p in m.parameters():
      p.copy_(torch.randn_like(p) * 0.5)
  return m


def _key_map(module, keys):
  km = common.map_keys(keys, common.torch_layer_rule(module))
  # The 1x1 conv goes into a Dense: an explicit choice, overriding the layer-type default.
  km["proj.weight"] = common.Target(("proj", "kernel"), common.conv1x1_to_dense)
  return km


def test_round_trip_matches_torch(tmp_path):
  tm = _randomised_torch()
  safetensors_torch.save_file(tm.state_dict(), tmp_path / "model.safetensors")
  tensors = common.load_weights(tmp_path, "model.safetensors")
  assert set(tensors) == set(tm.state_dict())
  ours = TinyNNX(nnx.Rngs(0))
  common.assign(ours, tensors, _key_map(ours, tensors))
  np.testing.assert_array_equal(np.asarray(ours.emb.embedding[...]), tm.emb.weight.detach().numpy())
  x = np.random.default_rng(0).normal(size=(2, 5, 6, 3)).astype(np.float32)
  want = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
  got = np.asarray(ours(jnp.asarray(x)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_low_precision_tensors_become_float32(tmp_path):
  w = torch.randn(3, 4)
  safetensors_torch.save_file(
      {"bf": w.bfloat16(), "h": w.half(), "i": torch.arange(5, dtype=torch.int64)},
      tmp_path / "x.safetensors")
  t = common.read_safetensors(tmp_path / "x.safetensors")
  assert t["bf"].dtype == np.float32 and t["h"].dtype == np.float32
  assert t["i"].dtype == np.int64
  np.testing.assert_array_equal(t["bf"], w.bfloat16().float().numpy())
  np.testing.assert_array_equal(t["h"], w.half().float().numpy())
  np.testing.assert_array_equal(t["i"], np.arange(5))
  kept = common.read_safetensors(tmp_path / "x.safetensors", dtype=None)
  assert kept["h"].dtype == np.float16 and str(kept["bf"].dtype) == "bfloat16"


def test_sharded_index_and_pipeline_subfolder(tmp_path):
  tm = _randomised_torch()
  sd = {k: v.contiguous() for k, v in tm.state_dict().items()}
  keys = sorted(sd)
  sub = tmp_path / "pipe" / "unet"
  sub.mkdir(parents=True)
  shards = {"m-00001-of-00002.safetensors": keys[::2], "m-00002-of-00002.safetensors": keys[1::2]}
  weight_map = {}
  for fname, ks in shards.items():
    safetensors_torch.save_file({k: sd[k] for k in ks}, sub / fname)
    weight_map.update({k: fname for k in ks})
  (sub / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  (sub / "config.json").write_text(json.dumps({"foo": 3}))
  config, tensors = common.load_model_files(tmp_path / "pipe", "model.safetensors", "unet")
  assert config == {"foo": 3}
  assert set(tensors) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(tensors[k], sd[k].numpy())
  # A weights file of another name, given directly (config.json beside it).
  (sub / "model.safetensors.index.json").rename(sub / "other.index.json")
  config2, tensors2 = common.load_model_files(sub / "other.index.json", "model.safetensors")
  assert config2 == config and set(tensors2) == set(sd)
  with pytest.raises(FileNotFoundError, match="vae"):
    common.load_weights(tmp_path / "pipe", "model.safetensors", "vae")


def test_mismatch_error_lists_unused_missing_and_shapes():
  ours = TinyNNX(nnx.Rngs(0))
  tensors = {k: v.detach().numpy() for k, v in _randomised_torch().state_dict().items()}
  del tensors["ln.bias"]
  tensors["extra.weight"] = np.zeros(3, np.float32)
  tensors["buffer_ok"] = np.zeros(3, np.float32)
  tensors["blocks.0.weight"] = np.zeros((5, 3), np.float32)
  with pytest.raises(common.CheckpointMismatchError) as info:
    common.assign(ours, tensors, _key_map(ours, tensors), ignore=["buffer_ok"])
  err = info.value
  assert isinstance(err, ValueError)
  assert err.unused == ["extra.weight"]
  assert err.missing == ["blocks.0.kernel", "ln.bias"]
  assert err.shape_mismatches == [("blocks.0.weight", "blocks.0.kernel", (3, 5), (4, 5))]
  msg = str(err)
  for s in ("extra.weight", "ln.bias", "blocks.0.kernel", "(3, 5)", "(4, 5)"):
    assert s in msg
  assert "buffer_ok" not in msg
  # Nothing was written on failure.
  assert not np.any(np.asarray(ours.cls[...]))


def test_transforms_are_explicit():
  w = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)
  k = common.conv_to_conv(w)
  assert k.shape == (2, 2, 3, 2) and k[1, 0, 2, 1] == w[1, 2, 1, 0]
  assert common.linear_to_dense(np.zeros((5, 3))).shape == (3, 5)
  assert common.linear_to_conv1x1(np.zeros((5, 3))).shape == (1, 1, 3, 5)
  with pytest.raises(ValueError, match="1, 1"):
    common.conv1x1_to_dense(w)
  with pytest.raises(ValueError):
    common.linear_to_dense(w)


class WithDropout(nnx.Module):

  def __init__(self, rngs):
    self.inner = TinyNNX(rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x, *, deterministic=True):
    return self.drop(self.inner(x), deterministic=deterministic)


def test_build_abstract_skips_init_and_assign_fills_it(tmp_path):
  tm = _randomised_torch()
  safetensors_torch.save_file(tm.state_dict(), tmp_path / "model.safetensors")
  tensors = common.load_weights(tmp_path, "model.safetensors")
  ours = common.build_abstract(lambda: WithDropout(nnx.Rngs(0)))
  assert isinstance(ours.inner.blocks[0].kernel.get_value(), jax.ShapeDtypeStruct)
  key_map = {k: common.Target(("inner",) + t.path, t.transform)
             for k, t in _key_map(ours.inner, tensors).items()}
  common.assign(ours, tensors, key_map)
  x = np.random.default_rng(0).normal(size=(1, 4, 4, 3)).astype(np.float32)
  want = tm(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))), want, atol=1e-5, rtol=1e-5)
  # The dropout RNG state is concrete and usable.
  dropped = np.asarray(ours(jnp.asarray(x), deterministic=False))
  assert np.all((dropped == 0) | np.isclose(dropped, 2 * want, atol=1e-4))
  assert 0 < np.mean(dropped == 0) < 1
  # A placeholder left unfilled is reported, not silently kept.
  fresh = common.build_abstract(lambda: WithDropout(nnx.Rngs(0)))
  del key_map["ln.bias"]
  with pytest.raises(common.CheckpointMismatchError, match="inner.ln.bias"):
    common.assign(fresh, tensors, key_map, ignore=["ln.bias"])
