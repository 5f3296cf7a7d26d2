"""Parity of our CLIP text encoder with transformers' CLIPTextModel (tiny random configs)."""
import json

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


# ---------------------------------------------------------------------------------------------
# Tokenizer: our ids equal transformers' CLIPTokenizer ids on a tiny byte-level BPE vocabulary.

PROMPTS = ["Perform depth estimation", "perform   SEMANTIC segmentation!",
           "a very long prompt that will surely be truncated here ok", "don't 42x", ""]


def _write_tiny_vocab(folder, pad_token):
  from tokenizers import pre_tokenizers
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
  merges = [("p", "e"), ("pe", "r"), ("f", "o"), ("fo", "r"), ("for", "m</w>"), ("d", "e"),
            ("de", "p"), ("dep", "t"), ("dept", "h</w>"), ("e", "s"), ("t", "i"), ("ti", "m")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  folder.mkdir(parents=True)
  (folder / "vocab.json").write_text(json.dumps(vocab))
  (folder / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
  (folder / "tokenizer_config.json").write_text(json.dumps({
      "model_max_length": 12, "pad_token": pad_token, "bos_token": "<|startoftext|>",
      "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
      "tokenizer_class": "CLIPTokenizer"}))


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"])  # SD 1.x / SD 2.x padding
def test_tokenizer_matches_transformers(tmp_path, pad_token):
  from dense_diffusion.models import tokenizer as tokenizer_lib
  _write_tiny_vocab(tmp_path / "pipe" / "tokenizer", pad_token)
  ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "pipe" / "tokenizer")
  want = np.asarray(ref(PROMPTS, padding="max_length", truncation=True, max_length=12)[
      "input_ids"])
  ours = tokenizer_lib.CLIPTokenizer.from_folder(tmp_path / "pipe")  # vocab.json + merges.txt
  got = ours(PROMPTS)
  assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 12)
  np.testing.assert_array_equal(got, want)
  assert ours.pad_id == ref.pad_token_id
  # Merges were applied: "perform" -> "per" + "form</w>".
  assert list(got[0, 1:3]) == [ours.tokenizer.token_to_id("per"),
                               ours.tokenizer.token_to_id("form</w>")]
  # The same from the tokenizer.json that transformers writes.
  ref.save_pretrained(tmp_path / "saved")
  assert (tmp_path / "saved" / "tokenizer.json").is_file()
  np.testing.assert_array_equal(tokenizer_lib.CLIPTokenizer.from_folder(tmp_path / "saved")(
      PROMPTS), want)


LOGICAL_AXES = {"conv_height", "conv_width", "conv_in", "conv_out", "embed", "mlp", "heads",
                "context", "norm", "vocab", "position"}


def assert_logical_axes(module):
  """Every parameter names one logical axis (docs/sharding.md vocabulary) per dimension."""
  from flax import nnx
  flat = list(nnx.to_flat_state(nnx.state(module, nnx.Param)))
  assert flat
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None, path
    assert len(names) == len(var.get_value().shape), (path, names)
    assert set(names) <= LOGICAL_AXES, (path, names)


def test_every_parameter_has_logical_axes():
  from flax import nnx
  cfg = te.CLIPTextConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=8)
  model = nnx.eval_shape(lambda: te.TextEncoder(cfg, rngs=nnx.Rngs(0)))
  assert_logical_axes(model)
  assert model.embeddings.token_embedding.embedding.get_metadata()["out_sharding"] == (
      "vocab", "embed")


def stand_ins(torch_model, prefix=""):
  """Zero-stride numpy stand-ins (no memory) with the shapes of a meta-device state dict."""
  return {prefix + k: np.broadcast_to(np.zeros((), np.float32), tuple(v.shape))
          for k, v in torch_model.state_dict().items()}


def param_count(module):
  from flax import nnx
  return sum(int(np.prod(v.get_value().shape))
             for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name", ["sd1_vit_l14", "sd2_openclip_h14"])
def test_full_size_key_sets_map_one_to_one(name):
  # The real SD text encoders' configurations (SD 2.x: OpenCLIP ViT-H with the last of its 24
  # layers already removed), built on torch's meta device: keys and shapes only.
  kw = dict(vocab_size=49408, max_position_embeddings=77)
  if name == "sd1_vit_l14":  # legacy eos_token_id=2 and "text_model." keys, as SD 1.x files
    cfg = transformers.CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12,
                                      hidden_act="quick_gelu", eos_token_id=2, **kw)
    prefix = "text_model."
  else:
    cfg = transformers.CLIPTextConfig(hidden_size=1024, intermediate_size=4096,
                                      num_hidden_layers=23, num_attention_heads=16,
                                      hidden_act="gelu", **kw)
    prefix = ""
  with torch.device("meta"):
    ref = transformers.CLIPTextModel(cfg)
  tensors = stand_ins(ref, prefix)
  if prefix:
    tensors["text_model.embeddings.position_ids"] = np.arange(77)[None]
  ours = clip_convert.clip_text_from_tensors(cfg.to_dict(), tensors, dry_run=True)
  assert param_count(ours) == sum(p.numel() for p in ref.parameters())
  tensors.pop(f"{prefix}final_layer_norm.weight")
  with pytest.raises(common.CheckpointMismatchError, match="final_layer_norm.scale"):
    clip_convert.clip_text_from_tensors(cfg.to_dict(), tensors, dry_run=True)


def test_embed_prompts_matches_transformers_end_to_end(tmp_path):
  # Tokenizer + text encoder together against transformers' CLIPTokenizer + CLIPTextModel.
  from dense_diffusion.models import tokenizer as tokenizer_lib
  _write_tiny_vocab(tmp_path / "tokenizer", "<|endoftext|>")
  ref_tok = transformers.CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
  cfg = transformers.CLIPTextConfig(
      vocab_size=len(ref_tok), hidden_size=16, intermediate_size=24, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=12, hidden_act="quick_gelu",
      bos_token_id=ref_tok.bos_token_id, eos_token_id=ref_tok.eos_token_id,
      pad_token_id=ref_tok.pad_token_id)
  ref = transformers.CLIPTextModel(cfg).eval()
  randomise(ref, 5)
  ref.save_pretrained(tmp_path / "text_encoder")
  batch = ref_tok(PROMPTS, padding="max_length", max_length=12, truncation=True,
                  return_tensors="pt")
  with torch.no_grad():  # ids only, no attention mask: what the SD 1.x / 2.x pipelines do
    want = ref(input_ids=batch["input_ids"]).last_hidden_state.numpy()
  ours = te.embed_prompts(clip_convert.load_transformers_clip_text(tmp_path),
                          tokenizer_lib.CLIPTokenizer.from_folder(tmp_path), PROMPTS,
                          batch_size=3)
  assert ours.shape == (len(PROMPTS), 12, 16)
  np.testing.assert_allclose(np.asarray(ours), want, atol=1e-4, rtol=0)
  # With transformers' padding mask.
  with torch.no_grad():
    want_masked = ref(**batch).last_hidden_state.numpy()
  model = clip_convert.load_transformers_clip_text(tmp_path)
  got, _ = model.encode(jnp.asarray(batch["input_ids"].numpy(), jnp.int32),
                        attention_mask=jnp.asarray(batch["attention_mask"].numpy()))
  np.testing.assert_allclose(np.asarray(got), want_masked, atol=1e-4, rtol=0)
  assert np.abs(want_masked - want).max() > 1e-3  # the mask matters on padding positions
