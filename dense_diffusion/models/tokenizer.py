"""CLIP tokenizer for the fixed task prompts, on the `tokenizers` library (no hand-written BPE).

`CLIPTokenizer.from_folder(path)` reads a pipeline's `tokenizer/` folder (or the folder itself):
`tokenizer.json` when present, else `vocab.json` + `merges.txt`, for which it builds the same
pipeline as transformers 5.x `CLIPTokenizer` (NFC, whitespace runs -> one space, lowercase; CLIP's
split regex; byte-level BPE with the `</w>` end-of-word suffix). Special tokens and the maximum
length come from `tokenizer_config.json` / `special_tokens_map.json`: SD 1.x pads with
`<|endoftext|>`, SD 2.x with `!` (id 0).

Ids are `[bos] + tokens[:max_length - 2] + [eos]`, padded with the pad id to `max_length` (77),
exactly `CLIPTokenizer(text, padding="max_length", truncation=True, max_length=77)`.
"""
from __future__ import annotations

import json
import pathlib
from typing import Optional, Sequence, Union

import numpy as np
import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers

# transformers' CLIPTokenizer pre-tokenisation regex.
CLIP_SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|"""
                      r"""[\p{N}]|[^\s\p{L}\p{N}]+""")
DEFAULT_BOS = "<|startoftext|>"
DEFAULT_EOS = "<|endoftext|>"
# tokenizer_config.json's "no limit" sentinel (transformers' VERY_LARGE_INTEGER) and above.
_NO_LIMIT = int(1e29)


def _token(value) -> Optional[str]:
  """A special token given as a string or as an AddedToken dict {"content": ...}."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and "content" in value:
    return value["content"]
  raise ValueError(f"cannot read special token {value!r}")


def build_clip_bpe(vocab: dict, merges: Sequence[tuple[str, str]], unk_token: str
                   ) -> tokenizers.Tokenizer:
  """The tokenizers pipeline of transformers 5.x `CLIPTokenizer` for a vocab and merges."""
  tok = tokenizers.Tokenizer(models.BPE(
      vocab=vocab, merges=list(merges), dropout=None, continuing_subword_prefix="",
      end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk_token))
  tok.normalizer = normalizers.Sequence(
      [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False),
  ])
  tok.decoder = decoders.ByteLevel()
  return tok


def read_merges(path: Union[str, pathlib.Path]) -> list[tuple[str, str]]:
  """merges.txt -> [(left, right)], skipping the `#version` header and blank lines."""
  out = []
  for line in pathlib.Path(path).read_text(encoding="utf-8").splitlines():
    if not line.strip() or line.startswith("#version"):
      continue
    parts = line.split(" ")
    if len(parts) != 2:
      raise ValueError(f"{path}: bad merge line {line!r}")
    out.append((parts[0], parts[1]))
  return out


class CLIPTokenizer:
  """Text -> fixed-length int32 ids for the CLIP text encoder."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_token: str = DEFAULT_BOS,
               eos_token: str = DEFAULT_EOS, pad_token: Optional[str] = None,
               max_length: int = 77):
    pad_token = eos_token if pad_token is None else pad_token
    # A saved tokenizer.json may carry padding/truncation settings: we pad and truncate here.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    self.tokenizer = tokenizer
    self.max_length = max_length
    ids = {}
    for name, tok in (("bos_token", bos_token), ("eos_token", eos_token),
                      ("pad_token", pad_token)):
      i = tokenizer.token_to_id(tok)
      if i is None:
        raise ValueError(f"{name} {tok!r} is not in the vocabulary")
      ids[name] = i
    self.bos_id, self.eos_id, self.pad_id = ids["bos_token"], ids["eos_token"], ids["pad_token"]
    if max_length < 2:
      raise ValueError(f"max_length={max_length} leaves no room for bos/eos")

  @classmethod
  def from_folder(cls, path, *, subfolder: str = "tokenizer",
                  max_length: Optional[int] = None) -> "CLIPTokenizer":
    """Reads a tokenizer folder (or `path/subfolder` of a pipeline)."""
    path = pathlib.Path(path)
    names = ("tokenizer.json", "vocab.json")
    if not any((path / n).is_file() for n in names) and (path / subfolder).is_dir():
      path = path / subfolder
    cfg = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
      if (path / name).is_file():
        cfg.update(json.loads((path / name).read_text(encoding="utf-8")))
    unk = _token(cfg.get("unk_token")) or DEFAULT_EOS
    if (path / "tokenizer.json").is_file():
      tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
      vocab = json.loads((path / "vocab.json").read_text(encoding="utf-8"))
      tok = build_clip_bpe(vocab, read_merges(path / "merges.txt"), unk)
    else:
      raise FileNotFoundError(f"no tokenizer.json or vocab.json + merges.txt in {path}")
    if max_length is None:
      max_length = cfg.get("model_max_length")
      if max_length is None or max_length >= _NO_LIMIT:
        raise ValueError(f"{path} gives no model_max_length; pass max_length (77 for SD)")
    return cls(tok, bos_token=_token(cfg.get("bos_token")) or DEFAULT_BOS,
               eos_token=_token(cfg.get("eos_token")) or DEFAULT_EOS,
               pad_token=_token(cfg.get("pad_token")), max_length=int(max_length))

  def __call__(self, texts: Union[str, Sequence[str]]) -> np.ndarray:
    """A text or a list of texts -> int32 [B, max_length]."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), self.max_length), self.pad_id, np.int32)
    for row, enc in enumerate(self.tokenizer.encode_batch(list(texts),
                                                          add_special_tokens=False)):
      ids = [self.bos_id] + enc.ids[:self.max_length - 2] + [self.eos_id]
      out[row, :len(ids)] = ids
    return out
