"""TFDS builder `lol`: the LOL low-light enhancement pairs (Wei et al. 2018), 400x600.

Manual directory layout: `our485/{low,high}/*.png` (485 training pairs) and
`eval15/{low,high}/*.png` (15 evaluation pairs), paired by file name. Features: `image` (the
low-light input) and `clean` (the normal-light target).
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds

from dense_diffusion.datasets import common

_SPLITS = {"train": "our485", "validation": "eval15"}


class Lol(tfds.core.GeneratorBasedBuilder):
  """LOL: low-light / normal-light image pairs."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the LOL dataset (https://daooshee.github.io/BMVC2018website/) and unzip it so that
  <manual_dir>/our485/low and <manual_dir>/eval15/low exist (a `LOLdataset` level is accepted).
  """

  def __init__(self, *, on_bad_example: str = "fail", **kwargs):
    self._validator = common.ExampleValidator("lol", on_bad_example)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=common.paired_image_features("png"),
        homepage="https://daooshee.github.io/BMVC2018website/",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    if os.path.isdir(os.path.join(root, "LOLdataset")):
      root = os.path.join(root, "LOLdataset")
    splits = {s: self._generate_examples(root, s, f) for s, f in _SPLITS.items()
              if os.path.isdir(os.path.join(root, f))}
    if not splits:
      raise FileNotFoundError(f"no our485/ or eval15/ folder in {root} (see data/README.md)")
    return splits

  def _generate_examples(self, root, split, folder):
    for stem, low, high in common.pair_by_stem(os.path.join(root, folder, "low"),
                                               os.path.join(root, folder, "high")):
      if self._validator.ok(split, stem, [low, high]):
        yield stem, {"image": low, "clean": high, "image/filename": os.path.basename(low)}
