"""Pixels or latents? The generalist with the same UNet in RGB pixel space and in the latent
space of a small VAE trained first on these scenes (`main train-vae`; the study's ceiling rows
show what each space can keep of every task's answer at all). The seed paper's claim: the
VAE's compression hurts segmentation. Depth, normals, semantic, denoising.

    python -m dense_diffusion.main study --study pixel_vs_latent --workdir runs/studies
"""
from dense_diffusion.launch.sweep import sweep
from dense_diffusion.studies import spec

CONFIG = "configs/study.py"
CONFIG_ARG = "arm=generalist,tasks=depth+normals+semantic+denoise,vae={vae}"
NAME = "pixel_vs_latent"
VAE = "configs/synthetic_vae.py"  # trained once into <root>/pixel_vs_latent/vae.
SCALES = spec.STANDARD_SCALES  # the shared CPU and accelerator budgets.


def get_sweep():
  return [{"name": "pixels", "model.latent": False}, {"name": "latent", "model.latent": True}]
