"""Low-rank adapters (LoRA) on the dense and convolution layers of any of our models.

`apply_lora(model, pattern, rank=..., alpha=...)` attaches to every `layers.Dense` / `layers.Conv2d`
whose module path (dotted, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`)
matches the regex `pattern` (`re.search`) a pair

    lora_down [in, rank]  (conv: [kh, kw, in, rank], the same window as the base kernel)
    lora_up   [rank, out] (zeros at start, so the model's outputs are unchanged)

and the layer computes `base(x) + (x @ lora_down @ lora_up) * alpha / rank`. The adapters are
`nnx.LoRAParam` variables (a sub-type of `nnx.Param`); base weights stay `nnx.Param`, so training
only the adapters is

    optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=LORA_PARAMS)
    grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, LORA_PARAMS))(model)

Parameter paths of the base layers do not change (the adapters are new attributes of the same
layer), so checkpoints of the base model load before or after LoRA is attached.
`merge_lora` folds the adapters into the base kernels (for inference/export); `unmerge_lora`
takes them out again.
"""
from __future__ import annotations

import re
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx

from dense_diffusion.models import initializers
from dense_diffusion.models import layers

LoRAParam = nnx.LoRAParam
LORA_PARAMS = nnx.LoRAParam  # the filter of adapter parameters (optimizer `wrt`, DiffState).
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # everything that is frozen.

# Default target: every attention projection of the UNet's transformer blocks.
DEFAULT_PATTERN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"

_ADAPTABLE = (layers.Dense, layers.Conv2d)


def _path_str(path) -> str:
  return ".".join(str(p) for p in path)


def lora_layers(model: nnx.Module, pattern: Union[str, re.Pattern] = DEFAULT_PATTERN
                ) -> list[tuple[str, nnx.Module]]:
  """(dotted path, layer) of every Dense / Conv2d of `model` whose path matches `pattern`."""
  regex = re.compile(pattern)
  found = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, _ADAPTABLE) and regex.search(_path_str(path)):
      found.append((_path_str(path), node))
  return found


def apply_lora(model: nnx.Module, pattern: Union[str, re.Pattern] = DEFAULT_PATTERN, *,
               rank: int = 4, alpha: Optional[float] = None, rngs: nnx.Rngs) -> list[str]:
  """Attaches zero-initialised adapters to the matching layers, in place.

  Args:
    model: any module built from `models.layers` (UNet, VAE, encoders).
    pattern: regex searched in each layer's dotted module path.
    rank: adapter rank r.
    alpha: scale numerator; the update is multiplied by alpha / rank (default alpha = rank).
    rngs: initialises lora_down (normal, std 1/rank as in diffusers/peft's `init_lora_weights`
      "gaussian" variant); lora_up is zeros.

  Returns:
    The dotted paths of the adapted layers.

  Raises:
    ValueError when nothing matches, rank is not positive, or a layer already has an adapter.
  """
  if rank <= 0:
    raise ValueError(f"LoRA rank must be positive, got {rank}")
  alpha = float(rank if alpha is None else alpha)
  targets = lora_layers(model, pattern)
  if not targets:
    raise ValueError(f"LoRA pattern {pattern!r} matches no Dense/Conv2d layer of "
                     f"{type(model).__name__}")
  for path, layer in targets:
    if layer.lora_down is not None:
      raise ValueError(f"{path} already has a LoRA adapter")
    kernel = layer.kernel
    names = kernel.get_metadata().get("out_sharding") or (None,) * kernel.get_value().ndim
    in_axis, out_axis = names[-2], names[-1]
    down_shape = kernel.get_value().shape[:-1] + (rank,)
    down_names = tuple(names[:-1]) + ("lora_rank",)
    param_dtype = kernel.get_value().dtype
    down = initializers.normal(1.0 / rank)(rngs.params(), down_shape, param_dtype)
    up = initializers.zeros(None, (rank, kernel.get_value().shape[-1]), param_dtype)
    del in_axis
    layer.lora_down = LoRAParam(down, out_sharding=down_names, eager_sharding=False)
    layer.lora_up = LoRAParam(up, out_sharding=("lora_rank", out_axis), eager_sharding=False)
    layer.lora_scale = alpha / rank
    layer.lora_merged = False
  return [p for p, _ in targets]


def _delta(layer) -> jax.Array:
  """scale * down @ up in the base kernel's shape."""
  down = layer.lora_down.get_value()
  up = layer.lora_up.get_value()
  return (jnp.einsum("...r,ro->...o", down, up) * layer.lora_scale).astype(
      layer.kernel.get_value().dtype)


def _adapted(model: nnx.Module):
  for _, node in nnx.iter_graph(model):
    if isinstance(node, _ADAPTABLE) and node.lora_down is not None:
      yield node


def merge_lora(model: nnx.Module) -> int:
  """Adds every adapter into its base kernel (kernel += alpha/r * down @ up) and turns the
  adapter path off; returns the number of merged layers. The adapters are kept, so
  `unmerge_lora` can undo it."""
  n = 0
  for layer in _adapted(model):
    if not layer.lora_merged:
      layer.kernel.set_value(layer.kernel.get_value() + _delta(layer))
      layer.lora_merged = True
      n += 1
  return n


def unmerge_lora(model: nnx.Module) -> int:
  """Inverse of `merge_lora` (up to float rounding): kernel -= alpha/r * down @ up."""
  n = 0
  for layer in _adapted(model):
    if layer.lora_merged:
      layer.kernel.set_value(layer.kernel.get_value() - _delta(layer))
      layer.lora_merged = False
      n += 1
  return n
