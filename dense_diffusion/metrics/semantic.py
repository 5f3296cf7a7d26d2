"""Semantic segmentation metrics from a dataset-wide confusion matrix (mIoU protocol).

`iou[c] = TP / (TP + FP + FN)` from the confusion matrix summed over the whole split; a class that
appears in neither the ground truth nor the prediction has an undefined IoU (NaN) and is left out
of `miou` (as mmsegmentation). A class predicted but absent from the ground truth has IoU 0 and
counts. Pixels whose ground truth is `ignore_index` are not counted at all.

Difference from torchmetrics `MulticlassJaccardIndex` (1.9): with `average=None` it reports 0
(its `zero_division` default) for classes absent from both prediction and target, where we give
NaN; its `average="macro"` leaves those classes out, like our `miou`. IoUs of all other classes
agree exactly (tests/test_metrics_semantic.py checks both).

ADE20K as mmsegmentation evaluates it (`reduce_zero_label=True`, `SemanticConfusion(150,
reduce_zero_label=True)`): the raw annotation PNG holds 0 = "other" and 1..150 = classes;
mmseg's `LoadAnnotations(reduce_zero_label=True)` maps 0 to the ignore index 255 and c to c - 1,
so predictions are class ids 0..149 and the ground truth is passed raw. mmseg's `IoUMetric` then
sums per-class intersection, union, predicted and ground-truth areas over the whole split and
reports mIoU = nanmean(intersection / union) (0 / 0 = NaN for classes absent from both), aAcc =
sum(intersection) / sum(gt area) and mAcc = nanmean(intersection / gt area): exactly our `miou`,
`pixel_accuracy` and `mean_accuracy` from the confusion matrix (mmseg prints them in percent,
rounded to 2 decimals; we return fractions).
"""
from __future__ import annotations

import numpy as np

from dense_diffusion.metrics import _checks


