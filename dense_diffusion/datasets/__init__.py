"""TFDS builders of the project. Importing this package registers them with TFDS.

  synthetic_scenes  built-in procedural scenes (no download)
  ade20k            ADE20K 150-class scene parsing (manual dir: ADEChallengeData2016)
  sidd              SIDD sRGB denoising (manual dir)
  rain              Rain13K / Rain100H / Rain100L / Test100 / Test1200 / Test2800 (manual dir)
  lol               LOL low-light pairs (manual dir)
  p3m10k, am2k      P3M-10k / AM-2k image matting (manual dir; foreground/folders.py)
  dis5k             DIS5K dichotomous image segmentation (manual dir; foreground/folders.py)

NYUv2 depth and COCO panoptic come from TFDS itself (`nyu_depth_v2`, `coco/2017_panoptic`);
`readers` holds the input-pipeline entries of every dataset.
"""
from dense_diffusion.datasets import ade20k, lol, rain, sidd, synthetic_scenes  # noqa: F401
from dense_diffusion.datasets import foreground  # noqa: F401
