"""Models of a given architecture with random weights and no files, drawn on the device.

For bench/device_check.py: the GPU machines have no pretrained weights, and the timings do not
depend on the values, only on the shapes. `random_like` fills a tree of shapes in one jitted
program; `build_marigold` makes a Marigold depth pipeline (`pipelines.MarigoldDepthPipeline`)
from diffusers-style config dicts, e.g. SD-2's (`SD2_UNET`, `SD_VAE`).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx


def _leaf_name(path) -> str:
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
  names = [n for n in names if n not in ("value", "raw_value")]
  return names[-1] if names else ""


def random_like(tree, key: jax.Array):
  """Arrays for a tree of ShapeDtypeStructs (or arrays), traced inside a jit: kernels ~ N(0,
  1/fan_in), embeddings ~ N(0, 0.02^2), norm scales 1, the rest (biases, counters) 0. Values
  only need to keep activations finite: the timings do not depend on them. One normal draw of
  every random element, sliced per leaf (a draw per leaf compiles far slower)."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  plan = []  # per leaf: ("normal", std) | ("ones",) | ("zeros",) | ("keys",)
  total = 0
  for path, leaf in leaves:
    shape, dtype = leaf.shape, leaf.dtype
    name = _leaf_name(path)
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      plan.append(("keys",))
    elif not jnp.issubdtype(dtype, jnp.floating):
      plan.append(("zeros",))
    elif name == "scale":
      plan.append(("ones",))
    elif "embedding" in name and len(shape) >= 1:
      plan.append(("normal", 0.02))
    elif len(shape) >= 2:
      plan.append(("normal", 1.0 / math.sqrt(math.prod(shape[:-1]))))
    else:
      plan.append(("zeros",))
    if plan[-1][0] == "normal":
      total += math.prod(shape)
  key_normal, key_keys = jax.random.split(key)
  flat = jax.random.normal(key_normal, (max(total, 1),), jnp.float32)
  out, offset = [], 0
  for (_, leaf), (kind, *std) in zip(leaves, plan):
    shape, dtype = leaf.shape, leaf.dtype
    if kind == "normal":
      size = math.prod(shape)
      out.append((flat[offset:offset + size].reshape(shape) * std[0]).astype(dtype))
      offset += size
    elif kind == "ones":
      out.append(jnp.ones(shape, dtype))
    elif kind == "keys":
      out.append(jax.random.split(jax.random.fold_in(key_keys, len(out)),
                                  math.prod(shape) or 1).reshape(shape))
    else:
      out.append(jnp.zeros(shape, dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def random_modules(*builds: Callable[[], nnx.Module], seed: int = 0) -> list[nnx.Module]:
  """The modules the `builds` make, with random weights drawn on the device in one program
  (eager initialisation compiles one small program per parameter shape)."""
  splits = [nnx.split(nnx.eval_shape(build)) for build in builds]

  def draw(key):
    keys = jax.random.split(key, len(splits))
    return [random_like(abstract, k) for (_, abstract), k in zip(splits, keys)]

  states = jax.jit(draw)(jax.random.key(seed))
  return [nnx.merge(graphdef, state) for (graphdef, _), state in zip(splits, states)]


# diffusers keys of stabilityai/stable-diffusion-2's UNet (Marigold fine-tunes exactly this one).
SD2_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    attention_head_dim=[5, 10, 20, 20], use_linear_projection=True, cross_attention_dim=1024,
    upcast_attention=False, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
    flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4,
              norm_num_groups=32, scaling_factor=0.18215)
# SD-2's text encoder width (OpenCLIP ViT-H/14 text tower) with one layer: it runs once, when the
# pipeline is built (the empty prompt's embedding), so its depth does not enter the timings.
SD2_TEXT_ONE_LAYER = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=1,
                          num_attention_heads=16, hidden_act="gelu")

