"""Deraining builder."""
from dense_diffusion.datasets.rain.rain import Rain
