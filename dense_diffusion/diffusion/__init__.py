"""Diffusion core: schedules, objectives, samplers and the per-mode registry (`modes.get`)."""
from dense_diffusion.diffusion import modes
from dense_diffusion.diffusion import objectives
from dense_diffusion.diffusion import samplers
from dense_diffusion.diffusion import schedules

__all__ = ["modes", "objectives", "samplers", "schedules"]
