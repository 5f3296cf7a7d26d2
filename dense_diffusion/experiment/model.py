"""Builds a run's model from the `model` section of its config, with its pretrained parts.

This is assembly: it reads checkpoints through `convert/` and builds `models/`, which know
nothing of configs or checkpoints files (models/ never imports convert/).
"""
from __future__ import annotations

from typing import Any, Sequence

from absl import logging
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dense_diffusion import errors
from dense_diffusion import tasks as tasks_lib
from dense_diffusion.convert import clip
from dense_diffusion.convert import common
from dense_diffusion.convert import unet as unet_convert
from dense_diffusion.convert import vae as vae_convert
from dense_diffusion.experiment import trainable as trainable_lib
from dense_diffusion.models import generalist
from dense_diffusion.models import image_encoder as image_encoder_lib
from dense_diffusion.models import lora
from dense_diffusion.models import text_encoder as text_encoder_lib
from dense_diffusion.models import tokenizer as tokenizer_lib
from dense_diffusion.models import vae as vae_lib

VAE_PATH = "vae"  # the model attribute (and parameter path) of the latent space's VAE.

DTYPES = {"float32": None, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def compute_dtype(name: str):
  if name not in DTYPES:
    raise errors.ConfigError(f"model.dtype={name!r}; choose one of {sorted(DTYPES)}")
  return DTYPES[name]


def prompt_embeddings(model_config: Any, prompts: Sequence[str]) -> np.ndarray | None:
  """Frozen text-encoder embeddings [T, L, D] of the task prompts, or None (learned tokens)."""
  path = model_config.get("text_encoder")
  if not path:
    return None
  encoder = clip.load_transformers_clip_text(path)
  tokenizer = tokenizer_lib.CLIPTokenizer.from_folder(path)
  emb = text_encoder_lib.embed_prompts(
      encoder, tokenizer, prompts, skip_last_layers=int(model_config.get("text_skip_layers", 0)))
  logging.info("cached text embeddings of %d prompts: %s", len(prompts), emb.shape)
  return np.asarray(emb)


def pooled_prompt_embeddings(model_config: Any, unet_config: dict, prompts: Sequence[str]
                             ) -> np.ndarray | None:
  """The prompts' pooled text embeddings [T, D] when the UNet projects them into its timestep
  embedding (`class_embed_type="projection"`) and a text encoder gives the prompts; else None
  (learned task tokens pool their own)."""
  if not model_config.get("text_encoder") or unet_config.get("class_embed_type") != "projection":
    return None
  return embed_texts(model_config, prompts, pooled=True)


def projection_width(unet_config: dict, architecture: dict) -> None:
  """Fills `projection_class_embeddings_input_dim` of a UNet that projects its prompts' pooled
  embedding (`class_embed_type="projection"`) when the config leaves it out: the pooled
  embedding is as wide as the prompt's tokens, the `cross_attention_dim` of the UNet's
  `architecture` (its own config, or the pretrained checkpoint's)."""
  if (unet_config.get("class_embed_type") == "projection"
      and not unet_config.get("projection_class_embeddings_input_dim")):
    unet_config["projection_class_embeddings_input_dim"] = int(
        architecture.get("cross_attention_dim", 1280))


def input_residual_init(model_config: Any, task_objects: Sequence[tasks_lib.Task]
                        ) -> list[float] | None:
  """Per-task initial gates of the input residual (1 where the input estimates the answer)."""
  if not model_config.get("input_residual", False):
    return None
  return [1.0 if t.input_is_estimate else 0.0 for t in task_objects]


VAE_KEYS = frozenset({"pretrained", "recipe", "config", "dtype", "trainable", "remat_decoder"})


def _vae_section(model_config: Any) -> dict:
  vae_config = dict(model_config.get("vae") or {})
  unknown = sorted(set(vae_config) - VAE_KEYS)
  if unknown:
    raise errors.ConfigError(f"model.vae has unknown keys {unknown}; known: {sorted(VAE_KEYS)}")
  if vae_config.get("recipe") and vae_config.get("config"):
    raise errors.ConfigError(
        "model.vae.recipe (a VAE trained on first use) and model.vae.config (a random VAE, for "
        "plumbing tests) are both set: set model.vae.config={} or model.vae.recipe=None")
  return vae_config


def vae_source(model_config: Any) -> str | None:
  """Where the latent space's VAE comes from: "pretrained" (`model.vae.pretrained`, a folder),
  "recipe" (`model.vae.recipe`, trained on first use: experiment/vae_cache.py), "random"
  (`model.vae.config`, initialised, for plumbing tests), or None (nothing says)."""
  vae_config = _vae_section(model_config)
  for source, key in (("pretrained", "pretrained"), ("recipe", "recipe"), ("random", "config")):
    if vae_config.get(key):
      return source
  return None


def vae_architecture(model_config: Any) -> vae_lib.VAEConfig | None:
  """The VAE's architecture when the config holds it (a recipe or a random VAE's config), without
  building or training anything; None for a pretrained folder (its config.json says)."""
  vae_config = _vae_section(model_config)
  source = vae_source(model_config)
  if source not in ("recipe", "random"):
    return None
  arch = vae_config["recipe"]["vae"] if source == "recipe" else vae_config["config"]
  try:
    return vae_lib.VAEConfig.from_dict(dict(arch))
  except (TypeError, ValueError) as e:
    raise errors.ConfigError(f"model.vae.{source if source == 'recipe' else 'config'}: {e}"
                             ) from None


def check_random_vae(stuck_modules: Sequence[str]) -> None:
  """A random frozen VAE cannot represent answers: refused (a one-line ConfigError saying what to
  set) when the VAE is among the modules whose fresh parameters stay frozen without
  `model.allow_frozen_fresh` covering them (`TrainableSet.fresh_frozen_not_allowed`)."""
  if VAE_PATH in stuck_modules:
    raise errors.ConfigError(
        "model.latent with a random frozen VAE (model.vae.config) cannot represent the answers: "
        "set model.vae.pretrained=FOLDER (a diffusers AutoencoderKL, or what `main train-vae` "
        "wrote) or model.vae.recipe (configs/synthetic_vae.py's config, trained on first use), "
        "or say model.allow_frozen_fresh=('vae',) to test the plumbing only")


def build_vae(model_config: Any, *, seed: int = 0, data_dir: str | None = None,
              shapes_only: bool = False) -> vae_lib.AutoencoderKL:
  """The latent space's VAE (`model.vae`): a diffusers AutoencoderKL folder
  (`model.vae.pretrained`); else the synthetic VAE of `model.vae.recipe`, trained on first use
  and cached beside `data_dir` (experiment/vae_cache.py); else one initialised from
  `model.vae.config` (diffusers keys).

  `shapes_only`: the build is traced for shapes (`nnx.eval_shape`): a recipe's VAE is
  initialised from its architecture instead of being trained.
  """
  vae_config = _vae_section(model_config)
  dtype = compute_dtype(vae_config.get("dtype") or model_config.get("dtype", "float32"))
  source = vae_source(model_config)
  if source == "recipe" and not shapes_only:
    from dense_diffusion.experiment import vae_cache  # pylint: disable=g-import-not-at-top
    vae_config["pretrained"] = vae_cache.ensure(vae_config["recipe"], data_dir)
    source = "pretrained"
  if source == "pretrained":
    try:
      return vae_convert.load_diffusers_vae(vae_config["pretrained"], dtype=dtype, seed=seed)
    except FileNotFoundError as e:
      raise errors.MissingError(f"model.vae.pretrained={vae_config['pretrained']!r}: {e}"
                                ) from None
  if source is None:
    raise errors.ConfigError("model.latent needs a VAE: model.vae.pretrained (a diffusers "
                             "AutoencoderKL or pipeline folder), model.vae.recipe "
                             "(configs/synthetic_vae.py's config) or model.vae.config")
  return vae_lib.AutoencoderKL(vae_architecture(model_config), dtype=dtype, rngs=nnx.Rngs(seed))


def unet_config_for_space(model_config: Any, vae: vae_lib.AutoencoderKL | None,
                          paradigm: Any = None, checkpoint: dict | None = None) -> dict:
  """`model.unet` with the keys the space and the paradigm set: in_channels and out_channels
  (`Paradigm.unet_channels`: by default answer + condition in, the answer out: 3 + 3 and 3 for
  pixels, 2 x 4 and 4 for SD latents, as Marigold; VPD's backbone sees the image alone), and,
  in latent space, the diffusers `sample_size` of the latents (`model.unet.sample_size` is the
  image size in both spaces). So a pixel and a latent run of one config differ in
  `model.latent` alone. A projected pooled prompt without its width gets the prompt tokens'
  width (`projection_width`; `checkpoint`: the pretrained UNet's config, whose it then is)."""
  unet_config = dict(model_config.unet)
  projection_width(unet_config, checkpoint or unet_config)
  channels = vae.config.latent_channels if vae is not None else 3
  space = "latent" if vae is not None else "pixel"
  in_ch, out_ch = (paradigm.unet_channels(channels) if paradigm is not None
                   else (2 * channels, channels))
  for key, want in (("in_channels", in_ch), ("out_channels", out_ch)):
    if unet_config.get(key, want) != want:
      raise errors.ConfigError(f"model.unet.{key}={unet_config[key]} does not fit the {space} "
                               f"space ({want}); remove it: the space sets it")
    unet_config[key] = want
  if vae is not None and "sample_size" in unet_config:
    factor = vae.config.downsample_factor
    if int(unet_config["sample_size"]) % factor:
      raise errors.ConfigError(f"model.unet.sample_size={unet_config['sample_size']} (the "
                               f"image size) is not a multiple of the VAE's factor {factor}")
    unet_config["sample_size"] = int(unet_config["sample_size"]) // factor
  return unet_config


def build_model(model_config: Any, task_objects: Sequence[tasks_lib.Task], *,
                paradigm: Any = None, seed: int = 0,
                provenance: trainable_lib.Provenance | None = None,
                data_dir: str | None = None, shapes_only: bool = False
                ) -> generalist.GeneralistModel:
  """The network for these tasks (their order is the `task` index of batches), with the VAE of
  the latent space (`model.latent`) and the modules the paradigm adds (`add_modules`).

  Every `model.pretrained_*` key (and `model.vae.pretrained`) takes a diffusers / transformers
  folder or a folder written by `main convert`. `provenance`, when given, records which
  parameters came from those checkpoints (the trainable set's "fresh" / "pretrained").
  `data_dir` (the run's TFDS data_dir) and `shapes_only` are `build_vae`'s.
  """
  provenance = provenance if provenance is not None else trainable_lib.Provenance()
  prompts = [t.prompt for t in task_objects]
  dtype = compute_dtype(model_config.get("dtype", "float32"))
  vae = (build_vae(model_config, seed=seed, data_dir=data_dir, shapes_only=shapes_only)
         if model_config.get("latent") else None)
  if model_config.get("zero_init_output") and model_config.get("pretrained_unet"):
    raise errors.ConfigError("model.zero_init_output would discard the pretrained UNet's "
                             "conv_out: set it only for randomly initialised UNets")
  ckpt_config = None
  if model_config.get("pretrained_unet"):
    try:
      ckpt_config = common.read_config(model_config.pretrained_unet, unet_convert.SUBFOLDER)
    except FileNotFoundError as e:
      raise errors.MissingError(f"model.pretrained_unet={model_config.pretrained_unet!r}: {e}"
                                ) from None
  unet_config = unet_config_for_space(model_config, vae, paradigm, checkpoint=ckpt_config)
  # What the generalist concatenates to x_t (none for a backbone that sees the image alone).
  condition_channels = unet_config["in_channels"] - unet_config["out_channels"]
  unet = None
  if ckpt_config is not None:
    # The run's own channels (its space and paradigm) and classes (the generalist's tasks, or
    # its prompts' pooled embeddings, when model.unet asks for them); the rest of the
    # architecture is the checkpoint's.
    overrides = dict(in_channels=unet_config["in_channels"],
                     out_channels=unet_config["out_channels"])
    for key in unet_convert.CLASS_EMBEDDING_KEYS:  # a class embedding of the run's own.
      if unet_config.get(key):
        overrides[key] = unet_config[key]
    provenance.add("unet", unet_convert.fresh_params(ckpt_config, **overrides))
    unet = unet_convert.load_diffusers_unet(
        model_config.pretrained_unet, input_widening=model_config.get("input_widening",
                                                                      "copy_scale"),
        dtype=dtype, remat=model_config.get("remat", False), seed=seed, **overrides)
  image_options = dict(model_config.get("image_encoder_options") or {})
  vision_config = None
  if model_config.get("image_encoder"):
    vision_config = image_encoder_lib.CLIPVisionConfig(**dict(model_config.image_encoder))
  rngs = nnx.Rngs(seed)
  model = generalist.GeneralistModel(
      unet_config, num_tasks=len(prompts), image_encoder_config=vision_config,
      image_encoder_options=image_options, prompt_embeddings=prompt_embeddings(
          model_config, prompts), pooled_prompt_embeddings=pooled_prompt_embeddings(
              model_config, unet_config, prompts),
      num_task_tokens=int(model_config.get("num_task_tokens", 4)),
      task_token_init_std=float(model_config.get("task_token_init_std", 0.02)),
      input_residual_init=input_residual_init(model_config, task_objects), dtype=dtype,
      remat=model_config.get("remat", False), rngs=rngs, unet=unet,
      condition_channels=condition_channels)
  if vae is not None:
    setattr(model, VAE_PATH, vae)
    if vae_source(model_config) in ("pretrained", "recipe"):
      provenance.add(VAE_PATH)  # trained weights (a recipe's: trained first, or cached).
  if model_config.get("zero_init_output"):
    # ADM (guided-diffusion) starts its output conv at zero: the first answers are the input
    # residual alone (restoration: the input; other tasks: grey) instead of random images.
    conv_out = model.unet.conv_out
    conv_out.kernel[...] = jnp.zeros_like(conv_out.kernel[...])
  if model_config.get("pretrained_image_encoder"):
    loaded = clip.load_transformers_clip_vision(
        model_config.pretrained_image_encoder,
        context_dim=model.unet.config["cross_attention_dim"], dtype=dtype, seed=seed,
        **image_options)
    model.image_encoder = loaded
    provenance.add("image_encoder", fresh=("proj",))  # the projection to the context width.
  if model_config.get("lora"):
    opts = dict(model_config.lora)
    names = lora.apply_lora(model.unet, opts.pop("pattern", lora.DEFAULT_PATTERN), rngs=rngs,
                            **opts)
    logging.info("LoRA on %d layers", len(names))
  if paradigm is not None:
    embed = None
    if model_config.get("text_encoder"):
      embed = lambda prompts, pooled: embed_texts(model_config, prompts, pooled=pooled)
    paradigm.add_modules(model, model_config, rngs, embed_text=embed)
  return model


def embed_texts(model_config: Any, prompts: Sequence[str], *, pooled: bool) -> np.ndarray:
  """Frozen text-encoder embeddings of prompts: [P, L, D], or [P, D] pooled (the hidden state
  at each prompt's end-of-text token, as CLIP's pooled output)."""
  encoder = clip.load_transformers_clip_text(model_config.text_encoder)
  tokenizer = tokenizer_lib.CLIPTokenizer.from_folder(model_config.text_encoder)
  emb = np.asarray(text_encoder_lib.embed_prompts(
      encoder, tokenizer, prompts, skip_last_layers=int(model_config.get("text_skip_layers", 0))))
  if not pooled:
    return emb
  ids = np.asarray(tokenizer(list(prompts)))
  ends = np.argmax(ids == tokenizer.eos_id, axis=1)
  return emb[np.arange(len(prompts)), ends]
