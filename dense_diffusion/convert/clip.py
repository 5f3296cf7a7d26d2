"""transformers CLIP checkpoints (safetensors) -> our `TextEncoder` / `ImageEncoder`.

Our module trees mirror transformers' attribute names (see `models/text_encoder.py` and
`models/image_encoder.py`), so each converter is: strip the wrapper prefix of the checkpoint
(`text_model.` in pre-5.x / pipeline checkpoints, `vision_model.` in `CLIPVisionModel
WithProjection` and older checkpoints), then `common.torch_layer_rule` maps `weight`/`bias` of
each layer by its type (Dense: transpose; Conv2d: OIHW -> HWIO; LayerNorm: weight -> scale;
Embedding: weight -> embedding; `class_embedding` as is).

A full `CLIPModel` checkpoint (both towers in one file) is not accepted by either loader: the
other tower's tensors would be unused. Save the tower alone (`CLIPTextModel` /
`CLIPVisionModel[WithProjection]`), as diffusers pipelines do.

Non-parameter tensors allowed to stay unused (and only these): `*.position_ids` buffers (stored
by older transformers versions). Every other checkpoint tensor must be used and every parameter
filled, or `CheckpointMismatchError` lists the names.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dense_diffusion.convert import common
from dense_diffusion.models import image_encoder as image_encoder_lib
from dense_diffusion.models import text_encoder as text_encoder_lib

WEIGHTS_NAME = "model.safetensors"
BUFFER_PATTERN = re.compile(r"(^|\.)position_ids$")


def _buffers(tensors) -> list[str]:
  return [k for k in tensors if BUFFER_PATTERN.search(k)]


def _strip(prefix: str):
  def rename(key: str) -> str:
    return key[len(prefix):] if key.startswith(prefix) else key
  return rename


def clip_text_from_tensors(config: Mapping, tensors: Mapping[str, np.ndarray], *, dtype=None,
                           param_dtype=jnp.float32, seed: int = 0, dry_run: bool = False,
                           what: str = "CLIP text checkpoint") -> text_encoder_lib.TextEncoder:
  """A `TextEncoder` from an in-memory transformers config dict and {key: torch-layout array}.

  `dry_run=True` only checks keys and shapes (the returned model's parameters stay abstract).
  """
  tcfg = text_encoder_lib.CLIPTextConfig.from_dict(config)
  model = common.build_abstract(lambda: text_encoder_lib.TextEncoder(
      tcfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)), seed=seed)
  return common.load_into(model, tensors, rename=_strip("text_model."), ignore=_buffers(tensors),
                          what=what, dry_run=dry_run)


def load_transformers_clip_text(path, *, subfolder: str = "text_encoder", variant=None,
                                dtype=None, param_dtype=jnp.float32, seed: int = 0
                                ) -> text_encoder_lib.TextEncoder:
  """A `TextEncoder` with the weights of a transformers `CLIPTextModel`.

  Args:
    path: folder from `CLIPTextModel.save_pretrained` (config.json + model.safetensors, or the
      sharded index), or a pipeline folder whose `subfolder` holds it, or a folder written by
      `main convert`.
    subfolder: pipeline sub-folder tried when `path` holds no weights.
    variant: weight variant ("fp16" -> model.fp16.safetensors); read as float32 either way.
    dtype: compute dtype (None = float32); parameters are `param_dtype`.
    seed: unused by the text encoder (all parameters come from the checkpoint); kept for
      symmetry with the other loaders.

  Returns:
    The loaded `TextEncoder` (its `config` attribute holds the `CLIPTextConfig`).

  Raises:
    CheckpointMismatchError: unused checkpoint tensors / unfilled parameters / shape mismatches.
  """
  config, tensors = common.read_checkpoint(path, WEIGHTS_NAME, subfolder, variant=variant)
  return clip_text_from_tensors(config, tensors, dtype=dtype, param_dtype=param_dtype, seed=seed,
                                what=f"CLIP text checkpoint {path}")


def clip_vision_from_tensors(config: Mapping, tensors: Mapping[str, np.ndarray], *,
                             context_dim: Optional[int] = None, layer: int = -1,
                             tokens: str = "all", post_layernorm: bool = False,
                             trainable: bool = False, dtype=None, param_dtype=jnp.float32,
                             seed: int = 0, dry_run: bool = False,
                             what: str = "CLIP vision checkpoint"
                             ) -> image_encoder_lib.ImageEncoder:
  """An `ImageEncoder` from an in-memory transformers config dict and {key: array}.

  `dry_run=True` only checks keys and shapes (the tower's parameters stay abstract).
  """
  ours = isinstance(tensors, common.OurParams)  # a `main convert` folder: our layout.
  with_projection = ("vision_model/visual_projection/kernel" if ours
                     else "visual_projection.weight") in tensors
  vcfg = image_encoder_lib.CLIPVisionConfig.from_dict(config, with_projection=with_projection)
  model = common.build_abstract(lambda: image_encoder_lib.ImageEncoder(
      vcfg, context_dim=context_dim, layer=layer, tokens=tokens, post_layernorm=post_layernorm,
      trainable=trainable, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed)),
                                seed=seed)
  tower = tensors.under("vision_model") if ours else tensors
  common.load_into(model.vision_model, tower, rename=_strip("vision_model."),
                   ignore=_buffers(tensors), what=what, dry_run=dry_run)
  if not dry_run:
    # The projection to the context width is not in the checkpoint: initialise it for real.
    model.proj = model.make_proj(nnx.Rngs(seed))
  return model


def load_transformers_clip_vision(path, *, subfolder: str = "image_encoder", variant=None,
                                  context_dim: Optional[int] = None, layer: int = -1,
                                  tokens: str = "all", post_layernorm: bool = False,
                                  trainable: bool = False, dtype=None,
                                  param_dtype=jnp.float32, seed: int = 0
                                  ) -> image_encoder_lib.ImageEncoder:
  """An `ImageEncoder` whose vision tower has the weights of a transformers CLIP vision model.

  Args:
    path: folder from `CLIPVisionModel.save_pretrained` or
      `CLIPVisionModelWithProjection.save_pretrained` (then `visual_projection` is loaded into
      `vision_model.visual_projection`), or a pipeline folder whose `subfolder` holds it, or a
      folder written by `main convert`.
    subfolder: pipeline sub-folder tried when `path` holds no weights.
    variant: weight variant ("fp16" -> model.fp16.safetensors); read as float32 either way.
    context_dim, layer, tokens, post_layernorm, trainable: see `ImageEncoder`. The projection to
      `context_dim` is not in the checkpoint: it gets a fresh random initialisation (seeded by
      `seed`).
    dtype, param_dtype: compute / parameter dtypes.

  Returns:
    The `ImageEncoder`.

  Raises:
    CheckpointMismatchError: unused checkpoint tensors / unfilled tower parameters / shapes.
  """
  config, tensors = common.read_checkpoint(path, WEIGHTS_NAME, subfolder, variant=variant)
  return clip_vision_from_tensors(
      config, tensors, context_dim=context_dim, layer=layer, tokens=tokens,
      post_layernorm=post_layernorm, trainable=trainable, dtype=dtype, param_dtype=param_dtype,
      seed=seed, what=f"CLIP vision checkpoint {path}")
