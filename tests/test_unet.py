"""Parity of models/unet.py + convert/unet.py with diffusers' UNet2DConditionModel (tiny configs)."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")
attention_processor = pytest.importorskip("diffusers.models.attention_processor")

from dense_diffusion.convert import common  # noqa: E402
from dense_diffusion.convert import load_diffusers_unet  # noqa: E402
from dense_diffusion.models import unet as unet_lib  # noqa: E402

SD1 = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
SD2 = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=(1, 2),
    cross_attention_dim=24, attention_head_dim=(2, 4), use_linear_projection=True,
    transformer_layers_per_block=2, upcast_attention=True, norm_num_groups=8)
ODD = dict(
    sample_size=16, in_channels=3, out_channels=5, block_out_channels=(24, 48, 48),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    cross_attention_dim=16, attention_head_dim=3, norm_num_groups=3, norm_eps=1e-6,
    only_cross_attention=(True, False, False), flip_sin_to_cos=False, freq_shift=1,
    mid_block_scale_factor=0.5, dropout=0.1)


def _randomize(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1 and "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif p.ndim == 1:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = math.prod(p.shape[1:])
        p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
  return model.eval()


def _build(config, seed):
  return _randomize(diffusers.UNet2DConditionModel(**config), seed)


def _inputs(config, h=16, w=16, batch=2, length=5, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, h, w, config["in_channels"])).astype(np.float32)
  t = np.array([3.0, 700.0][:batch], np.float32)
  ctx = rng.standard_normal((batch, length, config["cross_attention_dim"])).astype(np.float32)
  return x, t, ctx


@nnx.jit
def _apply(model, x, t, ctx):
  return model(x, t, ctx)


def _torch_out(model, x, t, ctx):
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                torch.from_numpy(ctx)).sample
  return out.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  model = _build(SD1, 1)
  path = tmp_path_factory.mktemp("sd1")
  model.save_pretrained(path, safe_serialization=True)
  return model, path


@pytest.mark.parametrize("name,config,hw,save_kw,sub", [
    ("sd2_sharded", SD2, (16, 16), dict(max_shard_size="60KB"), None),
    ("odd_pipeline", ODD, (13, 10), {}, "unet"),
])
def test_parity_other_configs(tmp_path, name, config, hw, save_kw, sub):
  model = _build(config, 2)
  target = tmp_path / sub if sub else tmp_path
  model.save_pretrained(target, safe_serialization=True, **save_kw)
  if save_kw:
    assert list(tmp_path.glob("*.index.json")), "expected the sharded form"
  ours = load_diffusers_unet(tmp_path)
  ours.eval()  # deterministic dropout, as torch's model.eval().
  x, t, ctx = _inputs(config, *hw)
  expected = _torch_out(model, x, t, ctx)
  got = np.asarray(_apply(ours, x, t, ctx))
  assert got.shape == expected.shape
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_parity_sd1_with_decoder_features(sd1):
  model, path = sd1
  ours = load_diffusers_unet(path)
  x, t, ctx = _inputs(SD1)
  # Decoder features = output of each up block before its upsampler: the last resnet of the
  # UpBlock2D, the last transformer of the CrossAttnUpBlock2D.
  captured = []
  hooks = [model.up_blocks[0].resnets[-1].register_forward_hook(
               lambda m, i, o: captured.append(o)),
           model.up_blocks[1].attentions[-1].register_forward_hook(
               lambda m, i, o: captured.append(o[0]))]
  expected = _torch_out(model, x, t, ctx)
  for h in hooks:
    h.remove()
  out, feats = nnx.jit(lambda m, *a: m(*a, return_features=True))(ours, x, t, ctx)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=0)
  assert [f.shape for f in feats] == [(2, 8, 8, 64), (2, 16, 16, 32)]
  for f, c in zip(feats, captured):
    np.testing.assert_allclose(np.asarray(f), c.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)


# Scope and policy are independent in models/unet.py (`checkpointed(policy)` runs blocks or
# layers), so each scope and each policy is covered once: block / full, block / save_dots,
# layer / full, layer / save_attention.
@pytest.mark.parametrize("remat", [True, "save_dots", "layer", "layer_save_attention"])
def test_remat_gradients_match_torch(sd1, remat):
  model, path = sd1
  x, t, ctx = _inputs(SD1)
  ours = load_diffusers_unet(path, remat=remat)

  def loss(m):
    return jnp.mean(m(x, t, ctx) ** 2)

  grads = nnx.jit(nnx.grad(loss))(ours)
  model.zero_grad()
  out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
              torch.from_numpy(ctx)).sample
  (out ** 2).mean().backward()
  pairs = [
      (grads.conv_in.kernel, model.conv_in.weight.grad.permute(2, 3, 1, 0)),
      (grads.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel,
       model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.grad.T),
      (grads.mid_block.resnets[0].norm1.scale, model.mid_block.resnets[0].norm1.weight.grad),
      (grads.time_embedding.linear_1.kernel, model.time_embedding.linear_1.weight.grad.T),
      (grads.up_blocks[1].resnets[1].conv_shortcut.bias,
       model.up_blocks[1].resnets[1].conv_shortcut.bias.grad),
  ]
  for ours_g, torch_g in pairs:
    ref = torch_g.detach().numpy()
    np.testing.assert_allclose(np.asarray(ours_g[...]), ref, atol=1e-5 + 1e-3 * np.abs(ref).max())


def test_bf16_close_to_fp32(sd1):
  _, path = sd1
  x, t, ctx = _inputs(SD1)
  ref = np.asarray(_apply(load_diffusers_unet(path), x, t, ctx))
  bf = load_diffusers_unet(path, dtype=jnp.bfloat16)
  assert bf.conv_in.kernel[...].dtype == jnp.float32  # parameters stay float32.
  got = np.asarray(_apply(bf, x, t, ctx))
  assert got.dtype == np.float32
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  assert rel < 3e-2, rel


@pytest.mark.parametrize("new_in,rule", [(8, "copy_scale"), (6, "copy_scale"), (6, "zeros"),
                                         (8, "zeros")])
def test_input_widening(sd1, new_in, rule):
  model, path = sd1
  ours = load_diffusers_unet(path, in_channels=new_in, input_widening=rule)
  w = model.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0)  # [kh, kw, 4, out]
  if rule == "copy_scale" and new_in % 4 == 0:
    r = new_in // 4
    expected = np.concatenate([w / r] * r, axis=2)
  else:
    expected = np.concatenate([w, np.zeros(w.shape[:2] + (new_in - 4, w.shape[3]))], axis=2)
  np.testing.assert_allclose(np.asarray(ours.conv_in.kernel[...]), expected, atol=1e-7)
  # Invariant: repeated inputs (copy_scale) or any extra input (zeros) leave the output unchanged.
  x, t, ctx = _inputs(SD1)
  if rule == "copy_scale" and new_in % 4 == 0:
    wide = np.concatenate([x] * (new_in // 4), axis=-1)
  else:
    extra = np.random.default_rng(5).standard_normal(x.shape[:3] + (new_in - 4,))
    wide = np.concatenate([x, extra.astype(np.float32)], axis=-1)
  np.testing.assert_allclose(np.asarray(_apply(ours, wide, t, ctx)), _torch_out(model, x, t, ctx),
                             atol=1e-4, rtol=0)


def test_widening_rejects_bad_rule_and_narrowing(sd1):
  _, path = sd1
  with pytest.raises(ValueError, match="input_widening"):
    load_diffusers_unet(path, in_channels=8, input_widening="random")
  with pytest.raises(ValueError, match="narrow"):
    load_diffusers_unet(path, in_channels=2)


def test_missing_and_unused_keys_are_listed(sd1, tmp_path):
  _, path = sd1
  tensors = safetensors_torch.load_file(str(path / "diffusion_pytorch_model.safetensors"))
  del tensors["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
  del tensors["mid_block.resnets.1.norm2.bias"]
  tensors["mid_block.extra_layer.weight"] = torch.zeros(3)
  safetensors_torch.save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  (tmp_path / "config.json").write_text((path / "config.json").read_text())
  with pytest.raises(common.CheckpointMismatchError) as info:
    load_diffusers_unet(tmp_path)
  msg = str(info.value)
  assert "mid_block.extra_layer.weight" in msg
  assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.kernel" in msg
  assert "mid_block.resnets.1.norm2.bias" in msg


@pytest.mark.parametrize("key,value", [
    ("class_embed_type", "timestep"), ("time_embedding_type", "fourier"),
    ("resnet_time_scale_shift", "scale_shift"), ("down_block_types", ["AttnDownBlock2D"]),
    ("dual_cross_attention", True), ("addition_embed_type", "text_time"),
    ("some_new_key", 1)])
def test_unsupported_config_raises_naming_key(sd1, key, value):
  _, path = sd1
  config = json.loads((path / "config.json").read_text())
  config[key] = value
  with pytest.raises(ValueError, match=key):
    unet_lib.UNet(config, rngs=nnx.Rngs(0))


def test_metadata_keys_ignored_and_every_diffusers_key_known(sd1):
  _, path = sd1
  config = json.loads((path / "config.json").read_text())
  for key in config:  # everything diffusers writes is either a config key or known metadata.
    assert key in unet_lib.UNET_CONFIG_KEYS or key in unet_lib.UNET_METADATA_KEYS, key
  normalized = unet_lib.normalize_config(config)
  assert "_class_name" not in normalized and normalized["block_out_channels"] == (32, 64)


def test_logical_axis_names_on_every_parameter(sd1):
  _, path = sd1
  model = load_diffusers_unet(path)
  for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    names = v.get_metadata().get("out_sharding")
    assert names is not None and len(names) == v.get_value().ndim, p
  assert model.conv_in.kernel.get_metadata()["out_sharding"] == (
      "conv_height", "conv_width", "conv_in", "conv_out")


def test_num_attention_heads_takes_precedence(sd1):
  """diffusers' SD configs store the head count in attention_head_dim; an explicit
  num_attention_heads (rejected by diffusers' UNet2DConditionModel) means the same here."""
  model, path = sd1
  ours = load_diffusers_unet(path, num_attention_heads=SD1["attention_head_dim"],
                             attention_head_dim=7)
  block = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1
  assert (block.heads, block.dim_head) == (4, 8)
  x, t, ctx = _inputs(SD1)
  np.testing.assert_allclose(np.asarray(_apply(ours, x, t, ctx)), _torch_out(model, x, t, ctx),
                             atol=1e-4, rtol=0)


def test_class_embedding_parity_and_label_errors(tmp_path):
  """`num_class_embeds` (class_embed_type None): diffusers adds an embedding of the class label
  to the timestep embedding; the checkpoint's `class_embedding.weight` loads into ours."""
  config = dict(SD1, num_class_embeds=3)
  model = _build(config, 3)
  model.save_pretrained(tmp_path, safe_serialization=True)
  ours = load_diffusers_unet(tmp_path)
  assert ours.class_embedding.embedding.get_metadata()["out_sharding"] == ("classes", "embed")
  x, t, ctx = _inputs(config)
  labels = np.array([2, 0], np.int32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                     torch.from_numpy(ctx), class_labels=torch.from_numpy(labels).long()
                     ).sample.permute(0, 2, 3, 1).numpy()
  got = np.asarray(nnx.jit(lambda m, *a: m(*a[:3], class_labels=a[3]))(ours, x, t, ctx, labels))
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  other = np.asarray(nnx.jit(lambda m, *a: m(*a[:3], class_labels=a[3]))(
      ours, x, t, ctx, labels[::-1].copy()))
  assert np.abs(other - got).max() > 1e-3  # the label changes the answer.
  with pytest.raises(ValueError, match="pass class_labels"):
    ours(x, t, ctx)
  plain = unet_lib.UNet(SD1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="no class embedding"):
    plain(x, t, ctx, class_labels=labels)


def test_projection_class_embedding_parity(tmp_path):
  """`class_embed_type="projection"`: diffusers projects a vector per example (a prompt's pooled
  embedding) by a TimestepEmbedding into the timestep embedding; its `class_embedding.linear_1/2`
  load into ours under the same names and give the same output."""
  config = dict(SD2, class_embed_type="projection", projection_class_embeddings_input_dim=6)
  model = _build(config, 4)
  model.save_pretrained(tmp_path, safe_serialization=True)
  ours = load_diffusers_unet(tmp_path)
  assert ours.class_embedding.linear_1.kernel[...].shape == (6, 4 * 32)
  x, t, ctx = _inputs(config)
  vectors = np.random.default_rng(7).standard_normal((2, 6)).astype(np.float32)
  with torch.no_grad():
    expected = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                     torch.from_numpy(ctx), class_labels=torch.from_numpy(vectors)
                     ).sample.permute(0, 2, 3, 1).numpy()
  run = nnx.jit(lambda m, *a: m(*a[:3], class_labels=a[3]))
  got = np.asarray(run(ours, x, t, ctx, vectors))
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
  other = np.asarray(run(ours, x, t, ctx, vectors[::-1].copy()))
  assert np.abs(other - got).max() > 1e-3  # the vector changes the answer.
  with pytest.raises(ValueError, match=r"f32\[B, 6\] vectors"):
    ours(x, t, ctx, class_labels=np.array([0, 1], np.int32))
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
    unet_lib.UNet(dict(SD1, class_embed_type="projection"), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_class_embeds is unused"):
    unet_lib.normalize_config(dict(config, num_class_embeds=3))


class _RecordingProcessor(attention_processor.AttnProcessor):
  """diffusers' plain attention processor, recording the probabilities it computes."""

  def __init__(self, name, store):
    super().__init__()
    self.name, self.store = name, store

  def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
               temb=None, *args, **kwargs):
    original = attn.get_attention_scores

    def recording(query, key, mask=None):
      probs = original(query, key, mask)
      self.store[self.name] = probs.detach()
      return probs

    attn.get_attention_scores = recording
    try:
      return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
    finally:
      del attn.get_attention_scores  # the class's method again


