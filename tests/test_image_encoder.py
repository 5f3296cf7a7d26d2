"""Parity of our CLIP vision tower with transformers' CLIPVisionModel; image encoder behaviour."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from dense_diffusion.convert import clip as clip_convert
from dense_diffusion.convert import common
from dense_diffusion.models import image_encoder as ie

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZE = 16


def randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if ("norm" in name or "layrnorm" in name) and name.endswith("weight") else 0.0
      p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))


def _config(**kw):
  return transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
      image_size=SIZE, patch_size=4, projection_dim=8, hidden_act="quick_gelu", **kw)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  ref = transformers.CLIPVisionModel(_config()).eval()
  randomise(ref, 3)
  path = tmp_path_factory.mktemp("clip_vision")
  ref.save_pretrained(path)
  return ref, path


def _pixels():
  return np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)


def test_hidden_states_and_pooled_match(pair):
  ref, path = pair
  ours = clip_convert.load_transformers_clip_vision(path)
  x = _pixels()
  with torch.no_grad():
    out = ref(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True)
  h = ours.vision_model(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(h), out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(ours.vision_model.pooled(h)), out.pooler_output.numpy(),
                             atol=1e-4, rtol=0)
  h2 = ours.vision_model(jnp.asarray(x), layer=-2)
  np.testing.assert_allclose(np.asarray(h2), out.hidden_states[-2].numpy(), atol=1e-4, rtol=0)


def test_token_choices_and_projection(pair):
  ref, path = pair
  x = _pixels()
  with torch.no_grad():
    out = ref(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2), output_hidden_states=True)
    penult = out.hidden_states[-2].numpy()
    normed = ref.post_layernorm(out.last_hidden_state).numpy()
  patch = clip_convert.load_transformers_clip_vision(path, layer=-2, tokens="patch")
  np.testing.assert_allclose(np.asarray(patch.features(jnp.asarray(x))), penult[:, 1:],
                             atol=1e-4, rtol=0)
  cls = clip_convert.load_transformers_clip_vision(path, tokens="cls", post_layernorm=True,
                                                   context_dim=20)
  assert cls.num_tokens == 1
  feats = cls.features(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(feats), normed[:, :1], atol=1e-4, rtol=0)
  # The projection is a plain Dense on top of the features.
  k, b = cls.proj.kernel[...], cls.proj.bias[...]
  img = jnp.zeros((2, SIZE, SIZE, 3))
  np.testing.assert_allclose(np.asarray(cls(img)),
                             np.asarray(cls.features(cls.preprocess(img)) @ k + b), atol=1e-5)
  assert cls(img).shape == (2, 1, 20)


def test_with_projection_checkpoint(tmp_path):
  ref = transformers.CLIPVisionModelWithProjection(_config()).eval()
  randomise(ref, 4)
  ref.save_pretrained(tmp_path)
  ours = clip_convert.load_transformers_clip_vision(tmp_path)
  x = _pixels()
  with torch.no_grad():
    out = ref(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2))
  h = ours.vision_model(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(h), out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  emb = ours.vision_model.visual_projection(ours.vision_model.pooled(h))
  np.testing.assert_allclose(np.asarray(emb), out.image_embeds.numpy(), atol=1e-4, rtol=0)


def test_preprocess_normalises_and_resizes():
  cfg = ie.CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, image_size=8, patch_size=4)
  enc = ie.ImageEncoder(cfg, context_dim=12, rngs=nnx.Rngs(0))
  img = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(2, 8, 8, 3)), jnp.float32)
  want = ((np.asarray(img) + 1) / 2 - np.array(ie.CLIP_MEAN)) / np.array(ie.CLIP_STD)
  np.testing.assert_allclose(np.asarray(enc.preprocess(img)), want, atol=1e-5)
  # A constant image stays constant after resizing from any size.
  big = jnp.full((1, 20, 13, 3), 0.25)
  pre = np.asarray(enc.preprocess(big))
  assert pre.shape == (1, 8, 8, 3)
  np.testing.assert_allclose(pre, np.broadcast_to(
      (0.625 - np.array(ie.CLIP_MEAN)) / np.array(ie.CLIP_STD), pre.shape), atol=1e-5)
  assert enc(img).shape == (2, 5, 12)
  with pytest.raises(ValueError, match="tokens"):
    ie.ImageEncoder(cfg, tokens="avg", rngs=nnx.Rngs(0))


def test_frozen_tower_gets_no_gradient_and_is_left_out_of_the_optimizer():
  cfg = ie.CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, image_size=8, patch_size=4)
  img = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, size=(1, 8, 8, 3)), jnp.float32)
  for trainable in (False, True):
    enc = ie.ImageEncoder(cfg, context_dim=6, trainable=trainable, rngs=nnx.Rngs(0))
    grads = nnx.grad(lambda m: jnp.sum(m(img) ** 2))(enc)
    tower = np.abs(np.asarray(grads["vision_model"]["pre_layrnorm"]["scale"][...])).sum()
    assert (tower > 0) == trainable
    assert np.abs(np.asarray(grads["proj"]["kernel"][...])).sum() > 0
    wrt = nnx.state(enc, enc.optimizer_filter())
    assert ("vision_model" in wrt) == trainable and "proj" in wrt


def test_missing_and_unused_keys_are_named(pair, tmp_path):
  ref, path = pair
  safetensors_torch = pytest.importorskip("safetensors.torch")
  tensors = common.load_weights(path, "model.safetensors")
  tensors.pop("embeddings.class_embedding")
  tensors["embeddings.cls_token"] = np.zeros(32, np.float32)
  safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in tensors.items()},
                              tmp_path / "model.safetensors")
  ref.config.save_pretrained(tmp_path)
  with pytest.raises(common.CheckpointMismatchError) as info:
    clip_convert.load_transformers_clip_vision(tmp_path)
  assert info.value.missing == ["embeddings.class_embedding"]
  assert info.value.unused == ["embeddings.cls_token"]


def test_every_parameter_has_logical_axes():
  from test_text_encoder import assert_logical_axes
  cfg = ie.CLIPVisionConfig(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, image_size=8, patch_size=4, projection_dim=4)
  model = nnx.eval_shape(lambda: ie.ImageEncoder(cfg, context_dim=12, rngs=nnx.Rngs(0)))
  assert_logical_axes(model)
  assert model.proj.kernel.get_metadata()["out_sharding"] == ("embed", "context")


def test_full_size_vit_h14_key_set_maps_one_to_one():
  # The IP-Adapter / SD image-variation image encoder (OpenCLIP ViT-H/14 with projection), on
  # torch's meta device: keys and shapes only.
  from test_text_encoder import param_count, stand_ins
  cfg = transformers.CLIPVisionConfig(hidden_size=1280, intermediate_size=5120,
                                      num_hidden_layers=32, num_attention_heads=16,
                                      image_size=224, patch_size=14, projection_dim=1024,
                                      hidden_act="gelu")
  with torch.device("meta"):
    ref = transformers.CLIPVisionModelWithProjection(cfg)
  ours = clip_convert.clip_vision_from_tensors(cfg.to_dict(), stand_ins(ref), dry_run=True)
  assert param_count(ours.vision_model) == sum(p.numel() for p in ref.parameters())
  assert ours.num_tokens == 257
