"""diffusers `UNet2DConditionModel` checkpoints -> `dense_diffusion.models.unet.UNet` (no torch).

    unet = load_diffusers_unet("path/to/sd-1.5")                  # pipeline folder (unet/ inside)
    unet = load_diffusers_unet("path/to/unet", in_channels=8, dtype=jnp.bfloat16)

Our module mirrors diffusers' attribute names, so every checkpoint key maps by the generic
`convert.common.torch_layer_rule` (weight -> kernel/scale with the layout transform of the layer
type). Every checkpoint tensor must be used and every parameter filled, or one
`CheckpointMismatchError` lists all differences.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dense_diffusion.convert import common
from dense_diffusion.models import unet as unet_lib

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SUBFOLDER = "unet"

# Keyword arguments of `load_diffusers_unet` that configure the module, not the config.json.
_MODULE_OPTIONS = ("dtype", "param_dtype", "remat")


def read_unet_files(path: Union[str, os.PathLike], *, variant: Optional[str] = None
                    ) -> tuple[dict, dict[str, np.ndarray]]:
  """(config dict, {checkpoint key: float32 array}) of a diffusers UNet folder or pipeline."""
  return common.load_model_files(path, WEIGHTS_NAME, SUBFOLDER, variant=variant)


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
  ckpt_in = unet_lib.normalize_config(config)["in_channels"]
  config.update(overrides)
  new_in = unet_lib.normalize_config(config)["in_channels"]
  if input_widening not in unet_lib.INPUT_WIDENING_RULES:
    raise ValueError(f"input_widening={input_widening!r} is unknown; choose one of "
                     f"{unet_lib.INPUT_WIDENING_RULES}")
  # Built abstractly (no random initialisation: that compiles one initializer per shape and
  # costs far more than reading the checkpoint); `assign` then fills every parameter.
  model = nnx.eval_shape(lambda: unet_lib.UNet(config, rngs=nnx.Rngs(seed), **options))
  key_map = common.map_keys(tensors, common.torch_layer_rule(model))
  if new_in != ckpt_in and "conv_in.weight" in tensors:
    def widen(w, new_in=new_in):
      return np.asarray(unet_lib.widen_input_kernel(common.conv_to_conv(w), new_in,
                                                    input_widening))
    key_map["conv_in.weight"] = common.Target(("conv_in", "kernel"), widen)
  common.assign(model, tensors, key_map, what="diffusers UNet checkpoint")
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