@pytest.mark.parametrize("name,config", [("sd1", SD1), ("sd2", SD2)])
def test_cross_attention_maps_match_diffusers(tmp_path, name, config):
  model = _build(config, 5)
  model.save_pretrained(tmp_path, safe_serialization=True)
  ours = load_diffusers_unet(tmp_path)
  recorded = {}
  processors = {}
  for key in model.attn_processors:
    path = key.removesuffix(".processor")
    processors[key] = (_RecordingProcessor(path, recorded) if path.endswith("attn2")
                       else attention_processor.AttnProcessor())
  model.set_attn_processor(processors)
  x, t, ctx = _inputs(config)
  expected = _torch_out(model, x, t, ctx)
  out, maps = nnx.jit(lambda m, *a: m(*a, return_attention_maps=True))(ours, x, t, ctx)
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4, rtol=0)
  assert set(maps) == set(recorded) and recorded
  for path, probs in recorded.items():
    got = np.asarray(maps[path])  # [B, heads, h*w, tokens]
    b, heads = got.shape[:2]
    want = probs.reshape(b, heads, *probs.shape[1:]).numpy()  # diffusers: [B * heads, ...]
    assert got.shape == want.shape, path
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0, err_msg=path)


def test_remat_names():
  from dense_diffusion import errors  # pylint: disable=g-import-not-at-top
  assert [unet_lib.remat_policy_name(v) for v in (False, None, True, "save_attention")] == [
      "none", "none", "full", "save_attention"]
  assert unet_lib.remat_names() == ["full", "save_attention", "save_dots", "layer",
                                    "layer_save_attention", "layer_save_dots"]
  assert [unet_lib.remat_scope(unet_lib.remat_policy_name(v)) for v in (
      False, True, "save_dots", "layer", "layer_save_attention")] == [
          ("none", None), ("block", "full"), ("block", "save_dots"), ("layer", "full"),
          ("layer", "save_attention")]
  for bad in ("attention", "layer_full", "layer_none", "block"):
    with pytest.raises(errors.ConfigError, match="layer_save_dots"):  # lists the known ones
      unet_lib.remat_policy_name(bad)
