"""Referring image segmentation (RefCOCO, RefCOCO+, RefCOCOg) metrics: oIoU, mIoU, precision@X.

The RefCOCO papers (LAVT, Yang et al. CVPR 2022; VPD, Zhao et al. ICCV 2023; CRIS, ...) score
one binary mask per (image, expression) pair, and report over a split:

- overall IoU (`oiou`): the sum over examples of the intersections divided by the sum of the
  unions (so large objects weigh more); VPD's headline (73.3 on RefCOCO val).
- mean IoU (`miou`): the mean over examples of each example's IoU.
- precision at IoU thresholds 0.5, 0.6, 0.7, 0.8, 0.9 (`prec_0.5` ...): the fraction of examples
  whose IoU is at least the threshold (LAVT's evaluation counts `iou >= threshold`).

Pixels outside an optional validity mask count in neither the intersection nor the union.

An example whose union is empty (no predicted and no true pixel where valid) has IoU 1 here: the
prediction agrees with the truth everywhere, and a correct "nothing" answer is not an error.
LAVT's script would score it 0, but its ground truths are never empty (every RefCOCO expression
refers to an annotated object), so the choice changes no published number; it matters only for
degenerate inputs (an all-invalid truth). The overall IoU is unaffected either way (such an
example adds 0 to both sums).
"""
from __future__ import annotations

import math

import numpy as np

from dense_diffusion.metrics import _checks

PRECISION_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)  # the RefCOCO papers' P@X columns (keys prec_X).
PRECISION_KEYS = tuple(f"prec_{t}" for t in PRECISION_THRESHOLDS)
REFERRING_KEYS = ("oiou", "miou", *PRECISION_KEYS)
EMPTY_UNION_IOU = 1.0  # per-example IoU when neither mask has a valid pixel (module docstring).
SOFT_THRESHOLD = 0.5  # a float prediction (a soft map in [0, 1]) is foreground where > this.


def _as_masks(x, name: str) -> np.ndarray:
  """bool[N, H, W] of a mask (H, W) or a batch of masks (N, H, W) or (N, H, W, 1): bool, a float
  soft map (> 0.5) or integers (nonzero)."""
  arr = _checks.as_array(x, name)
  if arr.ndim == 4 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim == 2:
    arr = arr[None]
  _checks.check_ndim(arr, (3,), name, "(H, W) or (N, H, W)")
  if arr.dtype == bool:
    return arr
  if np.issubdtype(arr.dtype, np.floating):
    return arr > SOFT_THRESHOLD
  if np.issubdtype(arr.dtype, np.integer):
    return arr != 0
  raise ValueError(f"{name} must be a bool, float or integer mask, got {arr.dtype}")


def intersections_unions(pred, gt, valid=None) -> tuple[np.ndarray, np.ndarray]:
  """(i64[N] intersections, i64[N] unions) of predicted and true masks ((H, W) or (N, H, W);
  bool, or float > 0.5), counted over the `valid` pixels (all when None)."""
  p, g = _as_masks(pred, "pred"), _as_masks(gt, "gt")
  _checks.check_same_shape(p, g)
  if valid is not None:
    v = _as_masks(valid, "valid")
    _checks.check_same_shape(v, g, "valid and gt")
    p, g = p & v, g & v
  flat_p, flat_g = p.reshape(len(p), -1), g.reshape(len(g), -1)
  return (np.count_nonzero(flat_p & flat_g, axis=1).astype(np.int64),
          np.count_nonzero(flat_p | flat_g, axis=1).astype(np.int64))


def referring_metrics(pred, gt, valid=None) -> dict[str, float]:
  """The split metrics of a batch of masks (N, H, W) taken as the whole split."""
  m = ReferringMetrics()
  m.update(pred, gt, valid)
  return {k: v for k, v in m.result().items() if k in REFERRING_KEYS}


class ReferringMetrics:
  """Streaming referring-segmentation metrics over a split.

  `update(pred, gt, valid=None)` adds one example (H, W) or a batch (N, H, W): pred bool or a
  float soft map in [0, 1] (foreground > 0.5); gt bool (or float / int as `_as_masks`); valid
  bool. Predictions with non-finite values are skipped and counted. `result()`: oIoU, mIoU,
  prec_0.5..0.9, the sums of intersections and unions, num_examples, num_nonfinite.
  """

  def __init__(self):
    self.intersections, self.unions = [], []
    self.num_nonfinite = 0

  def update(self, pred, gt, valid=None) -> None:
    pred = _checks.as_array(pred, "pred")
    if pred.ndim == 2:
      pred = pred[None]
    bad = _checks.nonfinite_per_image(pred)
    if bad.any():
      self.num_nonfinite += int(bad.sum())
      _checks.warn_skipped("ReferringMetrics", int(bad.sum()), self.num_nonfinite)
      pred = np.where(bad.reshape((-1,) + (1,) * (pred.ndim - 1)), 0, pred)
    inter, union = intersections_unions(pred, gt, valid)
    self.intersections.extend(inter[~bad].tolist())
    self.unions.extend(union[~bad].tolist())

  @property
  def num_examples(self) -> int:
    return len(self.unions)

  def ious(self) -> np.ndarray:
    """f64[N]: each example's IoU (`EMPTY_UNION_IOU` where its union is empty)."""
    inter = np.asarray(self.intersections, np.float64)
    union = np.asarray(self.unions, np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1.0), EMPTY_UNION_IOU)

  def result(self) -> dict:
    if not self.num_examples:
      return {**dict.fromkeys(REFERRING_KEYS, math.nan), "intersection": 0, "union": 0,
              "num_examples": 0, "num_nonfinite": self.num_nonfinite}
    ious = self.ious()
    total_i, total_u = int(np.sum(self.intersections)), int(np.sum(self.unions))
    return {"oiou": total_i / total_u if total_u else EMPTY_UNION_IOU,
            "miou": float(ious.mean()),
            **{k: float(np.mean(ious >= t)) for k, t in zip(PRECISION_KEYS, PRECISION_THRESHOLDS)},
            "intersection": total_i, "union": total_u, "num_examples": self.num_examples,
            "num_nonfinite": self.num_nonfinite}
