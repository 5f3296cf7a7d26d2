"""A small AutoencoderKL for synthetic_scenes (dense_diffusion/studies/vae_training.py).

    python -m dense_diffusion.main train-vae --config configs/synthetic_vae.py --workdir runs/vae
    python -m dense_diffusion.main train --config configs/demo.py --config.model.latent=True \
        --config.model.vae.pretrained=runs/vae ...

Trained on the renders and every listed task's RGB encoding, so a latent run's target is
something the VAE has seen. `arg`: `res` (image size), `steps`.

`recipe()` is the VAE every synthetic latent config uses by default (`model.vae.recipe`,
configs/demo.py): trained on first use and cached beside the data (experiment/vae_cache.py).
"""
import ml_collections
from ml_collections import config_dict

from configs import demo
from dense_diffusion.datasets import readers

# Steps of the VAE that synthetic latent runs train on first use (`recipe()`): ~2.5 CPU-minutes
# (6 minutes measured on the 2-core VM shared with other jobs); round-trip depth AbsRel 0.060
# and normals 16.9 degrees against the trivial baselines' 0.403 and 47.9 (docs/studies.md).
RECIPE_STEPS = 400
# The tasks whose encodings the VAE learns besides the renders (the pictures' tasks).
TASKS = ("depth", "normals", "semantic", "instance", "albedo", "shading", "denoise", "derain",
         "lowlight")


def get_config(arg=None):
  arg = demo.parse_arg(arg, res=32, steps=600, data="")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.vae = dict(demo.SYNTHETIC_VAE, sample_size=arg.res)  # diffusers AutoencoderKL keys, factor 4.
  c.entries = readers.synthetic_mixture(TASKS, config=arg.data or f"res{arg.res}")
  c.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: TFDS's default).
  c.steps = arg.steps  # ~3 CPU-minutes at res 32 on 2 cores.
  c.batch_size = 16  # examples per step; each gives its render and its answer's encoding.
  c.shuffle_buffer = 500  # examples per entry held for shuffling.
  c.lr = 2e-3  # peak AdamW learning rate.
  c.warmup_steps = 50
  c.weight_decay = 1e-4
  c.grad_clip_norm = 1.0
  # KL weight: small, so reconstruction dominates while the latents stay near N(0, 1).
  c.kl_weight = 1e-4
  c.log_every = 50  # steps between progress lines.
  c.ceiling_examples = 64  # evaluation examples per task for the round-trip ceiling.
  return c


def recipe(arg=None):
  """`model.vae.recipe` of the synthetic latent configs: this config at RECIPE_STEPS steps (unless
  `arg` says otherwise), without what a run supplies itself (its data_dir) or does not measure
  (the ceiling). Every recipe value but log_every is part of the cache key: changing one trains
  a new VAE."""
  c = get_config(arg or f"steps={RECIPE_STEPS}")
  del c["data_dir"]  # the run's input.data_dir: where the scenes are and the VAE is cached.
  del c["ceiling_examples"]  # a run does not measure the ceiling (main train-vae does).
  return c
