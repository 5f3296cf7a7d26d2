"""The VPD backbone paradigm's parts: the text adapter starts as the identity, class-prompt tokens
are the text encoder's pooled embeddings (transformers' pooler output), computed once and kept
frozen, head answers go through their task's encoding exactly, attention maps attach per scale."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import vpd_depth, vpd_seg
from dense_diffusion import errors
from dense_diffusion import experiment
from dense_diffusion import tasks
from dense_diffusion.models import heads
from dense_diffusion.paradigms import backbone

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_text_encoder import _write_tiny_vocab  # pylint: disable=wrong-import-position


def test_text_adapter_starts_as_the_identity():
  adapter = heads.TextAdapter(16, rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 16)), jnp.float32)
  y = adapter(x)
  np.testing.assert_allclose(adapter.gamma[...], 1e-4)
  assert 0 < float(jnp.abs(y - x).max()) < 1e-3 * float(jnp.abs(x).max())


def _text_encoder_folder(root):
  _write_tiny_vocab(root / "tokenizer", "<|endoftext|>")
  tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
  torch.manual_seed(0)
  model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=12, bos_token_id=tokenizer.bos_token_id,
      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)).eval()
  model.save_pretrained(root / "text_encoder", safe_serialization=True)
  return tokenizer, model


def test_class_prompt_tokens_are_pooled_embeddings_computed_once(tmp_path):
  tokenizer, reference = _text_encoder_folder(tmp_path / "sd")
  config = vpd_seg.get_config()
  config.model.text_encoder = str(tmp_path / "sd")
  config.model.unet["cross_attention_dim"] = 32
  exp = experiment.Experiment(config)
  model = exp.model(exp.state.params)
  task = exp.tasks[0]
  names = [c["name"] for c in task.categories]
  prompts = [backbone.CLASS_PROMPT.format(n) for n in names]
  with torch.no_grad():
    ids = tokenizer(prompts, padding="max_length", truncation=True, max_length=12,
                    return_tensors="pt")["input_ids"]
    pooled = reference(ids).pooler_output.numpy()
  tokens = np.asarray(model.vpd.tokens[...])
  assert tokens.shape == (1, len(names), 32)
  np.testing.assert_allclose(tokens[0], pooled, atol=1e-5)
  # Cached in the model's frozen state: not a trained parameter, no text encoder in the model.
  trained = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
      exp.state.params)}
  assert not any("tokens" in k for k in trained)
  assert any("adapter" in k for k in trained) and any("heads" in k for k in trained)


@pytest.mark.parametrize("kind,task", [
    ("classes", tasks.get("semantic", num_classes=7)),
    ("depth", tasks.get("depth", max_depth=8.0)),
    ("normals", tasks.get("normals")),
    ("rgb", tasks.get("albedo"))])
def test_head_answers_are_exact_task_encodings(kind, task):
  rng = np.random.default_rng(1)
  out = jnp.asarray(rng.normal(size=(2, 6, 5, backbone.HEAD_KINDS.get(kind).channels(task))),
                    jnp.float32)
  rgb = np.asarray(backbone.HEAD_KINDS.get(kind).to_rgb(task, out))
  answer = task.decode(rgb)
  if kind == "classes":
    np.testing.assert_array_equal(answer, np.argmax(np.asarray(out), axis=-1))
    np.testing.assert_array_equal(np.asarray(backbone.class_of_rgb(task, jnp.asarray(rgb))),
                                  answer)
  if kind == "depth":
    np.testing.assert_allclose(answer, 8.0 * np.asarray(jax.nn.sigmoid(out[..., 0])), atol=1e-5)
  if kind == "normals":
    np.testing.assert_allclose(np.linalg.norm(answer, axis=-1), 1.0, atol=1e-5)
  # The head loss on its own encoded answer is (near) its minimum.
  valid = jnp.ones(out.shape[:3] + (1,), bool)
  if kind in ("normals", "rgb"):
    loss = backbone.HEAD_KINDS.get(kind).loss(task, out, jnp.asarray(rgb), valid)
    assert float(jnp.max(loss)) < 2e-3


def test_attention_maps_attach_to_every_scale():
  feats = [jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 8, 8, 4))]
  maps = {"a.attn2": jnp.full((2, 3, 16, 5), 0.2), "b.attn2": jnp.full((2, 3, 64, 5), 0.4)}
  out = backbone.attach_attention_maps(feats, maps)
  assert [o.shape for o in out] == [(2, 4, 4, 13), (2, 8, 8, 9)]
  np.testing.assert_allclose(out[0][..., 8:], 0.3, atol=1e-6)  # the two resolutions averaged


def test_depth_config_builds_with_a_depth_head():
  exp = experiment.Experiment(vpd_depth.get_config())
  model = exp.model(exp.state.params)
  assert isinstance(exp.paradigm, backbone.VPD)
  assert model.unet.config["in_channels"] == 3  # the image alone
  assert len(model.vpd.heads) == 1 and model.vpd.heads[0].out.out_channels == 1


def test_deconv_matches_torch_conv_transpose():
  deconv = heads.Deconv2x(5, 3, rngs=nnx.Rngs(0))
  deconv.bias[...] = jnp.asarray([0.1, -0.2, 0.3])
  x = np.random.default_rng(1).normal(size=(2, 4, 6, 5)).astype(np.float32)
  ref = torch.nn.ConvTranspose2d(5, 3, kernel_size=2, stride=2)
  with torch.no_grad():
    ref.weight.copy_(torch.from_numpy(np.asarray(deconv.kernel[...]).transpose(2, 3, 0, 1)))
    ref.bias.copy_(torch.from_numpy(np.asarray(deconv.bias[...])))
    expected = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(deconv(jnp.asarray(x))), expected, atol=1e-5)


@pytest.mark.parametrize("upsampling", ["bilinear", "deconv"])
def test_head_upsamples_latent_features_to_the_image(upsampling):
  head = heads.DenseHead([12, 8], 4, upsample=8, width=16, upsampling=upsampling,
                         rngs=nnx.Rngs(0))
  out = head([jnp.ones((2, 2, 3, 12)), jnp.ones((2, 4, 6, 8))])
  assert out.shape == (2, 32, 48, 4)
  assert len(head.up_convs) == 3
  kernel = head.up_convs[0].kernel
  assert kernel[...].shape[:2] == ((2, 2) if upsampling == "deconv" else (3, 3))
  params = jax.tree.leaves(nnx.state(head, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Param))
  for param in params:  # logical axis names on every parameter, one per dimension.
    assert len(param.out_sharding) == param[...].ndim, param


def test_head_settings_are_checked():
  config = vpd_depth.get_config()
  config.model.head = dict(width=16, upsample="deconv")  # a typo of upsampling
  with pytest.raises(errors.ConfigError, match="upsampling"):
    experiment.Experiment(config, abstract=True)
  config.model.head = dict(width=16, upsampling="nearest")
  with pytest.raises(errors.ConfigError, match="bilinear, deconv"):
    experiment.Experiment(config, abstract=True)


def test_frozen_unet_trains_the_heads_and_adapter_alone():
  config = vpd_depth.get_config()
  config.model.frozen = ["unet"]
  exp = experiment.Experiment(config, abstract=True)
  top = lambda tree: {jax.tree_util.keystr(path[:1])
                       for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert "['unet']" not in top(exp.state.params) and "['unet']" in top(exp.frozen)
  assert "['vpd']" in top(exp.state.params)
  config.model.frozen = ["unets"]
  with pytest.raises(errors.ConfigError, match="'unets' matches no parameter; modules .*unet"):
    experiment.Experiment(config, abstract=True)
