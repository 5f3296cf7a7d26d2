"""Tasks whose answer is itself an image: restoration (denoise, derain, low-light) and albedo."""
from __future__ import annotations

import dataclasses

import numpy as np

from dense_diffusion import metrics
from dense_diffusion.tasks import base
from dense_diffusion.tasks import outputs


def image_to_unit(image: np.ndarray, task_name: str) -> np.ndarray:
  """uint8 [0, 255] or float [0, 1] image (H, W, 3) -> f32 in [0, 1]."""
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{task_name}.encode expects an RGB image (H, W, 3), got shape {image.shape}")
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if not np.issubdtype(image.dtype, np.floating):
    raise ValueError(f"{task_name}.encode expects uint8 or float in [0, 1], got {image.dtype}")
  if image.size and (image.min() < -1e-6 or image.max() > 1 + 1e-6):
    raise ValueError(
        f"{task_name}.encode got float values in [{image.min():.3g}, {image.max():.3g}]; "
        "float images must be in [0, 1] (pass uint8 for 0..255)")
  return image.astype(np.float32)


class ImageEvaluator(base.Evaluator):
  """PSNR / SSIM against the true image; baseline: the (degraded) input image itself."""
  KEYS = ("psnr", "ssim")

  def __init__(self, task):
    super().__init__(task)
    self.model, self.baseline = metrics.RestorationMetrics(1.0), metrics.RestorationMetrics(1.0)

  def update(self, answers, truths, inputs):
    for pred, gt, x in zip(answers, truths, inputs):
      gt = image_to_unit(gt, self.task.name)
      self.model.update(np.clip(pred, 0, 1), gt)
      x01 = base.resize_map((np.asarray(x, np.float32) + 1.0) * 0.5, *gt.shape[:2],
                            nearest=False)
      self.baseline.update(np.clip(x01, 0, 1), gt)

  def result(self):
    model, baseline = self.model.result(), self.baseline.result()
    return {**{k: float(model[k]) for k in self.KEYS},
            "baseline": {k: float(baseline[k]) for k in self.KEYS}}


@dataclasses.dataclass(frozen=True)
class ImageTask(base.Task):
  """The answer is an RGB image: uint8 or float [0, 1] in, float [0, 1] out."""

  label_key = "clean"
  headline = "psnr"
  higher_is_better = True

  def _encode(self, image):
    return image_to_unit(image, self.name) * 2.0 - 1.0

  def _decode_batch(self, rgb):
    return (rgb + 1.0) * 0.5

  def evaluator(self):
    return ImageEvaluator(self)

  def write(self, out, stem, image, rgb01):
    """`X_<task>.png`: 8-bit RGB."""
    return [outputs.save_png(out / f"{stem}_{self.name}.png", outputs.u8(rgb01))]


# Restoration's input is the degraded answer itself (`input_is_estimate`); in synthetic_scenes
# the clean render is the answer and a degraded render the input.
@base.register("denoise")
@dataclasses.dataclass(frozen=True)
class DenoiseTask(ImageTask):
  """Perform image denoising: the answer is the clean RGB image."""
  name: str = "denoise"
  prompt: str = "Perform image denoising"
  input_is_estimate: bool = True
  synthetic_source = (("image", "clean"), ("noisy", "image"))


@base.register("derain")
@dataclasses.dataclass(frozen=True)
class DerainTask(ImageTask):
  """Perform image deraining: the answer is the clean RGB image."""
  name: str = "derain"
  prompt: str = "Perform image deraining"
  input_is_estimate: bool = True
  synthetic_source = (("image", "clean"), ("rainy", "image"))


@base.register("lowlight")
@dataclasses.dataclass(frozen=True)
class LowlightTask(ImageTask):
  """Perform low-light enhancement: the answer is the clean RGB image."""
  name: str = "lowlight"
  prompt: str = "Perform low-light enhancement"
  input_is_estimate: bool = True
  synthetic_source = (("image", "clean"), ("dark", "image"))


# Albedo's input is not its answer (shading and shadows are in it): no prior on the input.
@base.register("albedo")
@dataclasses.dataclass(frozen=True)
class AlbedoTask(ImageTask):
  """Perform albedo estimation: the answer is the reflectance as an RGB image."""
  name: str = "albedo"
  prompt: str = "Perform albedo estimation"
  label_key = "albedo"
