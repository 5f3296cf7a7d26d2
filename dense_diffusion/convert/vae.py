"""diffusers `AutoencoderKL` checkpoints (safetensors) -> our `models.vae.AutoencoderKL`.

Our module tree mirrors diffusers' names, so the key map is `common.torch_layer_rule` with no
renaming except for the legacy attention names of pre-0.14 diffusers checkpoints (mid-block
`query`/`key`/`value`/`proj_attn` -> `to_q`/`to_k`/`to_v`/`to_out.0`); those legacy tensors can
be stored as 1x1 convolutions ([C, C, 1, 1]) and are then squeezed explicitly. Every checkpoint
tensor must be used (the VAE has no buffers) and every parameter filled.
"""
from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dense_diffusion.convert import common
from dense_diffusion.models import vae as vae_lib

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

_LEGACY_ATTENTION = common.regex_renamer([
    (r"(attentions\.\d+)\.query\.", r"\1.to_q."),
    (r"(attentions\.\d+)\.key\.", r"\1.to_k."),
    (r"(attentions\.\d+)\.value\.", r"\1.to_v."),
    (r"(attentions\.\d+)\.proj_attn\.", r"\1.to_out.0."),
])
_ATTN_WEIGHT = re.compile(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _squeeze_1x1(w):
  """Legacy attention projections stored as 1x1 convs ([O, I, 1, 1]) -> Dense kernel."""
  return common.conv1x1_to_dense(w) if w.ndim == 4 else common.linear_to_dense(w)


def vae_from_tensors(config: Mapping, tensors: Mapping[str, np.ndarray], *, dtype=None,
                     param_dtype=jnp.float32, seed: int = 0, dry_run: bool = False,
                     what: str = "diffusers VAE checkpoint") -> vae_lib.AutoencoderKL:
  """An `AutoencoderKL` from an in-memory diffusers config dict and {key: torch-layout array}.

  `dry_run=True` only checks keys and shapes (the returned model's parameters stay abstract).
  """
  vcfg = vae_lib.VAEConfig.from_dict(config)
  model = common.build_abstract(lambda: vae_lib.AutoencoderKL(
      vcfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)), seed=seed)
  key_map = common.key_map_for(tensors, common.torch_layer_rule(model, _LEGACY_ATTENTION))
  for key, target in list(key_map.items()):
    if not isinstance(tensors, common.OurParams) and _ATTN_WEIGHT.search(_LEGACY_ATTENTION(key)):
      key_map[key] = common.Target(target.path, _squeeze_1x1)
  return common.assign(model, tensors, key_map, what=what, dry_run=dry_run)


def load_diffusers_vae(path, *, subfolder: str = "vae", variant=None, dtype=None,
                       param_dtype=jnp.float32, seed: int = 0) -> vae_lib.AutoencoderKL:
  """An `AutoencoderKL` with the weights of a diffusers `AutoencoderKL`.

  Args:
    path: folder from `AutoencoderKL.save_pretrained` (config.json +
      diffusion_pytorch_model.safetensors, or the sharded index) or a pipeline folder whose
      `subfolder` ("vae") holds it, or a folder written by `main convert`.
    variant: diffusers weight variant ("fp16" -> diffusion_pytorch_model.fp16.safetensors);
      weights are read as float32 either way.
    dtype, param_dtype: compute / parameter dtypes.
    seed: seeds the dropout RNG state (parameters all come from the checkpoint).

  Raises:
    ValueError: an unsupported config value (naming the key).
    CheckpointMismatchError: unused checkpoint tensors / unfilled parameters / shape mismatches.
  """
  config, tensors = common.read_checkpoint(path, WEIGHTS_NAME, subfolder, variant=variant)
  return vae_from_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype, seed=seed,
                          what=f"diffusers VAE checkpoint {path}")
