"""Pseudo-labelled sets (made by `main pseudo-label`)."""
from dense_diffusion.datasets.pseudo_labelled.pseudo_labelled import PseudoLabelled
