"""TFDS builders of the project. Importing this package registers them with TFDS.

  synthetic_scenes  built-in procedural scenes (no download)
  ade20k            ADE20K 150-class scene parsing (manual dir: ADEChallengeData2016)
  sidd              SIDD sRGB denoising (manual dir)
  rain              Rain13K / Rain100H / Rain100L / Test100 / Test1200 / Test2800 (manual dir)
  lol               LOL low-light pairs (manual dir)
  hypersim          Hypersim synthetic indoor scenes (manual dir; configs depth, all)
  vkitti2           Virtual KITTI 2 synthetic drives (manual dir; configs depth, all)
  pseudo_labelled   a folder of images with teachers' answers (made by `main pseudo-label`)
  p3m10k, am2k      P3M-10k / AM-2k image matting (manual dir; foreground/folders.py)
  dis5k             DIS5K dichotomous image segmentation (manual dir; foreground/folders.py)
  refcoco           RefCOCO / RefCOCO+ / RefCOCOg referring segmentation (manual dir; configs
                    refcoco_unc, refcoco+_unc, refcocog_umd)

NYUv2 depth and COCO panoptic come from TFDS itself (`nyu_depth_v2`, `coco/2017_panoptic`);
`readers` holds the input-pipeline entries of every dataset.
"""
try:
  import tensorflow_datasets as _tfds
except ImportError:
  # Optional heavy dependency absent on GPU machines (bench/device_check.sh): only the builders
  # need it, while every config imports `readers` (entries are plain dicts) and so this package.
  # Without TFDS the builders stay unregistered; whatever reads data imports tfds itself and
  # fails there, naming it.
  _tfds = None
if _tfds is not None:
  from dense_diffusion.datasets import ade20k, lol, rain, sidd, synthetic_scenes  # noqa: F401
  from dense_diffusion.datasets import hypersim, vkitti2  # noqa: F401  (synthetic training sets)
  from dense_diffusion.datasets import pseudo_labelled  # noqa: F401  (main pseudo-label's sets)
  from dense_diffusion.datasets import foreground  # noqa: F401  (matting / DIS folders)
  from dense_diffusion.datasets import refcoco  # noqa: F401  (referring segmentation)
