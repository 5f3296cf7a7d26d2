"""diffusers / peft LoRA files <-> the LoRA adapters of our UNet (`models.lora`), no torch.

    convert.save_diffusers_lora(unet, "lora.safetensors")   # our adapters -> the file
    convert.load_diffusers_lora(unet, "lora.safetensors")   # the file -> adapters on our UNet
    plain = convert.fold_lora(unet)                         # adapters folded into the kernels

The format is the one of diffusers' `save_lora_weights` / `UNet2DConditionModel.load_lora_adapter(
path, prefix="unet")` / a pipeline's `load_lora_weights`: one safetensors file holding, for every
adapted Linear / Conv2d at module path P (our module paths are diffusers' paths),

    <prefix>.P.lora_A.weight   Linear [r, in]     Conv2d [r, in, kh, kw]  (the base conv's window)
    <prefix>.P.lora_B.weight   Linear [out, r]    Conv2d [out, r, 1, 1]

and, in the safetensors `__metadata__` under "lora_adapter_metadata", the peft `LoraConfig` as JSON
with prefixed keys ("unet.r", "unet.lora_alpha", "unet.rank_pattern", "unet.alpha_pattern",
"unet.target_modules", ...). The layer adds `B(A(x)) * alpha / r` (peft's `use_rslora`: alpha /
sqrt(r)); ours adds `x @ lora_down @ lora_up * lora_scale`, so lora_down = A^T, lora_up = B^T (conv:
the layouts of `common.conv_to_conv` / `common.conv1x1_to_dense`) and lora_scale = alpha / r.

A module's rank and alpha are the config's `r` / `lora_alpha` unless a key of `rank_pattern` /
`alpha_pattern` matches its path (peft's rule: `re.match(rf"(.*\\.)?({key})$", path)`, first key
wins). A file without that metadata takes alpha from `<prefix>.P.alpha` scalars (diffusers'
`network_alphas`) when it has them, else alpha = r (scale 1: the diffusers / peft default).

`save_diffusers_lora` writes every layer with alpha = r, its `lora_scale` multiplied into lora_B
(the update B(A(x)) * scale is unchanged): `UNet2DConditionModel.load_lora_adapter(path,
prefix="unet")` given a file path reads the file's metadata only with `use_safetensors=True` or a
`weight_name` and otherwise takes alpha = r, so only scale 1 means the same to every loader. The
metadata still names each rank (most common as `r`, the others as exact `rank_pattern` keys,
`^` + the escaped path). Loading such a file back gives `lora_scale` 1 and lora_up = scale * the
original: the same outputs (training on from it with AdamW, the update moves 1/scale times as far
per step as it did with the original parametrisation).
"""
from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import re
from typing import Any, Optional, Union

import jax
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx

from dense_diffusion import errors
from dense_diffusion.convert import common
from dense_diffusion.models import layers
from dense_diffusion.models import lora as lora_lib

PathLike = Union[str, os.PathLike]

DEFAULT_PREFIX = "unet"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY.
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name inside a LoRA folder.
_A, _B, _ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"
# diffusers' other spellings of the same pair, read as lora_A / lora_B (what its loaders accept):
# `.lora.down` / `.lora.up` (its training scripts' `convert_state_dict_to_diffusers`) and the
# attention-processor form `attn1.processor.to_q_lora.down`.
_SPELLINGS = common.regex_renamer((
    (r"\.processor\.", "."),
    (r"\.(to_q|to_k|to_v)_lora\.(down|up)\.weight$", r".\1.lora.\2.weight"),
    (r"\.to_out_lora\.(down|up)\.weight$", r".to_out.0.lora.\1.weight"),
    (r"\.lora\.down\.weight$", _A),
    (r"\.lora\.up\.weight$", _B),
))
# peft LoraConfig options that change the layer's computation beyond B(A(x)) * scale.
_UNSUPPORTED_OPTIONS = ("use_dora", "lora_bias", "alora_invocation_tokens", "layer_replication",
                        "target_parameters")
