"""Hypersim builder."""
from dense_diffusion.datasets.hypersim.hypersim import Hypersim
