"""`python -m dense_diffusion.main convert --from diffusers --src DIR --dst DIR`.

Converts a diffusers checkpoint into orbax checkpoints of our modules' parameters, no torch:

    DST/<component>/params/      orbax (StandardCheckpointer) checkpoint of the nnx.Param state,
                                 as a nested dict keyed like the module's attributes
    DST/<component>/config.json  the source config.json (our modules are built from it)

`SRC` is a single UNet folder (config.json + diffusion_pytorch_model.safetensors or its sharded
index; written to DST/unet) or a full pipeline folder (model_index.json and/or sub-folders), in
which case every component in `COMPONENTS` whose sub-folder exists is converted with its loader.
Loaders are imported lazily; a component whose loader is not available is skipped with a note.
`restore_unet(DST / "unet")` rebuilds the module from the two files, and every loader
(`load_diffusers_unet`, `load_diffusers_vae`, `load_transformers_clip_text` / `_vision`), hence
every `model.pretrained_*` key of a config, reads DST (or DST/<component>) like the source
folder. A pipeline's `tokenizer/` is copied, so DST also serves as `model.text_encoder`.

`--lora FILE` (`run(..., lora=FILE)`): a diffusers / peft LoRA file (`convert/lora.py`) is put on
the converted UNet and folded into its kernels, so DST/unet is a plain UNet with the LoRA's
outputs.
"""
from __future__ import annotations

import importlib
import json
import os
import pathlib
import shutil
from typing import Any, Optional, Union

import jax
import numpy as np
from flax import nnx

from dense_diffusion import errors
from dense_diffusion.convert import common

PathLike = Union[str, os.PathLike]

SOURCES = ("diffusers",)

# component: (pipeline sub-folder, loader module, loader function `loader(folder) -> module`).
COMPONENTS: dict[str, tuple[str, str, str]] = {
    "unet": ("unet", "dense_diffusion.convert.unet", "load_diffusers_unet"),
    "vae": ("vae", "dense_diffusion.convert.vae", "load_diffusers_vae"),
    "text_encoder": ("text_encoder", "dense_diffusion.convert.clip",
                     "load_transformers_clip_text"),
    "image_encoder": ("image_encoder", "dense_diffusion.convert.clip",
                      "load_transformers_clip_vision"),
}

PARAMS_DIR = common.CONVERTED_PARAMS_DIR
TOKENIZER_DIR = "tokenizer"
CONFIG_NAME = "config.json"


def _checkpointer():
  import orbax.checkpoint as ocp  # heavy import, only for this command.
  return ocp.StandardCheckpointer()


def _is_pipeline(src: pathlib.Path) -> bool:
  return (src / "model_index.json").is_file() or any(
      (src / sub / CONFIG_NAME).is_file() for sub, _, _ in COMPONENTS.values())


def _loader(component: str):
  _, module_name, fn_name = COMPONENTS[component]
  try:
    return getattr(importlib.import_module(module_name), fn_name)
  except (ImportError, AttributeError) as e:
    print(f"note: skipping {component}: its loader {module_name}.{fn_name} is not available "
          f"({e})")
    return None


def save_params(model: nnx.Module, config: dict, dst: PathLike) -> pathlib.Path:
  """Writes `dst/params` (orbax) and `dst/config.json`; returns `dst`."""
  dst = pathlib.Path(dst).absolute()
  dst.mkdir(parents=True, exist_ok=True)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ckptr = _checkpointer()
  ckptr.save(dst / PARAMS_DIR, params, force=True)
  ckptr.wait_until_finished()
  with open(dst / CONFIG_NAME, "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  return dst


def restore_params(model: nnx.Module, path: PathLike) -> nnx.Module:
  """Fills `model`'s nnx.Param state (which may be abstract, from `nnx.eval_shape`) from
  `path/params`, in place; every parameter must be in the checkpoint."""
  path = pathlib.Path(path).absolute()
  state = nnx.state(model, nnx.Param)
  target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype),
                        nnx.to_pure_dict(state))
  restored = _checkpointer().restore(path / PARAMS_DIR, target)
  nnx.replace_by_pure_dict(state, restored)
  nnx.update(model, state)
  return model


