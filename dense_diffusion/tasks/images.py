"""Tasks whose answer is itself an image: restoration and albedo."""
from __future__ import annotations

import dataclasses

import numpy as np

from dense_diffusion.tasks import base


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


@dataclasses.dataclass(frozen=True)
class ImageTask(base.Task):
  """The answer is an RGB image: uint8 or float [0, 1] in, float [0, 1] out."""

  def _encode(self, image):
    return image_to_unit(image, self.name) * 2.0 - 1.0

  def _decode_batch(self, rgb):
    return (rgb + 1.0) * 0.5


def _image_task(name: str, prompt: str, input_is_estimate: bool):
  cls = dataclasses.make_dataclass(
      f"{name.capitalize()}Task",
      [("name", str, dataclasses.field(default=name)),
       ("prompt", str, dataclasses.field(default=prompt)),
       ("input_is_estimate", bool, dataclasses.field(default=input_is_estimate))],
      bases=(ImageTask,), frozen=True)
  cls.__doc__ = f"{prompt}: the answer is the clean RGB image."
  return base.register(name)(cls)


# Restoration's input is the degraded answer itself; albedo's input is not its answer (shading
# and shadows are in it), so it starts from no prior on the input.
DenoiseTask = _image_task("denoise", "Perform image denoising", input_is_estimate=True)
DerainTask = _image_task("derain", "Perform image deraining", input_is_estimate=True)
LowlightTask = _image_task("lowlight", "Perform low-light enhancement", input_is_estimate=True)
AlbedoTask = _image_task("albedo", "Perform albedo estimation", input_is_estimate=False)
