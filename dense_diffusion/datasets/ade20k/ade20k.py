"""TFDS builder `ade20k`: the 150-class ADE20K scene-parsing benchmark (ADEChallengeData2016).

TFDS's own `scene_parse150` holds instance-challenge annotations, not the 150-class maps, so this
builder reads the official release from a manual directory:

    <manual_dir>/ADEChallengeData2016/images/{training,validation}/*.jpg
    <manual_dir>/ADEChallengeData2016/annotations/{training,validation}/*.png

(the `ADEChallengeData2016` level may also be the manual dir itself). Annotations are single
channel: 0 = other (ignored), 1..150 = classes; the pp op `ade20k_labels` shifts them to
0..149 / 255.
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from dense_diffusion.datasets import common

_SPLITS = {"train": "training", "validation": "validation"}


class Ade20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K SceneParsing (150 classes) from ADEChallengeData2016."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and unzip it into the
  manual directory (so that <manual_dir>/ADEChallengeData2016/images exists).
  """

  def __init__(self, *, on_bad_example: str = "fail", **kwargs):
    self._validator = common.ExampleValidator("ade20k", on_bad_example)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "semantic": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
            "image/filename": tfds.features.Text(),
        }),
        homepage="http://sceneparsing.csail.mit.edu/",
        metadata=tfds.core.MetadataDict(num_classes=150, ignore_label=0),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    if os.path.isdir(os.path.join(root, "ADEChallengeData2016")):
      root = os.path.join(root, "ADEChallengeData2016")
    return {split: self._generate_examples(root, split, folder)
            for split, folder in _SPLITS.items()
            if os.path.isdir(os.path.join(root, "images", folder))}

  def _generate_examples(self, root, split, folder):
    images = os.path.join(root, "images", folder)
    labels = os.path.join(root, "annotations", folder)
    for stem, image_path, label_path in common.pair_by_stem(images, labels):
      if not self._validator.ok(split, stem, [image_path, label_path]):
        continue
      label = np.asarray(tfds.core.lazy_imports.PIL_Image.open(label_path))
      if label.ndim != 2:
        raise common.BadExampleError(
            f"bad example in dataset 'ade20k' split {split!r} key {stem!r}: annotation has shape "
            f"{label.shape}, expected a single channel")
      yield stem, {"image": image_path, "semantic": label[..., None],
                   "image/filename": os.path.basename(image_path)}