def restore_unet(path: PathLike, **module_options: Any):
  """The UNet written by `run` at `path` (= DST/unet): built from config.json, parameters
  restored. `module_options`: dtype, param_dtype, remat."""
  from dense_diffusion.models import unet as unet_lib
  path = pathlib.Path(path)
  with open(path / CONFIG_NAME, encoding="utf-8") as f:
    config = json.load(f)
  model = nnx.eval_shape(lambda: unet_lib.UNet(config, rngs=nnx.Rngs(0), **module_options))
  restore_params(model, path)
  from dense_diffusion.convert.unet import _materialize  # abstract RNG state -> arrays.
  _materialize(model, 0)
  return model


def run(source: str, src: PathLike, dst: PathLike, *, lora: Optional[PathLike] = None) -> None:
  """Converts the checkpoint at `src` into orbax checkpoints under `dst` (see module doc); with
  `lora`, that LoRA file is folded into the UNet first."""
  if source not in SOURCES:
    raise errors.ConfigError(f"convert --from={source!r} is not supported; choose one of "
                             f"{SOURCES}")
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  if not src.is_dir():
    raise errors.MissingError(f"convert --src={src} is not a folder")
  if _is_pipeline(src):
    todo = [(name, src / sub) for name, (sub, _, _) in COMPONENTS.items()
            if (src / sub / CONFIG_NAME).is_file()]
    missing = [name for name, (sub, _, _) in COMPONENTS.items()
               if not (src / sub / CONFIG_NAME).is_file()]
    if missing:
      print(f"note: {src} has no {', '.join(missing)} (no such sub-folder with config.json)")
  else:
    todo = [("unet", src)]
  if lora is not None:
    from dense_diffusion.convert import lora as lora_convert  # pylint: disable=g-import-not-at-top
    lora = lora_convert.lora_file(lora)
    if "unet" not in dict(todo):
      raise errors.ConfigError(f"convert --lora: {src} has no UNet to fold {lora} into")
  written = []
  for name, folder in todo:
    loader = _loader(name)
    if loader is None:
      continue
    model = loader(folder)
    if name == "unet" and lora is not None:
      try:
        adapted = lora_convert.load_diffusers_lora(model, lora)
      except common.CheckpointMismatchError as e:
        shapes = [f"{k}: file {tuple(a)} vs {tuple(b)}" for k, _, a, b in e.shape_mismatches]
        raise errors.ConfigError(
            f"convert --lora: {lora} does not fit the UNet of {folder} ({len(e.unused)} key(s) "
            f"naming no layer of it, {len(shapes)} shape mismatch(es)), e.g. "
            f"{'; '.join((e.unused + shapes)[:3])} (--traceback lists all)") from e
      lora_convert.fold_lora(model, copy=False)
      print(f"folded {lora} ({len(adapted)} adapted layers) into the unet")
    config = common.read_config(folder)
    out = save_params(model, config, dst / name)
    n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"wrote {name}: {n:,} parameters -> {out / PARAMS_DIR} (+ {CONFIG_NAME})")
    written.append(name)
  if written and _is_pipeline(src) and (src / TOKENIZER_DIR).is_dir():
    # The text encoder's tokenizer, so DST serves `model.text_encoder` as the pipeline did.
    shutil.copytree(src / TOKENIZER_DIR, dst / TOKENIZER_DIR, dirs_exist_ok=True)
    print(f"copied {TOKENIZER_DIR}/")
  if not written:
    raise errors.MissingError(f"nothing converted from {src}: it holds no diffusers UNet, VAE "
                              "or text encoder folder with a config.json")
