"""Diffusion core: noise schedules, objectives and samplers (the paradigms build on them)."""
from dense_diffusion.diffusion import objectives
from dense_diffusion.diffusion import samplers
from dense_diffusion.diffusion import schedules

__all__ = ["objectives", "samplers", "schedules"]