class SemanticConfusion:
  """Streaming confusion matrix over a dataset; `result()` gives mIoU and pixel accuracy.

  Args:
    num_classes: K; valid labels are 0..K-1.
    ignore_index: ground-truth label excluded from the metric (255 by default, DESIGN.md).
    reduce_zero_label: the ground truth is given raw with 0 = unlabelled and 1..K = classes
      (ADE20K's annotation PNGs): 0 is ignored and c becomes c - 1, as mmsegmentation's
      `reduce_zero_label=True` (module docstring); `ignore_index` stays ignored. Predictions are
      always class ids 0..K-1.

  `update(pred, gt)` takes int label maps of the same shape, (H, W) or (N, H, W). Predictions
  must be in [0, K); a float prediction containing NaN/inf makes that image skipped and counted
  (`num_nonfinite`). `result()` returns:
    miou            mean IoU over classes with a defined IoU (mmseg's mIoU)
    pixel_accuracy  correct / counted pixels (mmseg's aAcc)
    mean_accuracy   mean per-class recall over classes present in the ground truth (mAcc)
    iou             f64[K], NaN for classes absent from both ground truth and prediction
    accuracy        f64[K] per-class recall, NaN for classes absent from the ground truth
    num_images, num_pixels, num_nonfinite
  """

  def __init__(self, num_classes: int, ignore_index: int | None = 255, *,
               reduce_zero_label: bool = False):
    if int(num_classes) < 1:
      raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    self.num_classes = int(num_classes)
    self.ignore_index = ignore_index
    self.reduce_zero_label = bool(reduce_zero_label)
    if self.reduce_zero_label and ignore_index is not None and 0 < ignore_index <= num_classes:
      raise ValueError(f"with reduce_zero_label the raw ground-truth labels 1..{num_classes} are "
                       f"classes, so ignore_index {ignore_index} collides with one; use a value "
                       "outside that range (mmseg: 255)")
    if not self.reduce_zero_label and ignore_index is not None and 0 <= ignore_index < num_classes:
      raise ValueError(f"ignore_index {ignore_index} collides with a class id in [0, "
                       f"{num_classes}); use a value outside the class range")
    self.reset()

  def reset(self) -> None:
    self.confusion = np.zeros((self.num_classes, self.num_classes), np.int64)  # [gt, pred]
    self.num_images = 0
    self.num_nonfinite = 0

  def _labels(self, x, name):
    arr = _checks.as_array(x, name)
    if np.issubdtype(arr.dtype, np.floating):
      if np.any(arr != np.round(arr)):
        raise ValueError(f"{name} must hold integer class labels, got non-integer floats")
      return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer) and arr.dtype != bool:
      raise ValueError(f"{name} must be an integer label map, got dtype {arr.dtype}")
    return arr.astype(np.int64)

  def update(self, pred, gt) -> None:
    """Adds label maps pred, gt: int[H, W] or int[N, H, W]."""
    pred = _checks.as_array(pred, "pred")
    gt = _checks.as_array(gt, "gt")
    _checks.check_ndim(pred, (2, 3), "pred", "(H, W) or (N, H, W)")
    _checks.check_same_shape(pred, gt)
    if pred.ndim == 2:
      pred, gt = pred[None], gt[None]
    bad = _checks.nonfinite_per_image(pred)
    if bad.any():
      self.num_nonfinite += int(bad.sum())
      _checks.warn_skipped("SemanticConfusion", int(bad.sum()), self.num_nonfinite)
      pred, gt = pred[~bad], gt[~bad]
    pred = self._labels(pred, "pred")
    gt = self._labels(gt, "gt")
    k = self.num_classes
    keep = gt != self.ignore_index if self.ignore_index is not None else np.ones(gt.shape, bool)
    if self.reduce_zero_label:
      keep &= gt != 0
    g = gt[keep]
    p = pred[keep]
    if self.reduce_zero_label:
      if g.size and (g.min() < 1 or g.max() > k):
        bad_vals = np.unique(g[(g < 1) | (g > k)])[:10].tolist()
        raise ValueError(f"gt has raw labels {bad_vals} outside 0..{k} that are not ignore_index="
                         f"{self.ignore_index} (reduce_zero_label: 0 is ignored, 1..{k} are the "
                         "classes)")
      g = g - 1
    elif g.size and (g.min() < 0 or g.max() >= k):
      bad_vals = np.unique(g[(g < 0) | (g >= k)])[:10].tolist()
      raise ValueError(f"gt has labels {bad_vals} outside [0, {k}) that are not ignore_index="
                       f"{self.ignore_index}")
    if p.size and (p.min() < 0 or p.max() >= k):
      bad_vals = np.unique(p[(p < 0) | (p >= k)])[:10].tolist()
      raise ValueError(f"pred has labels {bad_vals} outside [0, {k}) at non-ignored pixels")
    self.confusion += np.bincount(g * k + p, minlength=k * k).reshape(k, k)
    self.num_images += int(pred.shape[0])

  def merge(self, other: "SemanticConfusion") -> "SemanticConfusion":
    if other.num_classes != self.num_classes:
      raise ValueError(f"cannot merge {other.num_classes} classes into {self.num_classes}")
    if other.reduce_zero_label != self.reduce_zero_label:
      raise ValueError("cannot merge accumulators with different reduce_zero_label settings")
    self.confusion += other.confusion
    self.num_images += other.num_images
    self.num_nonfinite += other.num_nonfinite
    return self

  def result(self) -> dict:
    cm = self.confusion.astype(np.float64)
    tp = np.diag(cm)
    gt_count = cm.sum(1)
    pred_count = cm.sum(0)
    union = gt_count + pred_count - tp
    with np.errstate(invalid="ignore", divide="ignore"):
      iou = np.where(union > 0, tp / union, np.nan)
      acc = np.where(gt_count > 0, tp / gt_count, np.nan)
    total = cm.sum()
    nan_mean = lambda v: float(np.nanmean(v)) if np.any(~np.isnan(v)) else float("nan")
    return {
        "miou": nan_mean(iou),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "mean_accuracy": nan_mean(acc),
        "iou": iou,
        "accuracy": acc,
        "num_images": self.num_images,
        "num_pixels": int(total),
        "num_nonfinite": self.num_nonfinite,
    }


def semantic_metrics(pred, gt, num_classes: int, ignore_index: int | None = 255, *,
                     reduce_zero_label: bool = False) -> dict:
  """One-shot `SemanticConfusion` over one image or batch; raises ValueError on NaN in pred."""
  pred_arr = _checks.as_array(pred, "pred")
  _checks.raise_if_nonfinite(pred_arr, "pred")
  acc = SemanticConfusion(num_classes, ignore_index, reduce_zero_label=reduce_zero_label)
  acc.update(pred_arr, gt)
  return acc.result()