# peft's LoraConfig defaults, which apply when the metadata leaves `r` / `lora_alpha` out.
_PEFT_DEFAULT_R = 8
_PEFT_DEFAULT_ALPHA = 8


def _prefix(prefix: Optional[str]) -> str:
  return f"{prefix}." if prefix else ""


def _adapted(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  """(dotted module path, layer) of every Dense / Conv2d that carries an adapter."""
  return [(p, layer) for p, layer in lora_lib.lora_layers(model, "")
          if layer.lora_down is not None]


def _most_common(values) -> Any:
  return collections.Counter(values).most_common(1)[0][0]


def _exact(path: str) -> str:
  """A peft pattern key that matches exactly the module at `path`."""
  return "^" + re.escape(path)


def _pattern_value(patterns: dict, path: str, default: Any) -> Any:
  """peft's `get_pattern_key` rule: the value of the first key matching `path`, else default."""
  for key, value in patterns.items():
    if re.match(rf"(.*\.)?({key})$", path):
      return value
  return default


def lora_config(ranks: dict[str, int], alphas: dict[str, float]) -> dict[str, Any]:
  """The peft `LoraConfig` keyword arguments that give every module its rank and alpha.

  Args:
    ranks: {module path: rank}.
    alphas: {module path: alpha} (same keys).

  Returns:
    r / lora_alpha (the most common values), rank_pattern / alpha_pattern (exact keys for the
    other modules), target_modules (every path) and the plain-LoRA switches.
  """
  r, alpha = _most_common(ranks.values()), _most_common(alphas.values())
  return {
      "r": int(r),
      "lora_alpha": alpha,
      "rank_pattern": {_exact(p): int(v) for p, v in sorted(ranks.items()) if v != r},
      "alpha_pattern": {_exact(p): v for p, v in sorted(alphas.items()) if v != alpha},
      "target_modules": sorted(ranks),
      "use_rslora": False,
      "use_dora": False,
      "lora_bias": False,
  }


def lora_file(path: PathLike) -> pathlib.Path:
  """`path` itself, or `path/pytorch_lora_weights.safetensors` for a folder; MissingError."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / WEIGHT_NAME
  if not path.is_file():
    raise errors.MissingError(f"no LoRA file at {path}")
  return path


def save_diffusers_lora(unet: nnx.Module, path: PathLike, *, prefix: Optional[str] = DEFAULT_PREFIX,
                        dtype: Any = np.float32) -> pathlib.Path:
  """Writes the UNet's LoRA adapters as a diffusers / peft LoRA file (see module doc: every
  layer's `lora_scale` is multiplied into its lora_B, alpha = r).

  Args:
    unet: our UNet (or any module of `models.layers`) with adapters from `models.lora.apply_lora`
      (merged or not: the file holds the adapters themselves).
    path: the `.safetensors` file to write, or a folder (it then gets
      `pytorch_lora_weights.safetensors`, the name `load_lora_weights(folder)` looks for).
    prefix: the component name before every key and metadata key ("unet" for
      `load_lora_adapter(path, prefix="unet")` and pipelines; None for none, as
      `save_lora_adapter` writes and `load_lora_adapter(path, prefix=None)` reads).
    dtype: tensor dtype in the file (np.float32 or np.float16).

  Returns:
    The file written.

  Raises:
    ConfigError when the UNet carries no adapter.
  """
  adapted = _adapted(unet)
  if not adapted:
    raise errors.ConfigError(f"the {type(unet).__name__} has no LoRA adapters to export (attach "
                             "them with models.lora.apply_lora, or train with model.lora)")
  dtype = np.dtype(dtype)
  if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
    raise ValueError(f"LoRA file dtype must be float32 or float16, got {dtype}")
  pre = _prefix(prefix)
  tensors, ranks = {}, {}
  for name, layer in adapted:
    down = np.asarray(jax.device_get(layer.lora_down.get_value()), np.float32)
    up = np.asarray(jax.device_get(layer.lora_up.get_value()), np.float32)
    if isinstance(layer, layers.Conv2d):
      a = down.transpose(3, 2, 0, 1)  # [kh, kw, in, r] -> [r, in, kh, kw]
      b = up.T[:, :, None, None]  # [r, out] -> [out, r, 1, 1]
    else:
      a, b = down.T, up.T  # [in, r] -> [r, in]; [r, out] -> [out, r]
    tensors[pre + name + _A] = np.ascontiguousarray(a, dtype)
    # The scale goes into lora_B and alpha = r (module doc): one rounding, in float64.
    b = b.astype(np.float64) * float(layer.lora_scale)
    tensors[pre + name + _B] = np.ascontiguousarray(b, dtype)
    ranks[name] = down.shape[-1]
  config = {pre + k: v for k, v in lora_config(ranks, dict(ranks)).items()}
  path = pathlib.Path(path)
  if path.is_dir() or not path.suffix:
    path = path / WEIGHT_NAME
  path.parent.mkdir(parents=True, exist_ok=True)
  safetensors.numpy.save_file(tensors, str(path), metadata={
      "format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)})
  return path


def read_diffusers_lora(path: PathLike, *, prefix: Optional[str] = DEFAULT_PREFIX
                        ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
  """The adapters of a diffusers / peft LoRA file (as stored) and their scales.

  Args:
    path: the `.safetensors` file, or a folder holding `pytorch_lora_weights.safetensors`.
    prefix: the component whose keys to read ("unet"; None reads unprefixed keys).

  Returns:
    ({module path: {"A": lora_A, "B": lora_B} as stored (torch layout, float32)},
     {module path: scale}).

  Raises:
    MissingError for a missing file; ConfigError for a file that is not safetensors, holds no key
    under the prefix, or asks for a LoRA variant we do not compute (DoRA, LoRA biases, ...);
    CheckpointMismatchError listing keys that are not a LoRA pair.
  """
  file = lora_file(path)
  try:
    tensors = common.read_safetensors(file)
    with safetensors.safe_open(str(file), framework="numpy") as f:
      file_metadata = f.metadata() or {}
  except (ValueError, OSError) as e:
    raise errors.ConfigError(f"{file} is not a readable safetensors file: {e}") from None
  pre = _prefix(prefix)
  mine = {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
  if not mine:
    heads = sorted({k.split(".")[0] for k in tensors})
    raise errors.ConfigError(
        f"{file} has no LoRA tensors under the prefix {prefix!r} (diffusers / peft keys "
        f"'{pre}<module>.lora_A.weight'); its keys begin with {heads[:5]}"
        + (" (kohya-ss format: load it in diffusers and save it with save_lora_weights)"
           if any(k.startswith("lora_unet_") for k in tensors) else ""))
  adapters: dict[str, dict[str, np.ndarray]] = {}
  alpha_tensors: dict[str, float] = {}
  unused = []
  for original, value in mine.items():
    key = _SPELLINGS(original)
    if key.endswith(_A):
      adapters.setdefault(key[:-len(_A)], {})["A"] = value
    elif key.endswith(_B):
      adapters.setdefault(key[:-len(_B)], {})["B"] = value
    elif key.endswith(_ALPHA) and value.size == 1:
      alpha_tensors[key[:-len(_ALPHA)]] = float(value.reshape(()))
    else:
      unused.append(f"{pre}{original} (not a LoRA weight this reader knows: lora_A / lora_B / "
                    "alpha)")
  for module, pair in sorted(adapters.items()):
    if set(pair) != {"A", "B"}:
      have, lack = ("A", "B") if "A" in pair else ("B", "A")
      unused.append(f"{pre}{module}.lora_{have}.weight (no {pre}{module}.lora_{lack}.weight)")
  unused += [f"{pre}{m}.alpha (no lora_A / lora_B for it)" for m in alpha_tensors
             if m not in adapters]
  if unused:
    raise common.CheckpointMismatchError(unused=unused, what=f"LoRA file {file}")
  config = _metadata_config(file, file_metadata, pre)
  scales = {}
  for module, pair in adapters.items():
    scales[module] = _scale(file, module, int(pair["A"].shape[0]), config, alpha_tensors)
  return adapters, scales


def _metadata_config(file: pathlib.Path, file_metadata: dict, pre: str) -> Optional[dict]:
  """The file's peft LoraConfig for this prefix (None if it has none)."""
  raw = file_metadata.get(METADATA_KEY)
  if not raw:
    return None
  try:
    metadata = json.loads(raw)
  except json.JSONDecodeError as e:
    raise errors.ConfigError(f"{file}: its {METADATA_KEY} metadata is not JSON ({e})") from None
  config = {k[len(pre):]: v for k, v in metadata.items() if k.startswith(pre)}
  if not config:
    return None
  used = [k for k in _UNSUPPORTED_OPTIONS if config.get(k)]
  if used:
    raise errors.ConfigError(f"{file} is a LoRA variant not supported here ({', '.join(used)} "
                             "set in its LoraConfig): only plain LoRA (B(A(x)) * scale) loads")
  return config


def _scale(file, module: str, rank: int, config: Optional[dict],
           alpha_tensors: dict[str, float]) -> float:
  if config is not None:
    if alpha_tensors:
      raise errors.ConfigError(f"{file} gives alphas twice (LoraConfig metadata and .alpha "
                               "tensors); keep one")
    want = _pattern_value(config.get("rank_pattern") or {}, module,
                          config.get("r", _PEFT_DEFAULT_R))
    if int(want) != rank:
      raise errors.ConfigError(f"{file}: {module} has rank {rank} tensors but its LoraConfig "
                               f"says r={want}")
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module,
                           config.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)
  if alpha_tensors:
    if module not in alpha_tensors:
      raise errors.ConfigError(f"{file} has .alpha tensors but none for {module}")
    return alpha_tensors[module] / rank
  return 1.0


