"""Referring image segmentation (RefCOCO, RefCOCO+, RefCOCOg; VPD's text-driven benchmark): the
binary mask of the one object that a free-text expression describes.

answer   the referred object's mask bool[H, W] (u8 accepted: > 128, as the RefCOCO builder stores
         it 0 / 255; float: > 0.5), painted like `dichotomous`: grey, black (-1) / white (+1).
decoded  the soft map f32[H, W] in [0, 1] (the channel mean); it is resized to the truth's size
         as a map and then thresholded at 0.5 by the metrics and the writer.
prompt   per example: the expression, the example's `prompt` feature (`prompt_key`); the task's
         own `prompt` is only the generic fallback for an example without one
         (`example_prompt`). Feeding the expression to the model (the text encoder's
         cross-attention context) is not wired into the drivers yet (docs/tasks.md).

Metrics (metrics/referring.py): overall IoU (headline, as VPD and LAVT report), mean IoU and
precision at IoU 0.5 .. 0.9. Trivial baseline: the whole image as the mask (what a model that
ignores the expression and the image can always answer; its IoU is the object's share of the
image).
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import numpy as np

from dense_diffusion import metrics
from dense_diffusion.metrics import referring as referring_metrics
from dense_diffusion.tasks import base
from dense_diffusion.tasks import matting
from dense_diffusion.tasks import outputs

MASK_THRESHOLD = referring_metrics.SOFT_THRESHOLD  # soft map -> binary mask (metrics, files).
OVERLAY_COLOUR = (255, 64, 64)  # the referred object's colour in the overlay file.


class ReferringEvaluator(base.Evaluator):
  """oIoU, mIoU, prec_0.5..0.9 of the thresholded maps; baseline: the whole image."""
  KEYS = referring_metrics.REFERRING_KEYS

  def __init__(self, task):
    super().__init__(task)
    self.model, self.baseline = metrics.ReferringMetrics(), metrics.ReferringMetrics()

  def update(self, answers, truths, inputs):
    for pred, gt in zip(answers, truths):
      gt = matting.binary_mask(gt, self.task.name)
      self.model.update(np.asarray(pred) > MASK_THRESHOLD, gt)
      self.baseline.update(np.ones_like(gt), gt)

  def result(self):
    model, baseline = self.model.result(), self.baseline.result()
    return {**{k: float(model[k]) for k in self.KEYS},
            "baseline": {k: float(baseline[k]) for k in self.KEYS}}


@base.register("referring")
@dataclasses.dataclass(frozen=True)
class ReferringTask(base.Task):
  """The referred object's binary mask as black (-1) / white (+1); decoded to a soft map."""

  name: str = "referring"
  prompt: str = "Perform referring segmentation"  # fallback: the expression is per example.

  label_key = "mask"
  # The example feature holding the referring expression (a string) of that example.
  prompt_key: ClassVar[str] = "prompt"
  headline = "oiou"
  higher_is_better = True

  def _encode(self, mask):
    return base.grey(matting.binary_mask(mask, self.name).astype(np.float32))

  def _decode_batch(self, rgb):
    return base.channel_mean01(rgb)

  def example_prompt(self, example: Mapping[str, Any]) -> str:
    """The expression of one example (its `prompt_key` feature, str or bytes), or the task's
    generic prompt when the example carries none."""
    text = example.get(self.prompt_key)
    if text is None:
      return self.prompt
    text = np.asarray(text).item() if not isinstance(text, (str, bytes)) else text
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)

  def evaluator(self):
    return ReferringEvaluator(self)

  def write(self, out, stem, image, foreground):
    """`X_mask.png`: the binary mask (0 / 255, thresholded at 0.5); `X_overlay.png`: the input
    with the referred object tinted."""
    mask = np.asarray(foreground) > MASK_THRESHOLD
    colours = np.broadcast_to(np.asarray(OVERLAY_COLOUR, np.float32), (*mask.shape, 3))
    return [outputs.save_png(out / f"{stem}_mask.png", (255 * mask).astype(np.uint8)),
            outputs.save_png(out / f"{stem}_overlay.png",
                             outputs.overlay(np.asarray(image, np.uint8), colours, mask))]
