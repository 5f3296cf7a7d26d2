"""A small AutoencoderKL for synthetic_scenes (dense_diffusion/studies/vae_training.py).

    python -m dense_diffusion.main train-vae --config configs/synthetic_vae.py --workdir runs/vae
    python -m dense_diffusion.main train --config configs/demo.py --config.model.latent=True \
        --config.model.vae.pretrained=runs/vae ...

Trained on the renders and every listed task's RGB encoding, so a latent run's target is
something the VAE has seen. `arg`: `res` (image size), `steps`.
"""
import ml_collections
from ml_collections import config_dict

from configs import demo
from dense_diffusion.datasets import readers

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
