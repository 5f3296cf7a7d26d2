"""diffusers `UNet2DConditionModel` checkpoints -> `dense_diffusion.models.unet.UNet` (no torch).

    unet = load_diffusers_unet("path/to/sd-1.5")                  # pipeline folder (unet/ inside)
    unet = load_diffusers_unet("path/to/unet", in_channels=8, dtype=jnp.bfloat16)

Our module mirrors diffusers' attribute names, so every checkpoint key maps by the generic
`convert.common.torch_layer_rule` (weight -> kernel/scale with the layout transform of the layer
type). Every checkpoint tensor must be used and every parameter filled, or one
`CheckpointMismatchError` lists all differences. A folder written by `main convert` (our layout,
`convert/command.py`) loads the same way.

Channels that differ from the checkpoint's (a UNet that sees the condition beside the noisy
answer, or answers in RGB instead of SD's 4 latent channels): `conv_in` is widened by
`input_widening` (`unet.widen_input_kernel`), and `conv_out` is initialised afresh when
`out_channels` differs (a kernel that maps to another number of channels has no meaning to
keep). `fresh_params` names the parameters a load does not take as they are from the checkpoint.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dense_diffusion.convert import common
from dense_diffusion.models import layers
from dense_diffusion.models import unet as unet_lib

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SUBFOLDER = "unet"

# Keyword arguments of `load_diffusers_unet` that configure the module, not the config.json.
_MODULE_OPTIONS = ("dtype", "param_dtype", "remat")


def read_unet_files(path: Union[str, os.PathLike], *, variant: Optional[str] = None
                    ) -> tuple[dict, dict[str, np.ndarray]]:
  """(config dict, {checkpoint key: float32 array}) of a diffusers UNet folder or pipeline, or
  (config, `common.OurParams`) of a folder written by `main convert`."""
  return common.read_checkpoint(path, WEIGHTS_NAME, SUBFOLDER, variant=variant)


def fresh_params(checkpoint_config: dict, **overrides: Any) -> tuple[str, ...]:
  """'/'-joined paths of the parameters a load with these config `overrides` (in_channels,
  out_channels, num_class_embeds, class_embed_type, projection_class_embeddings_input_dim) does
  not take as they are from the checkpoint: `conv_in/kernel` when widened, `conv_out` and
  `class_embedding` when built afresh."""
  ckpt = unet_lib.normalize_config(checkpoint_config)
  new = unet_lib.normalize_config({**checkpoint_config, **overrides})
  fresh = ()
  if new["in_channels"] != ckpt["in_channels"]:
    fresh += ("conv_in/kernel",)
  return fresh + _rebuilt_modules(ckpt, new)


def _rebuilt_modules(ckpt: dict, new: dict) -> tuple[str, ...]:
  """Modules whose checkpoint weights cannot serve the new config: initialised afresh."""
  rebuilt = ()
  if new["out_channels"] != ckpt["out_channels"]:
    rebuilt += ("conv_out",)  # its kernel maps to another number of channels.
  if unet_lib.class_conditioning(new) and any(
      new[k] != ckpt[k] for k in CLASS_EMBEDDING_KEYS):
    # The run's own classes (the generalist's tasks), or a projection of its prompts' pooled
    # embeddings: SD's checkpoints have none, so it starts fresh.
    rebuilt += ("class_embedding",)
  return rebuilt


# The config keys that shape `class_embedding`.
CLASS_EMBEDDING_KEYS = ("num_class_embeds", "class_embed_type",
                         "projection_class_embeddings_input_dim")


def load_diffusers_unet(path: Union[str, os.PathLike], *, input_widening: str = "copy_scale",
                        variant: Optional[str] = None, seed: int = 0,
                        **overrides: Any) -> unet_lib.UNet:
  """Builds a `UNet` from a diffusers checkpoint folder and loads its weights.

  Args:
    path: a folder with `config.json` and `diffusion_pytorch_model.safetensors` (or the sharded
      `diffusion_pytorch_model.safetensors.index.json`), or a pipeline folder with `unet/`.
    input_widening: rule for `in_channels` larger than the checkpoint's
      (`unet.widen_input_kernel`: "copy_scale" or "zeros").
    variant: diffusers weight variant, e.g. "fp16".
    seed: parameter-initialisation seed (only dropout keys remain after loading).
    **overrides: config keys to replace (e.g. `in_channels=8`), and the module options `dtype`,
      `param_dtype`, `remat`.

  Returns:
    The UNet with every parameter from the checkpoint.

  Raises:
    CheckpointMismatchError listing unused checkpoint keys / unfilled parameters / shape
    mismatches; ValueError for unsupported config values.
  """
  config, tensors = read_unet_files(path, variant=variant)
  return unet_from_tensors(config, tensors, input_widening=input_widening, seed=seed,
                           **overrides)


def unet_from_tensors(config: dict, tensors: dict[str, np.ndarray], *,
                      input_widening: str = "copy_scale", seed: int = 0,
                      **overrides: Any) -> unet_lib.UNet:
  """`load_diffusers_unet` on an already-read (config, tensors) pair."""
  options = {k: overrides.pop(k) for k in _MODULE_OPTIONS if k in overrides}
  config = dict(config)
  ckpt = unet_lib.normalize_config(config)
  config.update(overrides)
  new = unet_lib.normalize_config(config)
  if input_widening not in unet_lib.INPUT_WIDENING_RULES:
    raise ValueError(f"input_widening={input_widening!r} is unknown; choose one of "
                     f"{unet_lib.INPUT_WIDENING_RULES}")
  # Built abstractly (no random initialisation: that compiles one initializer per shape and
  # costs far more than reading the checkpoint); `assign` then fills every parameter.
  model = nnx.eval_shape(lambda: unet_lib.UNet(config, rngs=nnx.Rngs(seed), **options))
  ours = isinstance(tensors, common.OurParams)
  key_map = common.key_map_for(tensors, common.torch_layer_rule(model))
  conv_in_key = "conv_in/kernel" if ours else "conv_in.weight"
  if new["in_channels"] != ckpt["in_channels"] and conv_in_key in tensors:
    to_ours = common.identity if ours else common.conv_to_conv

    def widen(w, new_in=new["in_channels"]):
      with jax.ensure_compile_time_eval():  # numbers, even inside an abstract build.
        return np.asarray(unet_lib.widen_input_kernel(to_ours(w), new_in, input_widening))
    key_map[conv_in_key] = common.Target(("conv_in", "kernel"), widen)
  rebuilt = _rebuilt_modules(ckpt, new)
  # The rebuilt modules' checkpoint tensors (if any) are not used; they are built afresh below.
  sep = "/" if ours else "."
  ignore = tuple(k for k in tensors if any(k.startswith(m + sep) for m in rebuilt))
  for k in ignore:
    key_map.pop(k, None)
  variables = nnx.Param
  for m in rebuilt:
    variables = nnx.All(variables, nnx.Not(nnx.PathContains(m)))
  common.assign(model, tensors, key_map, ignore=ignore, what="UNet checkpoint",
                variables=variables)
  rngs = nnx.Rngs(seed)
  param_dtype = model.conv_in.kernel.get_value().dtype
  if "conv_out" in rebuilt:
    old, k = model.conv_out, int(new["conv_out_kernel"])
    model.conv_out = layers.Conv2d(old.in_channels, new["out_channels"], k,
                                   padding=(k - 1) // 2, dtype=old.dtype,
                                   param_dtype=param_dtype, rngs=rngs)
  if "class_embedding" in rebuilt:  # as the UNet builds it.
    time_dim = new["time_embedding_dim"] or new["block_out_channels"][0] * 4
    model.class_embedding = unet_lib.make_class_embedding(
        new, time_dim, dtype=model.dtype, param_dtype=param_dtype, rngs=rngs)
  _materialize(model, seed)
  return model


def _materialize(model: nnx.Module, seed: int) -> None:
  """Turns the values left abstract by `nnx.eval_shape` into arrays: the loaded parameters (numpy
  -> jax) and the dropout RNG streams (keys from `seed`; present only when dropout > 0)."""
  flat = []
  for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(model))):
    value = var.get_value()
    if isinstance(var, nnx.RngKey) and isinstance(value, jax.ShapeDtypeStruct):
      value = jax.random.fold_in(jax.random.key(seed), i)
    elif isinstance(var, nnx.RngCount) and isinstance(value, jax.ShapeDtypeStruct):
      value = jnp.zeros(value.shape, value.dtype)
    elif isinstance(value, jax.ShapeDtypeStruct):
      raise ValueError(f"UNet state {common.path_str(path)} was not filled by the checkpoint")
    else:
      value = jnp.asarray(value)
    flat.append((path, var.replace(value)))
  nnx.update(model, nnx.from_flat_state(flat))
