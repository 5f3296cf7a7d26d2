"""Generic reading of PyTorch-format (safetensors) checkpoints into Flax NNX modules, no torch.

Three layers, each usable on its own:

1. Reading: `read_safetensors(file)` parses one `*.safetensors` file with numpy (+ `ml_dtypes` for
   bfloat16, which numpy and `safetensors.numpy` do not understand), `load_weights(folder,
   weights_name)` reads a single file or the sharded form (`<weights_name>.index.json` with a
   `weight_map`), `read_config(folder)` reads `config.json`, and `resolve_model_dir` finds the
   folder that holds the weights (the folder itself, or a pipeline's `unet/`, `vae/`,
   `text_encoder/`, ... sub-folder). Floating tensors come back as float32 numpy arrays by default.

2. Layout transforms, chosen explicitly by the caller (never guessed from ndim alone):
   `linear_to_dense` (torch Linear `weight[out, in]` -> `kernel[in, out]`), `conv_to_conv`
   (`weight[O, I, kh, kw]` -> `kernel[kh, kw, I, O]`), `conv1x1_to_dense` (a 1x1 Conv2d weight
   loaded into a Dense), `linear_to_conv1x1` (a Linear weight loaded into a 1x1 conv) and
   `identity`.

3. Strict assignment: `assign(module, tensors, key_map)` fills every parameter of an NNX module from
   a mapping `checkpoint key -> Target(path, transform)` and raises ONE `CheckpointMismatchError`
   that lists every checkpoint key left unused, every parameter left unfilled, and every shape
   mismatch (both shapes). A converter is therefore a small declarative table, or a rule function
   turned into a table by `map_keys(keys, rule)`.

   Because our modules mirror the diffusers / transformers attribute names, most rules are
   `torch_layer_rule(module)`: the checkpoint key `a.b.0.weight` names the sub-module at
   `module.a.b[0]`, and the *type of that sub-module* (looked up in a registry, by MRO) says which
   attribute and transform the torch parameter name maps to: `weight` of an `nnx.Linear` ->
   `kernel` through `linear_to_dense`, `weight` of an `nnx.Conv` -> `kernel` through
   `conv_to_conv`, `weight` of a LayerNorm/GroupNorm -> `scale`, `weight` of an `nnx.Embed` ->
   `embedding`; the same for `dense_diffusion.models.layers` (Dense, Conv2d, LayerNorm,
   GroupNorm, Embedding), registered here. Layer classes that do not derive from these register
   their own table with `register_layer_rule(cls, {...})`. A bare `nnx.Param` attribute with the
   same name as the torch tensor (e.g. CLIP's `class_embedding`) is copied as is.

4. `build_abstract(ctor)` builds a module for loading without computing random initial
   parameters (`nnx.eval_shape`); `assign` then fills the placeholders.

5. Folders written by `main convert` (`convert/command.py`: `<component>/params/`, an orbax
   checkpoint of the module's parameters in our layout, beside the source's `config.json`) are
   read by the same loaders: `read_checkpoint` returns their parameters as `OurParams`, whose
   `key_map()` maps each parameter path to itself, so `assign` checks them just as strictly.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from dense_diffusion.models import layers

PathLike = Union[str, os.PathLike]
Transform = Callable[[np.ndarray], np.ndarray]
ModulePath = tuple  # tuple of str attribute names and int list indices

CONFIG_NAME = "config.json"

# safetensors dtype tags -> numpy dtypes.
_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32),
    "U64": np.dtype(np.uint64),
    "BOOL": np.dtype(np.bool_),
}
_FLOAT_TAGS = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


# ----------------------------------------------------------------------------------------------
# Errors.


class CheckpointMismatchError(ValueError):
  """A checkpoint and a module do not match one to one.

  Attributes:
    unused: checkpoint keys that no parameter took.
    missing: module parameter paths (dotted) that no checkpoint key filled.
    shape_mismatches: (checkpoint key, parameter path, shape after transform, parameter shape).
  """

  def __init__(self, unused: Sequence[str] = (), missing: Sequence[str] = (),
               shape_mismatches: Sequence[tuple[str, str, tuple, tuple]] = (),
               duplicates: Sequence[tuple[str, str]] = (), what: str = "checkpoint"):
    self.unused = sorted(unused)
    self.missing = sorted(missing)
    self.shape_mismatches = list(shape_mismatches)
    self.duplicates = list(duplicates)
    lines = [f"{what} does not match the module:"]
    if self.unused:
      lines.append(f"  {len(self.unused)} checkpoint key(s) not used by any parameter:")
      lines += [f"    {k}" for k in self.unused]
    if self.missing:
      lines.append(f"  {len(self.missing)} module parameter(s) not filled by the checkpoint:")
      lines += [f"    {k}" for k in self.missing]
    if self.shape_mismatches:
      lines.append(f"  {len(self.shape_mismatches)} shape mismatch(es):")
      lines += [f"    {k} -> {p}: checkpoint {tuple(a)} (after transform) vs parameter {tuple(b)}"
                for k, p, a, b in self.shape_mismatches]
    if self.duplicates:
      lines.append(f"  {len(self.duplicates)} parameter(s) targeted by more than one key:")
      lines += [f"    {k} -> {p}" for k, p in self.duplicates]
    super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# Reading files.


def read_safetensors(path: PathLike, *, dtype: Optional[Any] = np.float32,
                     keys: Optional[Iterable[str]] = None) -> dict[str, np.ndarray]:
  """Reads one `.safetensors` file into numpy arrays (no torch, bfloat16 through ml_dtypes).

  Args:
    path: the file.
    dtype: floating tensors (f16, bf16, f32, f64, f8) are cast to this dtype; None keeps the stored
      dtype (bfloat16 then comes back as `ml_dtypes.bfloat16`). Integer/bool tensors are kept.
    keys: read only these keys (all if None); a key absent from the file raises KeyError.

  Returns:
    {name: array}, arrays own their memory (the file is not kept open).
  """
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    raw_len = f.read(8)
    if len(raw_len) != 8:
      raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
    header_len = int.from_bytes(raw_len, "little")
    try:
      header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path} is not a safetensors file (bad JSON header: {e})") from None
  header.pop("__metadata__", None)
  if keys is not None:
    keys = list(keys)
    absent = [k for k in keys if k not in header]
    if absent:
      raise KeyError(f"{path} has no tensor(s) {absent}")
  else:
    keys = list(header)
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + header_len)
  out = {}
  for name in keys:
    info = header[name]
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}; "
                       f"known: {sorted(_SAFETENSORS_DTYPES)}")
    stored = _SAFETENSORS_DTYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    arr = np.frombuffer(data[begin:end], dtype=stored).reshape(shape)
    if dtype is not None and info["dtype"] in _FLOAT_TAGS:
      arr = arr.astype(dtype)
    else:
      arr = np.array(arr)
    out[name] = arr
  del data
  return out


def _variant_name(weights_name: str, variant: Optional[str]) -> str:
  if not variant:
    return weights_name
  stem, ext = weights_name.rsplit(".", 1)
  return f"{stem}.{variant}.{ext}"


def resolve_model_dir(path: PathLike, weights_name: str, subfolder: Optional[str] = None,
                      *, variant: Optional[str] = None) -> pathlib.Path:
  """The folder that holds `weights_name` (single file or sharded index).

  Args:
    path: a model folder (from `save_pretrained`), a pipeline folder, or the weights file itself.
    weights_name: e.g. "diffusion_pytorch_model.safetensors" or "model.safetensors".
    subfolder: the pipeline sub-folder to try when `path` itself holds no weights ("unet", "vae",
      "text_encoder", ...).
    variant: diffusers-style variant ("fp16" -> "diffusion_pytorch_model.fp16.safetensors").

  Returns:
    The folder.

  Raises:
    FileNotFoundError naming every place that was looked at.
  """
  path = pathlib.Path(path)
  name = _variant_name(weights_name, variant)
  if path.is_file():
    return path.parent
  candidates = [path] + ([path / subfolder] if subfolder else [])
  for c in candidates:
    if (c / name).is_file() or (c / f"{name}.index.json").is_file():
      return c
  looked = [str(c / n) for c in candidates for n in (name, f"{name}.index.json")]
  raise FileNotFoundError(f"no weights found; looked for: {looked}")


def read_config(path: PathLike, subfolder: Optional[str] = None) -> dict:
  """Reads `config.json` from `path` (or `path/subfolder` when `path` has none)."""
  path = pathlib.Path(path)
  if path.is_file():
    path = path.parent
  candidates = [path] + ([path / subfolder] if subfolder else [])
  for c in candidates:
    if (c / CONFIG_NAME).is_file():
      with open(c / CONFIG_NAME, encoding="utf-8") as f:
        return json.load(f)
  raise FileNotFoundError(f"no {CONFIG_NAME} in {[str(c) for c in candidates]}")


def load_weights(path: PathLike, weights_name: str, subfolder: Optional[str] = None, *,
                 variant: Optional[str] = None,
                 dtype: Optional[Any] = np.float32) -> dict[str, np.ndarray]:
  """Reads all tensors of a model, from a single file or a sharded index.

  Args:
    path: folder (model or pipeline) or a `.safetensors` file.
    weights_name: file name of the single-file form; the sharded form is
      `<weights_name>.index.json` whose `weight_map` maps tensor names to shard files.
    subfolder: pipeline sub-folder tried when `path` holds no weights.
    variant: optional diffusers variant ("fp16").
    dtype: floating tensors are cast to this (None keeps the stored dtype).

  Returns:
    {tensor name: numpy array}.
  """
  p = pathlib.Path(path)
  if p.is_file():
    if p.name.endswith(".index.json"):
      return _load_sharded(p, dtype)
    return read_safetensors(p, dtype=dtype)
  folder = resolve_model_dir(p, weights_name, subfolder, variant=variant)
  name = _variant_name(weights_name, variant)
  if (folder / name).is_file():
    return read_safetensors(folder / name, dtype=dtype)
  return _load_sharded(folder / f"{name}.index.json", dtype)


def _load_sharded(index_file: pathlib.Path, dtype) -> dict[str, np.ndarray]:
  with open(index_file, encoding="utf-8") as f:
    index = json.load(f)
  if "weight_map" not in index:
    raise ValueError(f"{index_file} has no 'weight_map'")
  by_file: dict[str, list[str]] = {}
  for key, fname in index["weight_map"].items():
    by_file.setdefault(fname, []).append(key)
  out = {}
  for fname, keys in sorted(by_file.items()):
    shard = index_file.parent / fname
    if not shard.is_file():
      raise FileNotFoundError(f"{index_file} names shard {fname} which does not exist")
    out.update(read_safetensors(shard, dtype=dtype, keys=keys))
  return out


def load_model_files(path: PathLike, weights_name: str, subfolder: Optional[str] = None, *,
                     variant: Optional[str] = None,
                     dtype: Optional[Any] = np.float32) -> tuple[dict, dict[str, np.ndarray]]:
  """`(config, tensors)` of the model at `path` (config.json read next to the weights).

  `path` may also be a weights file of any name (`*.safetensors` or `*.index.json`); its folder
  must then hold the config.json.
  """
  if pathlib.Path(path).is_file():
    return read_config(pathlib.Path(path).parent), load_weights(path, weights_name, dtype=dtype)
  folder = resolve_model_dir(path, weights_name, subfolder, variant=variant)
  return read_config(folder), load_weights(folder, weights_name, variant=variant, dtype=dtype)


CONVERTED_PARAMS_DIR = "params"  # `main convert`'s orbax checkpoint, beside config.json.


class OurParams(dict):
  """{"a/b/0/kernel": array} in our modules' layout, from a `main convert` folder.

  Passed where torch-layout tensors go: `key_map()` maps every key to the parameter it names
  (identity transform), so `assign` fills and checks a module from it.
  """

  def key_map(self) -> dict[str, "Target"]:
    return {key: Target(parse_path(tuple(_path_part(p) for p in key.split("/"))))
            for key in self}

  def under(self, prefix: str) -> "OurParams":
    """The parameters below `prefix` ("vision_model"), with the prefix removed."""
    head = prefix.rstrip("/") + "/"
    return OurParams({k[len(head):]: v for k, v in self.items() if k.startswith(head)})


def _path_part(part: str):
  return int(part) if part.isdigit() else part


def converted_dir(path: PathLike, subfolder: Optional[str] = None) -> Optional[pathlib.Path]:
  """The `main convert` component folder at `path` (or `path/subfolder`), or None."""
  path = pathlib.Path(path)
  for c in [path] + ([path / subfolder] if subfolder else []):
    if (c / CONVERTED_PARAMS_DIR).is_dir() and (c / CONFIG_NAME).is_file():
      return c
  return None


def read_converted(folder: PathLike) -> tuple[dict, OurParams]:
  """(config, OurParams) of a component folder written by `main convert`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top (heavy, only here)
  folder = pathlib.Path(folder).absolute()
  tree = ocp.StandardCheckpointer().restore(folder / CONVERTED_PARAMS_DIR)
  flat = {}
  for keys, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)
    flat[name] = np.asarray(value)
  return read_config(folder), OurParams(flat)


