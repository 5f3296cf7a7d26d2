"""Foreground datasets in their release layouts: P3M-10k, AM-2k (matting), DIS5K."""
from dense_diffusion.datasets.foreground.folders import Am2k
from dense_diffusion.datasets.foreground.folders import Dis5k
from dense_diffusion.datasets.foreground.folders import P3m10k
