"""TFDS builders of the project. Importing this package registers them with TFDS.

  synthetic_scenes  built-in procedural scenes (no download)
"""
from dense_diffusion.datasets import synthetic_scenes
