"""ADE20K (ADEChallengeData2016) builder."""
from dense_diffusion.datasets.ade20k.ade20k import Ade20k
