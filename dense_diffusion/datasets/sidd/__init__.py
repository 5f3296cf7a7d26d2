"""SIDD denoising builder."""
from dense_diffusion.datasets.sidd.sidd import Sidd