# Marigold depth v1-1's scheduler (diffusers DDIMScheduler config) and model_index.json keys.
MARIGOLD_SCHEDULER = dict(
    _class_name="DDIMScheduler", num_train_timesteps=1000, beta_schedule="scaled_linear",
    beta_start=0.00085, beta_end=0.012, clip_sample=False, prediction_type="v_prediction",
    set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")


def tiny_clip_tokenizer():
  """A CLIP tokenizer with a byte-level vocabulary and CLIP's special tokens: Marigold encodes
  the empty prompt, so only the start / end tokens matter."""
  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers
  from dense_diffusion.models import tokenizer as tokenizer_lib
  # pylint: enable=g-import-not-at-top
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(alphabet)}
  vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
  vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
  tok = tokenizer_lib.build_clip_bpe(vocab, [], "<|endoftext|>")
  return tokenizer_lib.CLIPTokenizer(tok, bos_token="<|startoftext|>",
                                     eos_token="<|endoftext|>", max_length=77)


MARIGOLD_PARTS = ("unet", "vae", "text_encoder")


def marigold_builds(unet_keys: dict, vae_keys: dict, text_keys: dict, resolution: int, dtype,
                    tokenizer) -> tuple[Callable[[], nnx.Module], ...]:
  """How to build a Marigold pipeline's UNet (8 channels in: image and noisy depth latents; 4
  out), VAE and text encoder (MARIGOLD_PARTS) for `resolution`-pixel images."""
  from dense_diffusion.models import text_encoder as text_lib  # pylint: disable=g-import-not-at-top
  from dense_diffusion.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  from dense_diffusion.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  vae_config = vae_lib.VAEConfig.from_dict(vae_keys)
  unet_config = dict(unet_keys, in_channels=8, out_channels=4,
                     sample_size=resolution // vae_config.downsample_factor)
  text_config = text_lib.CLIPTextConfig.from_dict(dict(
      text_keys, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
      pad_token_id=tokenizer.pad_id))
  return (lambda: unet_lib.UNet(unet_config, dtype=dtype, rngs=nnx.Rngs(0)),
          lambda: vae_lib.AutoencoderKL(vae_config, dtype=dtype, rngs=nnx.Rngs(0)),
          lambda: text_lib.TextEncoder(text_config, dtype=dtype, rngs=nnx.Rngs(0)))


def parameter_counts(modules) -> dict[str, int]:
  """{part: parameters} of the pipeline's parts, in MARIGOLD_PARTS order (real or abstract)."""
  return {name: sum(x.size for x in jax.tree.leaves(nnx.state(m)))
          for name, m in zip(MARIGOLD_PARTS, modules)}


def abstract_marigold_counts(unet_keys: dict, vae_keys: dict, text_keys: dict,
                             resolution: int) -> dict[str, int]:
  """Parameter counts with nothing allocated."""
  builds = marigold_builds(unet_keys, vae_keys, text_keys, resolution, None,
                           tiny_clip_tokenizer())
  return parameter_counts([nnx.eval_shape(b) for b in builds])


def build_marigold(unet_keys: dict, vae_keys: dict, text_keys: dict, resolution: int,
                   steps: int, dtype):
  """(A Marigold depth pipeline with random weights, its parameter counts): Marigold depth
  v1-1's scheduler, `steps` and `resolution` as its defaults (model_index.json's)."""
  from dense_diffusion.diffusion import schedules  # pylint: disable=g-import-not-at-top
  from dense_diffusion.pipelines import MarigoldDepthPipeline  # pylint: disable=g-import-not-at-top
  tokenizer = tiny_clip_tokenizer()
  parts = random_modules(*marigold_builds(unet_keys, vae_keys, text_keys, resolution, dtype,
                                          tokenizer))
  model_index = dict(_class_name="MarigoldDepthPipeline", prediction_type="depth",
                     scale_invariant=True, shift_invariant=True,
                     default_denoising_steps=steps, default_processing_resolution=resolution)
  pipe = MarigoldDepthPipeline(*parts, tokenizer,
                               schedules.from_diffusers_config(MARIGOLD_SCHEDULER), model_index)
  return pipe, parameter_counts(parts)
