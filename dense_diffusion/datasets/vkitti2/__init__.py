"""Virtual KITTI 2 builder."""
from dense_diffusion.datasets.vkitti2.vkitti2 import VirtualKitti2
