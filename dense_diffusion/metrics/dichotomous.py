"""Dichotomous image segmentation (DIS5K) metrics: max F, weighted F, MAE, S-measure, E-measure.

DIS (Qin et al., ECCV 2022) scores its 8-bit foreground maps with the SOC toolbox's evaluation
(the salient-object metrics of Fan et al.), which is what this module computes:

- Both maps are read as the toolbox reads the PNG files: the ground truth is foreground where
  > 128 (u8) or True (bool); the prediction (u8, or float [0, 1] = u8 / 255) is stretched to its
  own min..max when it is not constant (`prepare`).
- max F (`f_curve`): at each of the 256 thresholds t = 0..255 of the 8-bit map
  floor(255 * pred) >= t, precision P and recall R and F = (1 + b2) P R / (b2 P + R) with
  b2 = beta^2 = 0.3; the F curves are averaged over the images and the maximum of that mean
  curve is max F (so one threshold for the whole set).
- weighted F (Margolin et al., CVPR 2014, `weighted_f`): the errors spread by a 7x7 Gaussian
  (sigma 5) from the foreground onto the background near it, background errors weighted up to
  2x with the distance from the foreground, then F with beta = 1 (their code's default, and the
  toolbox's).
- MAE: mean |pred - gt|.
- S-measure (Fan et al., ICCV 2017, `s_measure`): alpha = 0.5 times the object-level term plus
  0.5 times the region-level term (SSIM-like scores of four blocks split at the foreground
  centroid, weighted by area); 1 - mean(pred) without foreground, mean(pred) without background.
- E-measure (Fan et al., IJCAI 2018, `e_curve`): the enhanced alignment of the binarised map
  with the ground truth, at each of the 256 thresholds; DIS reports the mean over thresholds of
  the curve averaged over images (`mean_e`); `adaptive_e` binarises at min(2 mean(pred), 1).

Conventions kept from the toolbox: the object term's standard deviation is the population one
(ddof 0), S-measure's centroid is rounded half to even, and the E-measure divides by H * W - 1,
so a perfect map scores H W / (H W - 1), a hair above 1. Where the toolbox would divide by zero
(an empty region block of the S-measure, possible only when the foreground touches the right or
bottom edge) the block's weight is 0 and it is left out.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from dense_diffusion.metrics import _checks

DIS_KEYS = ("max_f", "weighted_f", "mae", "s_measure", "mean_e", "adaptive_e", "max_e")
F_BETA2 = 0.3  # beta^2 of max F (salient-object convention).
WEIGHTED_F_BETA = 1.0  # beta of weighted F (Margolin et al.'s code).
S_ALPHA = 0.5  # weight of the object term in the S-measure.
NUM_THRESHOLDS = 256  # thresholds 0..255 of the 8-bit map.
_EPS = 1e-16  # the toolbox's guard against 0 / 0.
MATLAB_EPS = np.finfo(np.float64).eps  # MATLAB's eps, in the S-measure's block variances.
WF_KERNEL_SIZE = 7  # weighted F's Gaussian spreading of the errors (fspecial('gaussian', 7, 5))
WF_KERNEL_SIGMA = 5.0
WF_DISTANCE_SCALE = 5.0  # background weight 2 - 0.5^(distance / 5).


def _gt_mask(gt) -> np.ndarray:
  arr = _checks.as_array(gt, "gt")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  _checks.check_ndim(arr, (2,), "gt", "(H, W)")
  if arr.dtype == bool:
    return arr
  if arr.dtype == np.uint8:
    return arr > 128
  if np.issubdtype(arr.dtype, np.floating):
    return arr > 0.5
  raise ValueError(f"gt must be bool, uint8 (> 128 = foreground) or float in [0, 1], got "
                   f"{arr.dtype}")


def prepare(pred, gt) -> tuple[np.ndarray, np.ndarray]:
  """(f64[H, W] prediction in [0, 1], stretched to its min..max unless constant; bool[H, W])."""
  arr = _checks.as_array(pred, "pred")
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  _checks.check_ndim(arr, (2,), "pred", "(H, W)")
  if arr.dtype == np.uint8:
    p = arr.astype(np.float64) / 255.0
  elif np.issubdtype(arr.dtype, np.floating):
    _checks.raise_if_nonfinite(arr, "pred")
    p = arr.astype(np.float64)
  else:
    raise ValueError(f"pred must be uint8 or float in [0, 1], got {arr.dtype}")
  g = _gt_mask(gt)
  _checks.check_same_shape(p, g)
  lo, hi = p.min(), p.max()
  if hi != lo:
    p = (p - lo) / (hi - lo)
  return p, g


def _levels(p: np.ndarray) -> np.ndarray:
  """i64[H, W] 0..255: the 8-bit map of a prepared prediction (truncated, as the toolbox)."""
  return np.clip((p * 255.0).astype(np.int64), 0, 255)


def _counts_at_thresholds(p, g):
  """(tp, predicted positives) i64[256] for thresholds t = 0..255 of `_levels(p) >= t`."""
  levels = _levels(p)
  fg = np.bincount(levels[g], minlength=NUM_THRESHOLDS)
  bg = np.bincount(levels[~g], minlength=NUM_THRESHOLDS)
  tp = np.cumsum(fg[::-1])[::-1]  # pixels at level >= t
  positives = tp + np.cumsum(bg[::-1])[::-1]
  return tp, positives


def f_curve(pred, gt, beta2: float = F_BETA2) -> dict[str, np.ndarray]:
  """{"precision", "recall", "f"}: f64[256] at thresholds t = 0..255 (a threshold with no
  predicted positive has precision 0; F is 0 where P = R = 0)."""
  p, g = prepare(pred, gt)
  tp, positives = _counts_at_thresholds(p, g)
  precision = tp / np.maximum(positives, 1)
  recall = tp / max(int(g.sum()), 1)
  num = (1 + beta2) * precision * recall
  f = num / np.where(num == 0, 1.0, beta2 * precision + recall)
  return {"precision": precision, "recall": recall, "f": f}


def mae(pred, gt) -> float:
  p, g = prepare(pred, gt)
  return float(np.mean(np.abs(p - g)))


def _matlab_gaussian(size: int, sigma: float) -> np.ndarray:
  """fspecial('gaussian', size, sigma): normalised to sum 1, tiny tails zeroed."""
  r = (size - 1) / 2
  y, x = np.mgrid[-r:r + 1, -r:r + 1]
  h = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
  h[h < np.finfo(np.float64).eps * h.max()] = 0
  return h / h.sum()


def weighted_f(pred, gt, beta: float = WEIGHTED_F_BETA) -> float:
  """Margolin et al.'s weighted F-measure of one map (0 when the ground truth is empty)."""
  p, g = prepare(pred, gt)
  if not g.any():
    return 0.0
  err = np.abs(p - g)
  # Distance of every pixel to the nearest foreground pixel, and where that pixel is.
  dist, (rows, cols) = ndimage.distance_transform_edt(~g, return_indices=True)
  spread = np.where(g, err, err[rows, cols])  # background takes its nearest foreground error
  blurred = ndimage.correlate(spread, _matlab_gaussian(WF_KERNEL_SIZE, WF_KERNEL_SIGMA),
                              mode="constant", cval=0.0)
  # Foreground errors may only get smaller by the spreading (pixel dependency).
  dependent = np.where(g & (blurred < err), blurred, err)
  importance = np.where(g, 1.0, 2.0 - np.exp(math.log(0.5) / WF_DISTANCE_SCALE * dist))
  weighted = dependent * importance
  tp = g.sum() - weighted[g].sum()
  fp = weighted[~g].sum()
  recall = 1.0 - weighted[g].mean()
  precision = tp / (tp + fp + _EPS)
  return float((1 + beta**2) * recall * precision / (recall + beta * precision + _EPS))


