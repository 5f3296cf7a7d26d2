"""Image matting (the alpha matte) and dichotomous image segmentation (DIS): GenPercept's two
foreground tasks, both a grey image v in [0, 1] painted as rgb = 2 v - 1 in all channels.

alpha_matte   answer: the alpha matte f32[H, W] in [0, 1] (u8 0..255 accepted: / 255);
              decoded: the alpha. Metrics: SAD, MSE, MAD, Grad, Conn (metrics/matting.py).
dichotomous   answer: the binary foreground mask bool[H, W] (u8 accepted: > 128 as DIS5K's PNGs;
              float: > 0.5); decoded: the soft foreground map f32[H, W] in [0, 1], which DIS
              scores as it is (max F over thresholds, ...; metrics/dichotomous.py).

Trivial baselines (what a model that learned nothing scores): the best constant map for the
headline metric, knowing the image's own answer: for the matte, its median alpha everywhere (the
constant with the least SAD; all background when the foreground covers less than half the
image); for DIS, its majority label everywhere (max F is then the F of "everything is foreground"
at threshold 0, reached by every map).
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from dense_diffusion import metrics
from dense_diffusion.metrics import dichotomous as dis_metrics
from dense_diffusion.metrics import matting as matting_metrics
from dense_diffusion.tasks import base
from dense_diffusion.tasks import outputs

# synthetic_scenes: the composite (a foreground object over the room) is the input of both.
_SYNTHETIC_COMPOSITE = (("composite", "image"),)


def alpha01(alpha, task_name: str) -> np.ndarray:
  """u8 0..255 or float [0, 1] alpha (H, W) -> f32 in [0, 1]."""
  alpha = base.check_map(alpha, task_name, "an alpha matte (H, W)")
  if alpha.dtype == np.uint8:
    return alpha.astype(np.float32) / 255.0
  if not np.issubdtype(alpha.dtype, np.floating):
    raise ValueError(f"{task_name}.encode expects a float alpha in [0, 1] or uint8 0..255, got "
                     f"{alpha.dtype}")
  finite = alpha[np.isfinite(alpha)]
  if finite.size and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6):
    raise ValueError(f"{task_name}.encode got float values in [{finite.min():.3g}, "
                     f"{finite.max():.3g}]; a float alpha must be in [0, 1] (uint8 for 0..255)")
  return alpha.astype(np.float32)


def binary_mask(mask, task_name: str) -> np.ndarray:
  """bool, u8 (> 128 is foreground, DIS5K's PNG convention) or float (> 0.5) (H, W) -> bool."""
  mask = base.check_map(mask, task_name, "a foreground mask (H, W)")
  if mask.dtype == bool:
    return mask
  if mask.dtype == np.uint8:
    return mask > 128
  if np.issubdtype(mask.dtype, np.floating):
    return mask > 0.5
  raise ValueError(f"{task_name}.encode expects a bool, uint8 or float mask, got {mask.dtype}")


class MatteEvaluator(base.Evaluator):
  """SAD, MSE, MAD, Grad, Conn over whole images; baseline: the image's median alpha."""
  KEYS = matting_metrics.MATTING_KEYS

  def __init__(self, task):
    super().__init__(task)
    self.model, self.baseline = metrics.MattingMetrics(), metrics.MattingMetrics()

  def update(self, answers, truths, inputs):
    for pred, gt in zip(answers, truths):
      gt = alpha01(gt, self.task.name)
      self.model.update(np.clip(pred, 0.0, 1.0), gt)
      self.baseline.update(np.full_like(gt, np.median(gt)), gt)

  def result(self):
    model, baseline = self.model.result(), self.baseline.result()
    return {**{k: float(model[k]) for k in self.KEYS},
            "baseline": {k: float(baseline[k]) for k in self.KEYS}}


@base.register("alpha_matte")
@dataclasses.dataclass(frozen=True)
class AlphaMatteTask(base.Task):
  """The alpha matte of the foreground, grey v = alpha."""

  name: str = "alpha_matte"
  prompt: str = "Perform image matting"

  label_key = "alpha"
  headline = "sad"
  higher_is_better = False
  synthetic_source = _SYNTHETIC_COMPOSITE

  def _encode(self, alpha):
    alpha = alpha01(alpha, self.name)
    return base.grey(np.where(np.isfinite(alpha), alpha, 0.0))  # unknown: `valid_mask`

  def valid_mask(self, alpha):
    return np.isfinite(base.check_map(alpha, self.name, "an alpha matte (H, W)"))

  def _decode_batch(self, rgb):
    return base.channel_mean01(rgb)

  def evaluator(self):
    return MatteEvaluator(self)

  def image_loss(self, pred, target, valid):
    """L1 of the alpha (the channel mean) on known pixels: the matting literature's alpha
    loss (Deep Image Matting's sqrt(d^2 + eps^2) as eps -> 0), which drives the background to
    exactly 0 where an MSE leaves a faint haze that SAD sums over the whole image."""
    p, t = jnp.mean(pred, axis=-1, keepdims=True), jnp.mean(target, axis=-1, keepdims=True)
    return base.masked_mean(0.5 * jnp.abs(p - t), valid)  # 0.5: alpha units (rgb = 2 a - 1)

  def write(self, out, stem, image, alpha):
    """`X_alpha.png`: the 8-bit grey matte (as matting datasets store theirs);
    `X_cutout.png`: the input with the matte as its alpha channel (RGBA)."""
    a = outputs.u8(alpha)
    rgba = np.concatenate([np.asarray(image, np.uint8), a[..., None]], axis=-1)
    return [outputs.save_png(out / f"{stem}_alpha.png", a),
            outputs.save_png(out / f"{stem}_cutout.png", rgba)]


class DichotomousEvaluator(base.Evaluator):
  """DIS5K's metrics of the 8-bit foreground maps; baseline: the image's majority label."""
  KEYS = dis_metrics.DIS_KEYS

  def __init__(self, task):
    super().__init__(task)
    self.model, self.baseline = metrics.DichotomousMetrics(), metrics.DichotomousMetrics()

  def update(self, answers, truths, inputs):
    for pred, gt in zip(answers, truths):
      gt = binary_mask(gt, self.task.name)
      # Scored as the PNG the writer saves (DIS scores 8-bit maps).
      self.model.update(outputs.u8(pred), gt)
      self.baseline.update(np.full(gt.shape, 255 * int(gt.mean() > 0.5), np.uint8), gt)

  def result(self):
    model, baseline = self.model.result(), self.baseline.result()
    return {**{k: float(model[k]) for k in self.KEYS},
            "baseline": {k: float(baseline[k]) for k in self.KEYS}}


@base.register("dichotomous")
@dataclasses.dataclass(frozen=True)
class DichotomousTask(base.Task):
  """The binary foreground mask as black (-1) / white (+1); decoded to a soft map in [0, 1]."""

  name: str = "dichotomous"
  prompt: str = "Perform dichotomous image segmentation"

  label_key = "mask"
  headline = "max_f"
  higher_is_better = True
  synthetic_source = _SYNTHETIC_COMPOSITE

  def _encode(self, mask):
    return base.grey(binary_mask(mask, self.name).astype(np.float32))

  def _decode_batch(self, rgb):
    return base.channel_mean01(rgb)

  def evaluator(self):
    return DichotomousEvaluator(self)

  def write(self, out, stem, image, foreground):
    """`X_mask.png`: the 8-bit grey foreground map (DIS's prediction files)."""
    return [outputs.save_png(out / f"{stem}_mask.png", outputs.u8(foreground))]