def _expected_shapes(layer: nnx.Module, rank: int) -> tuple[tuple, tuple]:
  """(lora_A, lora_B) shapes in the file's torch layout for a rank-`rank` adapter on `layer`."""
  shape = tuple(layer.kernel.get_value().shape)
  if isinstance(layer, layers.Conv2d):
    kh, kw, cin, cout = shape
    return (rank, cin, kh, kw), (cout, rank, 1, 1)
  cin, cout = shape
  return (rank, cin), (cout, rank)


def _put(value: np.ndarray, old: Any) -> jax.Array:
  """`value` as a jax array with the dtype and sharding of `old`."""
  value = np.asarray(value, dtype=old.dtype)
  sharding = getattr(old, "sharding", None)
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.device_put(value, sharding)
  return jax.numpy.asarray(value)


def load_diffusers_lora(unet: nnx.Module, path: PathLike, *,
                        prefix: Optional[str] = DEFAULT_PREFIX,
                        rank: Optional[int] = None) -> list[str]:
  """Puts the adapters of a diffusers / peft LoRA file on our UNet, in place.

  A UNet without adapters gets them (`models.lora.apply_lora`) on exactly the layers the file
  names; a UNet that has adapters must have them on exactly those layers, with the file's ranks,
  and they are overwritten. Each layer's `lora_scale` comes from the file (module doc).

  Args:
    unet: our UNet (built from the same diffusers config as the UNet the LoRA was made for).
    path: the `.safetensors` file, or a folder holding `pytorch_lora_weights.safetensors`.
    prefix: the component whose keys to read ("unet"; None for unprefixed keys, as written by
      diffusers' `save_lora_adapter`).
    rank: if given, the rank every adapter of the file must have (None: the file's ranks).

  Returns:
    The dotted module paths of the adapted layers (sorted).

  Raises:
    MissingError / ConfigError (see `read_diffusers_lora`; also a rank other than `rank`, merged
    adapters); CheckpointMismatchError listing every key that names no Dense / Conv2d of the UNet,
    every shape that differs, and adapters of the UNet that the file does not fill.
  """
  adapters, scales = read_diffusers_lora(path, prefix=prefix)
  file = lora_file(path)
  pre = _prefix(prefix)
  if rank is not None:
    other = sorted(m for m, p in adapters.items() if p["A"].shape[0] != rank)
    if other:
      raise errors.ConfigError(f"{file}: {len(other)} adapter(s) do not have rank {rank}, e.g. "
                               f"{other[0]} (rank {adapters[other[0]]['A'].shape[0]})")
  targets = dict(lora_lib.lora_layers(unet, ""))
  existing = {p for p, layer in targets.items() if layer.lora_down is not None}
  merged = sorted(p for p in existing if targets[p].lora_merged)
  if merged:
    raise errors.ConfigError(f"{len(merged)} adapter(s) of the UNet are merged into its kernels "
                             f"(e.g. {merged[0]}): models.lora.unmerge_lora(unet) first")
  unused, mismatches = [], []
  for module, pair in sorted(adapters.items()):
    keys = (pre + module + _A, pre + module + _B)
    layer = targets.get(module)
    if layer is None:
      unused += [f"{k} (the UNet has no Dense / Conv2d {module})" for k in keys]
      continue
    if existing and module not in existing:
      unused += [f"{k} ({module} has no adapter, while the UNet has adapters elsewhere)"
                 for k in keys]
      continue
    r = int(pair["A"].shape[0])
    if module in existing:
      r = int(layer.lora_down.get_value().shape[-1])
    for key, got, want in zip(keys, (pair["A"], pair["B"]), _expected_shapes(layer, r)):
      if tuple(got.shape) != want:
        mismatches.append((key, module, tuple(got.shape), want))
  missing = [f"{p}.lora_down / lora_up (an adapter of the UNet)"
             for p in sorted(existing - set(adapters))]
  if unused or mismatches or missing:
    raise common.CheckpointMismatchError(unused, missing, mismatches, what=f"LoRA file {file}")
  if not existing:
    by_rank: dict[int, list[str]] = {}
    for module, pair in adapters.items():
      by_rank.setdefault(int(pair["A"].shape[0]), []).append(module)
    for r, modules in sorted(by_rank.items()):
      pattern = "^(" + "|".join(re.escape(m) for m in sorted(modules)) + ")$"
      lora_lib.apply_lora(unet, pattern, rank=r, rngs=nnx.Rngs(0))
  for module, pair in adapters.items():
    layer = targets[module]
    if isinstance(layer, layers.Conv2d):
      down, up = common.conv_to_conv(pair["A"]), common.conv1x1_to_dense(pair["B"])
    else:
      down, up = common.linear_to_dense(pair["A"]), common.linear_to_dense(pair["B"])
    layer.lora_down.set_value(_put(down, layer.lora_down.get_value()))
    layer.lora_up.set_value(_put(up, layer.lora_up.get_value()))
    layer.lora_scale = scales[module]
  return sorted(adapters)


def fold_lora(model: nnx.Module, *, copy: bool = True) -> nnx.Module:
  """A plain model: every adapter added into its base kernel (`models.lora.merge_lora`: kernel +=
  lora_scale * down @ up), then removed: it has the base model's parameters (paths and shapes)
  only, so it saves and restores as a plain model (`convert.command.save_params` /
  `restore_unet`).

  Args:
    model: a model with adapters (merged or not); a model without any is returned as is.
    copy: fold into a copy (`nnx.clone`) and leave `model` untouched; False folds in place.

  Returns:
    The folded model.
  """
  if copy:
    model = nnx.clone(model)
  lora_lib.merge_lora(model)
  for _, layer in _adapted(model):
    layer.lora_down = nnx.data(None)
    layer.lora_up = nnx.data(None)
    layer.lora_scale = 0.0
    layer.lora_merged = False
  return model