def _object_score(values: np.ndarray) -> float:
  """2 x / (x^2 + 1 + std) of the map's values inside one region (0 for an empty region)."""
  if values.size == 0:
    return 0.0
  x = values.mean()
  return float(2.0 * x / (x * x + 1.0 + values.std() + _EPS))


def _block_ssim(p: np.ndarray, g: np.ndarray) -> float:
  n = p.size
  x, y = p.mean(), g.mean()
  sx = np.sum((p - x) ** 2) / (n - 1 + MATLAB_EPS)
  sy = np.sum((g - y) ** 2) / (n - 1 + MATLAB_EPS)
  sxy = np.sum((p - x) * (g - y)) / (n - 1 + MATLAB_EPS)
  a = 4.0 * x * y * sxy
  b = (x * x + y * y) * (sx + sy)
  if a != 0:
    return float(a / (b + _EPS))
  return 1.0 if b == 0 else 0.0


def s_measure(pred, gt, alpha: float = S_ALPHA) -> float:
  """Structure measure of one map, in [0, 1]."""
  p, g = prepare(pred, gt)
  u = g.mean()
  if u == 0:
    return float(1.0 - p.mean())
  if u == 1:
    return float(p.mean())
  gf = g.astype(np.float64)
  obj = u * _object_score(p[g]) + (1 - u) * _object_score(1.0 - p[~g])
  h, w = g.shape
  rows, cols = np.nonzero(g)
  # 1-based centroid (MATLAB), rounded half to even as the toolbox.
  x, y = int(np.round(cols.mean())) + 1, int(np.round(rows.mean())) + 1
  region = 0.0
  for rs, cs in ((slice(0, y), slice(0, x)), (slice(0, y), slice(x, w)),
                 (slice(y, h), slice(0, x)), (slice(y, h), slice(x, w))):
    block = gf[rs, cs]
    if block.size:
      region += block.size / (h * w) * _block_ssim(p[rs, cs], block)
  return float(max(0.0, alpha * obj + (1 - alpha) * region))


