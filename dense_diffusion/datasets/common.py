"""Helpers shared by the folder-reading builders: pairing files and validating examples."""
from __future__ import annotations

import os
from typing import Iterable

from absl import logging
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def paired_image_features(encoding_format: str | None = None) -> tfds.features.FeaturesDict:
  """Features of a restoration pair: degraded `image`, `clean` target, source file name."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
      "clean": tfds.features.Image(shape=(None, None, 3), encoding_format=encoding_format),
      "image/filename": tfds.features.Text(),
  })


class BadExampleError(ValueError):
  """A corrupt image or a label whose size differs from its image (dataset, split, key in msg)."""


def image_size(path: str) -> tuple[int, int]:
  """(height, width) of an image file, fully decoding it so truncated files are caught."""
  with Image.open(path) as im:
    im.load()
    return im.size[1], im.size[0]


def list_images(folder: str) -> list[str]:
  """Sorted image file names (not paths) in `folder`."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"expected folder {folder} (see data/README.md for the layout)")
  return sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))


def pair_by_stem(a_dir: str, b_dir: str) -> list[tuple[str, str, str]]:
  """[(key, a path, b path)] of files with the same stem in two folders; unmatched files raise."""
  a = {os.path.splitext(f)[0]: f for f in list_images(a_dir)}
  b = {os.path.splitext(f)[0]: f for f in list_images(b_dir)}
  if set(a) != set(b):
    only_a, only_b = sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5]
    raise ValueError(f"unpaired files between {a_dir} and {b_dir}: only in the first {only_a}, "
                     f"only in the second {only_b}")
  return [(s, os.path.join(a_dir, a[s]), os.path.join(b_dir, b[s])) for s in sorted(a)]


class ExampleValidator:
  """Checks that every image of an example decodes and all share one size.

  on_bad_example="fail" raises BadExampleError; "skip" logs and records the example in `skipped`.
  """

  def __init__(self, dataset: str, on_bad_example: str = "fail"):
    if on_bad_example not in ("fail", "skip"):
      raise ValueError(f"on_bad_example must be 'fail' or 'skip', got {on_bad_example!r}")
    self.dataset = dataset
    self.on_bad_example = on_bad_example
    self.skipped: list[str] = []

  def ok(self, split: str, key: str, images: Iterable) -> bool:
    """images: file paths or arrays [H, W, ...]; returns whether the example is good."""
    sizes, reason = [], ""
    for item in images:
      if isinstance(item, np.ndarray):
        sizes.append(tuple(item.shape[:2]))
        continue
      try:
        sizes.append(image_size(item))
      except Exception as e:  # noqa: BLE001  (any decoder failure = corrupt file)
        reason = f"{item} does not decode ({type(e).__name__}: {e})"
        break
    if not reason and len(set(sizes)) > 1:
      reason = f"image/label sizes differ: {sizes}"
    if not reason:
      return True
    return self.reject(split, key, reason)

  def reject(self, split: str, key: str, reason: str) -> bool:
    """Reports a bad example found by a builder's own checks (a missing or unreadable file):
    raises BadExampleError ("fail") or logs and records it ("skip"); returns False."""
    msg = f"bad example in dataset {self.dataset!r} split {split!r} key {key!r}: {reason}"
    if self.on_bad_example == "fail":
      raise BadExampleError(msg)
    logging.warning("skipping %s", msg)
    self.skipped.append(msg)
    return False
