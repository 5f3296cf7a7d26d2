"""TFDS builders of the public foreground datasets in their release layouts: image matting
(P3M-10k, AM-2k) and dichotomous image segmentation (DIS5K).

Each split is a folder of images and a folder of 8-bit single-channel PNGs with the same file
stems (the alpha matte, or the binary mask with foreground 255). The manual directory may be
the dataset's own top folder or the folder that holds it:

    p3m10k   P3M-10k/train/{blurred_image,mask}                     -> split train
             P3M-10k/validation/P3M-500-P/{blurred_image,mask}      -> split p3m_500_p
             P3M-10k/validation/P3M-500-NP/{original_image,mask}    -> split p3m_500_np
    am2k     AM-2k/train/{original,mask}                            -> split train
             AM-2k/validation/{original,mask}                       -> split validation
    dis5k    DIS5K/DIS-TR/{im,gt}                                   -> split train
             DIS5K/DIS-VD/{im,gt}                                   -> split validation
             DIS5K/DIS-TE1..DIS-TE4/{im,gt}                         -> splits test1..test4

Only the splits whose folders exist are built; an image without its label (or the reverse)
stops the build with the names. Features: `image` (RGB), the label as `alpha` (matting) or
`mask` (DIS5K) u8[H, W, 1], `image/filename`. A label saved with colour channels (the same grey
in each) keeps its first channel; a 16-bit or float label is refused.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dense_diffusion.datasets import common


def read_single_channel(path: str, dataset: str, split: str, key: str) -> np.ndarray:
  """u8[H, W, 1] of an 8-bit label PNG (grey, palette, bilevel, or grey stored as RGB(A))."""
  with Image.open(path) as im:
    if im.mode in ("L", "P", "1"):
      array = np.asarray(im.convert("L"))
    elif im.mode in ("LA", "RGB", "RGBA"):
      array = np.asarray(im)[..., 0]
    else:
      raise common.BadExampleError(
          f"bad example in dataset {dataset!r} split {split!r} key {key!r}: {path} is a "
          f"{im.mode} image; expected an 8-bit label")
  return array[..., None]


class _FolderPairs:
  """What the three builders share: splits of (image folder, label folder) pairs."""

  LABEL = ""  # the label feature's name.
  TOP = ""  # the dataset's own top folder (which the manual directory may hold).
  # split -> (image folder, label folder), relative to the top folder.
  SPLITS: dict[str, tuple[str, str]] = {}

  def __init__(self, *, on_bad_example: str = "fail", **kwargs):
    self._validator = common.ExampleValidator(self.name, on_bad_example)
    super().__init__(**kwargs)

  def _features(self) -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        self.LABEL: tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "image/filename": tfds.features.Text(),
    })

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    if os.path.isdir(os.path.join(root, self.TOP)):
      root = os.path.join(root, self.TOP)
    splits = {split: self._generate_examples(split, os.path.join(root, images),
                                             os.path.join(root, labels))
              for split, (images, labels) in self.SPLITS.items()
              if os.path.isdir(os.path.join(root, images))}
    if not splits:
      wanted = ", ".join(images for images, _ in self.SPLITS.values())
      raise FileNotFoundError(f"none of the {self.name} folders ({wanted}) is in {root} (see "
                              "data/README.md)")
    return splits

  def _generate_examples(self, split, images, labels):
    for stem, image, label in common.pair_by_stem(images, labels):
      if self._validator.ok(split, stem, [image, label]):
        yield stem, {"image": image,
                     self.LABEL: read_single_channel(label, self.name, split, stem),
                     "image/filename": os.path.basename(image)}


class P3m10k(_FolderPairs, tfds.core.GeneratorBasedBuilder):
  """P3M-10k portrait matting (Li et al., ACM MM 2021): 9,421 training images with blurred
  faces, P3M-500-P (blurred) and P3M-500-NP (not blurred) for evaluation."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Get P3M-10k (https://github.com/JizhiziLi/P3M) and unzip it so that
  <manual_dir>/P3M-10k/train/blurred_image exists.
  """
  LABEL = "alpha"
  TOP = "P3M-10k"
  SPLITS = {
      "train": ("train/blurred_image", "train/mask"),
      "p3m_500_p": ("validation/P3M-500-P/blurred_image", "validation/P3M-500-P/mask"),
      "p3m_500_np": ("validation/P3M-500-NP/original_image", "validation/P3M-500-NP/mask"),
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(description=__doc__, features=self._features(),
                                          homepage="https://github.com/JizhiziLi/P3M")


class Am2k(_FolderPairs, tfds.core.GeneratorBasedBuilder):
  """AM-2k animal matting (Li et al., IJCV 2022): 1,800 training and 200 validation images."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Get AM-2k (https://github.com/JizhiziLi/GFM) and unzip it so that
  <manual_dir>/AM-2k/train/original exists.
  """
  LABEL = "alpha"
  TOP = "AM-2k"
  SPLITS = {
      "train": ("train/original", "train/mask"),
      "validation": ("validation/original", "validation/mask"),
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(description=__doc__, features=self._features(),
                                          homepage="https://github.com/JizhiziLi/GFM")


class Dis5k(_FolderPairs, tfds.core.GeneratorBasedBuilder):
  """DIS5K dichotomous image segmentation (Qin et al., ECCV 2022): DIS-TR (3,000), DIS-VD
  (470) and DIS-TE1..4 (500 each, by growing shape complexity)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Get DIS5K (https://github.com/xuebinqin/DIS) and unzip it so that
  <manual_dir>/DIS5K/DIS-TR/im exists.
  """
  LABEL = "mask"
  TOP = "DIS5K"
  SPLITS = {
      "train": ("DIS-TR/im", "DIS-TR/gt"),
      "validation": ("DIS-VD/im", "DIS-VD/gt"),
      **{f"test{i}": (f"DIS-TE{i}/im", f"DIS-TE{i}/gt") for i in range(1, 5)},
  }

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(description=__doc__, features=self._features(),
                                          homepage="https://github.com/xuebinqin/DIS")