def _enhanced_sum(tp, positives, g_count: int, n: int):
  """Sum over pixels of the enhanced alignment (1 + xi)^2 / 4 of a binary map with `positives`
  foreground pixels, `tp` of them on the ground truth's `g_count` (arrays: one per threshold)."""
  tp, positives = np.asarray(tp, np.float64), np.asarray(positives, np.float64)
  if g_count == 0:
    return n - positives  # 1 where the map is background
  if g_count == n:
    return positives
  mean_pred, mean_gt = positives / n, g_count / n
  parts = ((tp, 1 - mean_pred, 1 - mean_gt),  # predicted fg on fg
           (positives - tp, 1 - mean_pred, -mean_gt),  # predicted fg on bg
           (g_count - tp, -mean_pred, 1 - mean_gt),  # predicted bg on fg
           (n - positives - (g_count - tp), -mean_pred, -mean_gt))  # bg on bg
  total = 0.0
  for count, a, b in parts:
    xi = 2 * a * b / (a * a + b * b + _EPS)
    total = total + count * (xi + 1) ** 2 / 4
  return total


def e_curve(pred, gt) -> np.ndarray:
  """f64[256]: the E-measure at thresholds t = 0..255 of the 8-bit map."""
  p, g = prepare(pred, gt)
  tp, positives = _counts_at_thresholds(p, g)
  return _enhanced_sum(tp, positives, int(g.sum()), g.size) / (g.size - 1 + _EPS)


def adaptive_e(pred, gt) -> float:
  """The E-measure of the map binarised at min(2 mean(pred), 1)."""
  p, g = prepare(pred, gt)
  binary = p >= min(2 * p.mean(), 1.0)
  tp, positives = int(np.sum(binary & g)), int(binary.sum())
  return float(_enhanced_sum(tp, positives, int(g.sum()), g.size) / (g.size - 1 + _EPS))


def dis_metrics(pred, gt) -> dict[str, float]:
  """Every metric of one image (max F and the E summaries from this image's own curves)."""
  m = DichotomousMetrics()
  m.update(pred, gt)
  return {k: v for k, v in m.result().items() if k in DIS_KEYS}


class DichotomousMetrics:
  """Streaming DIS5K metrics over a test set: per-image values and curves, averaged.

  `update(pred, gt)` adds one map (pred: u8 or float [0, 1] [H, W]; gt: bool / u8 / float) or a
  batch [N, H, W]; non-finite predictions are skipped and counted. `result()`: max F (max of
  the mean F curve), weighted F, MAE, S-measure, mean / max E-measure (of the mean E curve),
  adaptive E-measure, each averaged over images; the mean curves; num_images, num_nonfinite.
  """

  def __init__(self):
    self.f_curves, self.e_curves = [], []
    self.scores = {k: [] for k in ("weighted_f", "mae", "s_measure", "adaptive_e")}
    self.num_nonfinite = 0

  def update(self, pred, gt) -> None:
    pred, gt = _checks.as_array(pred, "pred"), _checks.as_array(gt, "gt")
    if pred.ndim == 2:
      pred, gt = pred[None], gt[None]
    _checks.check_same_shape(pred, gt)
    bad = _checks.nonfinite_per_image(pred)
    if bad.any():
      self.num_nonfinite += int(bad.sum())
      _checks.warn_skipped("DichotomousMetrics", int(bad.sum()), self.num_nonfinite)
    for i in np.flatnonzero(~bad):
      p, g = pred[i], gt[i]
      self.f_curves.append(f_curve(p, g)["f"])
      self.e_curves.append(e_curve(p, g))
      self.scores["weighted_f"].append(weighted_f(p, g))
      self.scores["mae"].append(mae(p, g))
      self.scores["s_measure"].append(s_measure(p, g))
      self.scores["adaptive_e"].append(adaptive_e(p, g))

  @property
  def num_images(self) -> int:
    return len(self.f_curves)

  def result(self) -> dict:
    if not self.num_images:
      return {**dict.fromkeys(DIS_KEYS, math.nan), "num_images": 0,
              "num_nonfinite": self.num_nonfinite}
    f = np.mean(self.f_curves, axis=0)
    e = np.mean(self.e_curves, axis=0)
    return {"max_f": float(f.max()), "mean_e": float(e.mean()), "max_e": float(e.max()),
            **{k: float(np.mean(v)) for k, v in self.scores.items()},
            "f_curve": f, "e_curve": e, "num_images": self.num_images,
            "num_nonfinite": self.num_nonfinite}