def read_checkpoint(path: PathLike, weights_name: str, subfolder: Optional[str] = None, *,
                    variant: Optional[str] = None) -> tuple[dict, Mapping[str, np.ndarray]]:
  """`(config, tensors)` of a diffusers / transformers folder (torch layout, as
  `load_model_files`), or `(config, OurParams)` of a folder written by `main convert`."""
  converted = converted_dir(path, subfolder)
  if converted is not None:
    return read_converted(converted)
  return load_model_files(path, weights_name, subfolder, variant=variant)


def key_map_for(tensors: Mapping[str, np.ndarray], rule: Rule) -> dict[str, "Target"]:
  """`map_keys(tensors, rule)` for torch-layout tensors; each path to itself for OurParams."""
  if isinstance(tensors, OurParams):
    return tensors.key_map()
  return map_keys(tensors, rule)


# ----------------------------------------------------------------------------------------------
# Layout transforms (torch -> flax). Callers pick one explicitly per tensor.


def identity(x: np.ndarray) -> np.ndarray:
  """Unchanged (biases, norm scales, embeddings tables)."""
  return x


def linear_to_dense(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> Dense kernel [in, out]."""
  if w.ndim != 2:
    raise ValueError(f"linear_to_dense expects a 2-D [out, in] weight, got shape {w.shape}")
  return np.ascontiguousarray(w.T)


def conv_to_conv(w: np.ndarray) -> np.ndarray:
  """torch Conv2d weight [O, I, kh, kw] -> flax Conv kernel [kh, kw, I, O]."""
  if w.ndim != 4:
    raise ValueError(f"conv_to_conv expects a 4-D [O, I, kh, kw] weight, got shape {w.shape}")
  return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def conv1x1_to_dense(w: np.ndarray) -> np.ndarray:
  """torch 1x1 Conv2d weight [O, I, 1, 1] -> Dense kernel [I, O]."""
  if w.ndim != 4 or w.shape[2:] != (1, 1):
    raise ValueError(f"conv1x1_to_dense expects a [O, I, 1, 1] weight, got shape {w.shape}")
  return np.ascontiguousarray(w[:, :, 0, 0].T)


def linear_to_conv1x1(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [O, I] -> flax 1x1 Conv kernel [1, 1, I, O]."""
  if w.ndim != 2:
    raise ValueError(f"linear_to_conv1x1 expects a 2-D [out, in] weight, got shape {w.shape}")
  return np.ascontiguousarray(w.T[None, None])


# ----------------------------------------------------------------------------------------------
# Key mapping.


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a checkpoint tensor goes: the parameter path in the module and the layout transform."""
  path: ModulePath
  transform: Transform = identity


def parse_path(dotted: Union[str, Sequence]) -> ModulePath:
  """'down_blocks.0.resnets.1.conv1.kernel' -> ('down_blocks', 0, 'resnets', 1, 'conv1',
  'kernel')."""
  if not isinstance(dotted, str):
    return tuple(dotted)
  return tuple(int(s) if s.isdigit() else s for s in dotted.split("."))


def path_str(path: Sequence) -> str:
  """('a', 0, 'kernel') -> 'a.0.kernel'."""
  return ".".join(str(p) for p in path)


Rule = Callable[[str], Optional[Target]]


def map_keys(keys: Iterable[str], rule: Rule) -> dict[str, Target]:
  """Applies `rule` to every checkpoint key; keys for which it returns None stay unmapped.

  Unmapped keys are reported as unused by `assign`, unless listed in its `ignore`.
  """
  out = {}
  for k in keys:
    t = rule(k)
    if t is not None:
      out[k] = t
  return out


def regex_renamer(rules: Sequence[tuple[str, str]]) -> Callable[[str], str]:
  """A key renamer applying `re.sub(pattern, replacement, key)` for each rule in order."""
  compiled = [(re.compile(p), r) for p, r in rules]

  def rename(key: str) -> str:
    for p, r in compiled:
      key = p.sub(r, key)
    return key

  return rename


# Layer-type rules: torch parameter name -> (our attribute, transform), looked up by MRO.
_LAYER_RULES: dict[type, dict[str, tuple[str, Transform]]] = {}


def register_layer_rule(cls: type, table: Mapping[str, tuple[str, Transform]]) -> None:
  """Registers how the torch parameters of a layer type map onto `cls`'s attributes.

  Example: `register_layer_rule(MyConv, {"weight": ("kernel", conv_to_conv), "bias": ("bias",
  identity)})`. Sub-classes inherit the table of their nearest registered base class.
  """
  _LAYER_RULES[cls] = dict(table)


def layer_rule_for(cls: type) -> Optional[dict[str, tuple[str, Transform]]]:
  for base in cls.__mro__:
    if base in _LAYER_RULES:
      return _LAYER_RULES[base]
  return None


_BIAS = ("bias", identity)
register_layer_rule(nnx.Linear, {"weight": ("kernel", linear_to_dense), "bias": _BIAS})
register_layer_rule(nnx.Conv, {"weight": ("kernel", conv_to_conv), "bias": _BIAS})
register_layer_rule(nnx.LayerNorm, {"weight": ("scale", identity), "bias": _BIAS})
register_layer_rule(nnx.GroupNorm, {"weight": ("scale", identity), "bias": _BIAS})
register_layer_rule(nnx.RMSNorm, {"weight": ("scale", identity)})
register_layer_rule(nnx.Embed, {"weight": ("embedding", identity)})
# Our own building blocks (dense_diffusion/models/layers.py) hold torch-named layers.
register_layer_rule(layers.Dense, {"weight": ("kernel", linear_to_dense), "bias": _BIAS})
register_layer_rule(layers.Conv2d, {"weight": ("kernel", conv_to_conv), "bias": _BIAS})
register_layer_rule(layers.LayerNorm, {"weight": ("scale", identity), "bias": _BIAS})
register_layer_rule(layers.Embedding, {"weight": ("embedding", identity)})
register_layer_rule(layers.GroupNorm, {"weight": ("scale", identity), "bias": _BIAS})


def get_submodule(module: Any, path: Sequence) -> Any:
  """`module.a.b[0]` for path ('a', 'b', 0); raises KeyError with the path if absent."""
  node = module
  for i, p in enumerate(path):
    try:
      node = node[p] if isinstance(p, int) else getattr(node, p)
    except (AttributeError, IndexError, KeyError, TypeError):
      raise KeyError(f"module has no {path_str(path[:i + 1])}") from None
  return node


def torch_layer_rule(module: nnx.Module, rename: Optional[Callable[[str], Optional[str]]] = None,
                     ) -> Rule:
  """A rule for `map_keys` for modules that mirror the torch model's attribute names.

  Args:
    module: the target module.
    rename: optional key renamer applied first (checkpoint name -> our dotted name, still ending in
      the torch parameter name such as `.weight`); returning None leaves the key unmapped.

  Returns:
    rule(key) -> Target or None (None when the renamed key names no sub-module of a registered
    layer type and no bare Param, so that `assign` reports it as unused).
  """

  def rule(key: str) -> Optional[Target]:
    name = rename(key) if rename is not None else key
    if name is None:
      return None
    path = parse_path(name)
    owner_path, leaf = path[:-1], path[-1]
    try:
      owner = get_submodule(module, owner_path)
    except KeyError:
      return None
    table = layer_rule_for(type(owner))
    if table is not None:
      if leaf not in table:
        return None
      attr, transform = table[leaf]
      return Target(owner_path + (attr,), transform)
    if isinstance(leaf, str) and isinstance(getattr(owner, leaf, None), nnx.Variable):
      return Target(path, identity)
    return None

  return rule


# ----------------------------------------------------------------------------------------------
# Strict assignment.


def assign(module: nnx.Module, tensors: Mapping[str, np.ndarray],
           key_map: Mapping[str, Union[Target, tuple]], *, ignore: Iterable[str] = (),
           variables: Any = nnx.Param, what: str = "checkpoint",
           dry_run: bool = False) -> nnx.Module:
  """Fills every parameter of `module` from `tensors`, in place, or raises one clear error.

  Args:
    module: the NNX module (parameters are replaced, their dtype and sharding kept).
    tensors: {checkpoint key: array} (torch layout).
    key_map: {checkpoint key: Target(path, transform)} (a `(path, transform)` tuple or a dotted
      path string is accepted too).
    ignore: checkpoint keys known not to be parameters (e.g. `position_ids` buffers); they are
      allowed to stay unused. Listed explicitly by each converter.
    variables: the NNX filter of the variables that must all be filled (default `nnx.Param`).
    what: a name for the checkpoint in the error message.
    dry_run: only check (keys, transforms, shapes); write nothing. Transformed tensors are
      dropped one by one, so zero-stride stand-ins (`np.broadcast_to(0., shape)`) check a full
      size model's key set at the memory cost of its largest tensor.

  Returns:
    `module`.

  Raises:
    CheckpointMismatchError: listing every unused checkpoint key (not in `ignore`), every module
      parameter left unfilled, every shape mismatch, and parameters targeted twice.
  """
  ignore = set(ignore)
  state = nnx.state(module, variables)
  flat = {tuple(p): v for p, v in nnx.to_flat_state(state)}
  filled: dict[tuple, tuple[str, np.ndarray]] = {}
  unused, mismatches, duplicates = [], [], []
  for key in tensors:
    target = key_map.get(key)
    if target is None:
      if key not in ignore:
        unused.append(key)
      continue
    if isinstance(target, str):
      target = Target(parse_path(target))
    elif not isinstance(target, Target):
      target = Target(parse_path(target[0]), target[1])
    path = tuple(target.path)
    if path not in flat:
      unused.append(f"{key} (maps to {path_str(path)}, which is not a parameter)")
      continue
    if path in filled:
      duplicates.append((key, path_str(path)))
      continue
    value = target.transform(np.asarray(tensors[key]))
    pshape = tuple(flat[path].get_value().shape)
    if tuple(value.shape) != pshape:
      mismatches.append((key, path_str(path), tuple(value.shape), pshape))
      continue
    filled[path] = (key, None if dry_run else value)
  missing = [path_str(p) for p in flat if p not in filled]
  # Keys not in `tensors` but in key_map are fine (a shared table may cover optional layers).
  if unused or missing or mismatches or duplicates:
    raise CheckpointMismatchError(unused, missing, mismatches, duplicates, what=what)
  if dry_run:
    return module
  new_flat = []
  for path, var in flat.items():
    old = var.get_value()  # a jax.Array, or a ShapeDtypeStruct from `build_abstract`
    new = np.asarray(filled[path][1], dtype=old.dtype)
    sharding = getattr(old, "sharding", None)
    new = (jax.device_put(new, sharding) if isinstance(sharding, jax.sharding.Sharding)
           else jax.numpy.asarray(new))
    new_flat.append((path, var.replace(new)))
  nnx.update(module, nnx.from_flat_state(new_flat))
  return module


def build_abstract(ctor: Callable[[], Any], *, seed: int = 0) -> Any:
  """Builds the module `ctor()` without computing its random initial parameters.

  For loading a checkpoint: random initialisation is wasted work (and compiling the random
  initialisers for every parameter shape costs seconds on CPU). Parameters stay
  `jax.ShapeDtypeStruct` placeholders (shape, dtype and logical-axis metadata intact) until
  `assign` fills every one of them (it raises if any is left); all other state (RNG keys and
  counters of dropout layers, ...) gets concrete values: RNG keys `fold_in(key(seed), i)`,
  everything else zeros. Parameters that are not in the checkpoint must be replaced by freshly
  initialised sub-modules by the caller before use.
  """
  module = nnx.eval_shape(ctor)
  rest = nnx.to_flat_state(nnx.state(module, nnx.Not(nnx.Param)))
  new = []
  for i, (path, var) in enumerate(rest):
    v = var.get_value()
    if not isinstance(v, jax.ShapeDtypeStruct):
      continue
    if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
      val = jax.random.fold_in(jax.random.key(seed), i)
      val = _key_of_shape(val, v.shape)
    else:
      val = jax.numpy.zeros(v.shape, v.dtype)
    new.append((path, var.replace(val)))
  if new:
    nnx.update(module, nnx.from_flat_state(new))
  return module


def _key_of_shape(key: jax.Array, shape: tuple) -> jax.Array:
  """A PRNG key array of `shape` (split from `key`; `key` itself for shape ())."""
  if shape == ():
    return key
  n = int(np.prod(shape))
  return jax.random.split(key, n).reshape(shape)


def load_into(module: nnx.Module, tensors: Mapping[str, np.ndarray], *,
              rename: Optional[Callable[[str], Optional[str]]] = None,
              extra: Optional[Mapping[str, Union[Target, tuple]]] = None,
              ignore: Iterable[str] = (), what: str = "checkpoint",
              dry_run: bool = False) -> nnx.Module:
  """`assign` with `torch_layer_rule(module, rename)`, plus explicit `extra` entries that win."""
  key_map = key_map_for(tensors, torch_layer_rule(module, rename))
  if extra and not isinstance(tensors, OurParams):
    key_map.update(extra)
  return assign(module, tensors, key_map, ignore=ignore, what=what, dry_run=dry_run)
