"""Parity of our CLIP text encoder with transformers' CLIPTextModel (tiny random configs)."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from dense_diffusion.convert import clip as clip_convert
from dense_diffusion.convert import common
from dense_diffusion.models import text_encoder as te

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 64
LENGTH = 12


def randomise(model, seed):
  """Every parameter (norm scales and biases included) gets random values."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") or (
          "layer_norm" in name and name.endswith("weight")) else 0.0
      p.copy_(base + 0.3 * torch.randn(p.shape, generator=gen))


def _tiny(act, eos_token_id=VOCAB - 1):
  cfg = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=LENGTH, hidden_act=act,
      bos_token_id=VOCAB - 2, eos_token_id=eos_token_id, pad_token_id=0, layer_norm_eps=1e-5)
  m = transformers.CLIPTextModel(cfg).eval()
  randomise(m, seed=1 if act == "gelu" else 2)
  return m


def _ids():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, VOCAB - 2, size=(3, LENGTH))
  ids[:, 0] = VOCAB - 2
  for row, end in enumerate([5, 11, 8]):
    ids[row, end] = VOCAB - 1
    ids[row, end + 1:] = 0
  return ids


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def pair(request, tmp_path_factory):
  ref = _tiny(request.param)
  path = tmp_path_factory.mktemp(f"clip_text_{request.param}")
  ref.save_pretrained(path)
  ours = clip_convert.load_transformers_clip_text(path)
  return ref, ours, path


def test_last_hidden_state_and_pooled_match(pair):
  ref, ours, _ = pair
  ids = _ids()
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids), output_hidden_states=True)
  hidden, pooled = ours.encode(jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-4,
                             rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=0)
  assert ours.config.hidden_act == ref.config.hidden_act


def test_penultimate_layer_matches_diffusers_clip_skip(pair):
  ref, ours, _ = pair
  ids = _ids()
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    # diffusers encode_prompt(clip_skip=1): hidden_states[-2] then final_layer_norm.
    want = ref.final_layer_norm(out.hidden_states[-2]).numpy()
    raw = out.hidden_states[-2].numpy()
  got = jax.jit(lambda i: ours(i, skip_last_layers=1))(jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)
  got_raw, _ = ours.encode(jnp.asarray(ids, jnp.int32), skip_last_layers=1, final_norm=False)
  np.testing.assert_allclose(np.asarray(got_raw), raw, atol=1e-4, rtol=0)
  assert np.abs(np.asarray(got) - np.asarray(ours(jnp.asarray(ids, jnp.int32)))).max() > 1e-2
  with pytest.raises(ValueError, match="skip_last_layers"):
    ours(jnp.asarray(ids, jnp.int32), skip_last_layers=3)


def test_legacy_prefixed_checkpoint_with_buffer_and_argmax_pooling(tmp_path):
  # Pre-5.x checkpoints (e.g. SD pipelines' text_encoder/) prefix keys with "text_model." and may
  # hold the position_ids buffer; a legacy eos_token_id == 2 pools at argmax(ids).
  ref = _tiny("quick_gelu", eos_token_id=2)
  (tmp_path / "text_encoder").mkdir()
  ref.config.save_pretrained(tmp_path / "text_encoder")
  sd = {f"text_model.{k}": v.contiguous() for k, v in ref.state_dict().items()}
  sd["text_model.embeddings.position_ids"] = torch.arange(LENGTH)[None]
  safetensors_torch.save_file(sd, tmp_path / "text_encoder" / "model.safetensors")
  ours = clip_convert.load_transformers_clip_text(tmp_path)  # pipeline folder
  ids = _ids()
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids))
  hidden, pooled = ours.encode(jnp.asarray(ids, jnp.int32))
  np.testing.assert_allclose(np.asarray(hidden), out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(pooled), out.pooler_output.numpy(), atol=1e-4, rtol=0)


def test_missing_and_unused_keys_are_named(pair, tmp_path):
  ref, _, path = pair
  tensors = common.load_weights(path, "model.safetensors")
  tensors.pop("encoder.layers.1.mlp.fc2.bias")
  tensors["encoder.layers.7.mlp.fc2.bias"] = np.zeros(32, np.float32)
  safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in tensors.items()},
                              tmp_path / "model.safetensors")
  ref.config.save_pretrained(tmp_path)
  with pytest.raises(common.CheckpointMismatchError) as info:
    clip_convert.load_transformers_clip_text(tmp_path)
  assert info.value.missing == ["encoder.layers.1.mlp.fc2.bias"]
  assert info.value.unused == ["encoder.layers.7.mlp.fc2.bias"]


def test_unsupported_activation_is_named():
  with pytest.raises(ValueError, match="hidden_act"):
    te.CLIPTextConfig(hidden_act="relu6")
