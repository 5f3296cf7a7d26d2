"""LOL low-light builder."""
from dense_diffusion.datasets.lol.lol import Lol
