"""TFDS builder `sidd`: SIDD sRGB denoising (Abdelhamed et al. 2018).

Manual directory:

    SIDD_Medium_Srgb/Data/<scene>/*_NOISY_SRGB_*.PNG with *_GT_SRGB_*.PNG   -> split "train"
    ValidationNoisyBlocksSrgb.mat, ValidationGtBlocksSrgb.mat              -> split "validation"

The validation .mat files hold 40 images x 32 blocks of 256x256x3 uint8 under the keys
`ValidationNoisyBlocksSrgb` / `ValidationGtBlocksSrgb`; example keys are "<image>_<block>".
Features: `image` (noisy input), `clean` (ground truth).
"""
from __future__ import annotations

import glob
import os

import numpy as np
import tensorflow_datasets as tfds

from dense_diffusion.datasets import common

VALIDATION_FILES = {"image": ("ValidationNoisyBlocksSrgb.mat", "ValidationNoisyBlocksSrgb"),
                    "clean": ("ValidationGtBlocksSrgb.mat", "ValidationGtBlocksSrgb")}


class Sidd(tfds.core.GeneratorBasedBuilder):
  """SIDD-Medium sRGB pairs (train) and the 1,280 validation blocks."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://www.eecs.yorku.ca/~kamel/sidd/dataset.php download SIDD_Medium_Srgb.zip (unzip into
  the manual directory) and ValidationNoisyBlocksSrgb.mat / ValidationGtBlocksSrgb.mat (put them
  in the manual directory).
  """

  def __init__(self, *, on_bad_example: str = "fail", **kwargs):
    self._validator = common.ExampleValidator("sidd", on_bad_example)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=common.paired_image_features("png"),
        homepage="https://www.eecs.yorku.ca/~kamel/sidd/",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = {}
    data = os.path.join(root, "SIDD_Medium_Srgb", "Data")
    if os.path.isdir(data):
      splits["train"] = self._generate_examples("train", data)
    if all(os.path.exists(os.path.join(root, f)) for f, _ in VALIDATION_FILES.values()):
      splits["validation"] = self._generate_examples("validation", root)
    if not splits:
      raise FileNotFoundError(f"neither SIDD_Medium_Srgb/Data nor the validation .mat files in "
                              f"{root} (see data/README.md)")
    return splits

  def _generate_examples(self, split, path):
    if split == "train":
      yield from self._generate_train(path)
    else:
      yield from self._generate_validation(path)

  def _generate_train(self, data):
    for noisy in sorted(glob.glob(os.path.join(data, "*", "*_NOISY_SRGB_*.PNG"))):
      gt = os.path.join(os.path.dirname(noisy),
                        os.path.basename(noisy).replace("_NOISY_SRGB_", "_GT_SRGB_"))
      key = os.path.splitext(os.path.basename(noisy))[0]
      if not os.path.exists(gt):
        raise FileNotFoundError(f"sidd train {key}: no ground truth {gt}")
      if self._validator.ok("train", key, [noisy, gt]):
        yield key, {"image": noisy, "clean": gt, "image/filename": os.path.basename(noisy)}

  def _generate_validation(self, root):
    import scipy.io  # pylint: disable=g-import-not-at-top
    blocks = {}
    for feature, (filename, key) in VALIDATION_FILES.items():
      mat = scipy.io.loadmat(os.path.join(root, filename))
      if key not in mat:
        raise ValueError(f"{filename} has no variable {key!r} (has {sorted(mat)})")
      blocks[feature] = np.asarray(mat[key])
      if blocks[feature].ndim != 5 or blocks[feature].shape[-1] != 3:
        raise ValueError(f"{filename}:{key} has shape {blocks[feature].shape}, expected "
                         "(images, blocks, H, W, 3)")
    if blocks["image"].shape != blocks["clean"].shape:
      raise ValueError(f"noisy blocks {blocks['image'].shape} and ground truth "
                       f"{blocks['clean'].shape} differ in shape")
    n_img, n_blk = blocks["image"].shape[:2]
    for i in range(n_img):
      for j in range(n_blk):
        key = f"{i:02d}_{j:02d}"
        noisy, gt = blocks["image"][i, j], blocks["clean"][i, j]
        if noisy.dtype != np.uint8 or gt.dtype != np.uint8:
          raise ValueError(f"sidd validation block {key}: expected uint8, got {noisy.dtype}")
        yield key, {"image": noisy, "clean": gt, "image/filename": key}
