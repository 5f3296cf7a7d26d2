"""TFDS builder `rain`: deraining pairs in the Rain13K / Rain100 layout (MPRNet / Restormer).

Manual directory layout, pairs matched by file name:

    train/{input,target}/*                       -> split "train" (Rain13K)
    test/<set>/{input,target}/*, <set> in Rain100H, Rain100L, Test100, Test1200, Test2800
                                                 -> splits "rain100h", "rain100l", ...

Only the sets present are built. Features: `image` (rainy input), `clean` (target).
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from dense_diffusion.datasets import common

TEST_SETS = ("Rain100H", "Rain100L", "Test100", "Test1200", "Test2800")


class Rain(tfds.core.GeneratorBasedBuilder):
  """Rain13K training pairs and the Rain100H/L, Test100/1200/2800 test sets."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the deraining train/test sets used by MPRNet / Restormer
  (https://github.com/swz30/MPRNet/blob/main/Deraining/README.md) and unzip them so that
  <manual_dir>/train/input and <manual_dir>/test/Rain100H/input exist.
  """

  def __init__(self, *, on_bad_example: str = "fail", **kwargs):
    self._validator = common.ExampleValidator("rain", on_bad_example)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=common.paired_image_features(),
        homepage="https://github.com/swz30/MPRNet",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    folders = {"train": os.path.join(root, "train")}
    folders.update({s.lower(): os.path.join(root, "test", s) for s in TEST_SETS})
    splits = {split: self._generate_examples(split, folder) for split, folder in folders.items()
              if os.path.isdir(folder)}
    if not splits:
      raise FileNotFoundError(f"no train/ or test/<set>/ folder in {root} (see data/README.md)")
    return splits

  def _generate_examples(self, split, folder):
    for stem, rainy, clean in common.pair_by_stem(os.path.join(folder, "input"),
                                                  os.path.join(folder, "target")):
      if self._validator.ok(split, stem, [rainy, clean]):
        yield stem, {"image": rainy, "clean": clean, "image/filename": os.path.basename(rainy)}
