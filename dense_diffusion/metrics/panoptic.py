"""Panoptic quality (PQ, SQ, RQ) following the COCO panopticapi `evaluation.py` algorithm.

Per image, with segment-id maps (0 = void) and segment lists `{id, category_id, iscrowd}`:

1. Every pixel is paired (gt id, pred id) and the pairs are counted at once: ids are mapped to
   compact indices (0 = void) and one `np.bincount` over `gt_index * (P + 1) + pred_index` gives
   the full intersection table (panopticapi does the same with `np.unique` over
   `gt * 256^3 + pred`). Segment areas are the row/column sums of that table.
2. A gt segment (not crowd) and a prediction of the same category match when
   IoU = I / (pred_area + gt_area - I - pred_on_void) > 0.5 (a match is unique, since IoU > 0.5).
   Each match adds one TP and its IoU to the category.
3. Unmatched non-crowd gt segments are FN. Crowd gt segments are never FN; they only mark
   regions to ignore.
4. An unmatched prediction is a FP unless (pixels on void + pixels on crowd gt segments of its
   own category) / pred_area > 0.5.
5. TP, FP, FN and the IoU sums are added over the whole dataset; per category
   PQ = sum IoU / (TP + FP/2 + FN/2), SQ = sum IoU / TP (0 without TP), RQ = TP / (TP + FP/2 +
   FN/2), and All / Things / Stuff average the categories with TP + FP + FN > 0.

Deliberate differences from panopticapi (none matters on COCO-format data):
- Segment areas come from the maps, never from an `area` field in the segment lists (the
  panopticapi reads the gt area from its JSON, which equals the pixel count in COCO).
- Several crowd segments of one category in one image all count in step 4 (panopticapi keeps the
  last one only; COCO merges crowd regions of a category into one segment, so both agree).
- The id checks that panopticapi makes for predictions (id in the map but not in the list, or
  the reverse, unknown category id) are made for the ground truth too, and raise ValueError.
- A group (Things or Stuff) without any counted category gives NaN and n = 0 instead of a
  ZeroDivisionError.
`per_class` maps category id -> {pq, sq, rq, tp, fp, fn}; like panopticapi it lists every
category, with pq = sq = rq = 0.0 for the ones not counted (tp + fp + fn == 0).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np

from dense_diffusion.metrics import _checks

VOID = 0
MATCH_IOU = 0.5


def _segment_table(ids_map: np.ndarray, segments: Sequence[Mapping], cat_index: Mapping[int, int],
                   who: str, image: str):
  """Sorted segment ids (with 0 first), compact index map, category index and crowd flag."""
  seg_ids, cats, crowd = [], [], []
  for seg in segments:
    try:
      sid = int(seg["id"])
      cid = int(seg["category_id"])
    except (KeyError, TypeError) as e:
      raise ValueError(f"{image}: every {who} segment needs 'id' and 'category_id', got {seg!r}"
                       ) from e
    if sid == VOID:
      raise ValueError(f"{image}: {who} segment id 0 is reserved for void")
    if cid not in cat_index:
      raise ValueError(f"{image}: {who} segment with ID {sid} has unknown category_id {cid}")
    seg_ids.append(sid)
    cats.append(cat_index[cid])
    crowd.append(bool(seg.get("iscrowd", 0)))
  seg_ids = np.asarray(seg_ids, np.int64)
  order = np.argsort(seg_ids, kind="stable")
  seg_ids = seg_ids[order]
  if seg_ids.size > 1 and np.any(seg_ids[1:] == seg_ids[:-1]):
    dup = np.unique(seg_ids[1:][seg_ids[1:] == seg_ids[:-1]]).tolist()
    raise ValueError(f"{image}: {who} segment IDs {dup} appear more than once in the segment list")
  keys = np.concatenate([[VOID], seg_ids])
  flat = ids_map.reshape(-1)
  idx = np.searchsorted(keys, flat)
  np.minimum(idx, keys.size - 1, out=idx)
  found = keys[idx] == flat
  if not found.all():
    missing = np.unique(flat[~found])
    raise ValueError(
        f"{image}: {who} segment IDs {missing[:20].tolist()} are present in the map and not "
        f"in the segment list")
  return (keys, idx, np.asarray(cats, np.int64)[order], np.asarray(crowd, bool)[order])


def _check_map(x, name: str) -> np.ndarray:
  arr = _checks.as_array(x, name)
  if arr.ndim == 3 and arr.shape[-1] == 3 and arr.dtype == np.uint8:
    raise ValueError(f"{name} looks like an RGB-encoded panoptic PNG {arr.shape}; convert it to "
                     "ids first (id = R + 256 G + 256^2 B)")
  _checks.check_ndim(arr, (2,), name, "(H, W)")
  if not np.issubdtype(arr.dtype, np.integer):
    if np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
      return arr.astype(np.int64)
    raise ValueError(f"{name} must be an integer segment-id map, got dtype {arr.dtype}")
  return arr.astype(np.int64)


def image_stats(gt_ids, gt_segments, pred_ids, pred_segments, cat_index: Mapping[int, int],
                image: str = "image") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """TP, FP, FN (int64[C]) and IoU sums (f64[C]) of one image, by category index.

  Args:
    gt_ids, pred_ids: int[H, W] segment-id maps, 0 = void.
    gt_segments, pred_segments: lists of {id, category_id, iscrowd (optional, default 0)}.
    cat_index: category id -> position 0..C-1.
    image: name used in error messages.
  """
  gt_ids = _check_map(gt_ids, "gt_ids")
  pred_ids = _check_map(pred_ids, "pred_ids")
  _checks.check_same_shape(pred_ids, gt_ids, "pred_ids and gt_ids")
  num_cats = len(cat_index)
  g_keys, g_idx, g_cat, g_crowd = _segment_table(gt_ids, gt_segments, cat_index, "gt", image)
  p_keys, p_idx, p_cat, _ = _segment_table(pred_ids, pred_segments, cat_index, "pred", image)
  ng, npd = g_keys.size, p_keys.size
  joint = np.bincount(g_idx * npd + p_idx, minlength=ng * npd).reshape(ng, npd)
  for who, area, keys in (("gt", joint.sum(1), g_keys), ("pred", joint.sum(0), p_keys)):
    absent = keys[1:][area[1:] == 0]
    if absent.size:
      raise ValueError(f"{image}: the following {who} segment IDs {absent.tolist()} are present "
                       "in the segment list and not in the map")
  inter = joint[1:, 1:].astype(np.float64)  # [G, P]
  gt_area = joint[1:, :].sum(1).astype(np.float64)
  pred_area = joint[:, 1:].sum(0).astype(np.float64)
  pred_void = joint[0, 1:].astype(np.float64)
  same_cat = g_cat[:, None] == p_cat[None, :]
  union = pred_area[None, :] + gt_area[:, None] - inter - pred_void[None, :]
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = np.where(inter > 0, inter / union, 0.0)
  matched = same_cat & ~g_crowd[:, None] & (iou > MATCH_IOU)
  gt_matched = matched.any(1)
  pred_matched = matched.any(0)

  tp = np.bincount(g_cat[gt_matched], minlength=num_cats)
  iou_sum = np.bincount(g_cat, weights=np.where(matched, iou, 0.0).sum(1), minlength=num_cats)
  fn = np.bincount(g_cat[~gt_matched & ~g_crowd], minlength=num_cats)
  crowd_same = (inter * (same_cat & g_crowd[:, None])).sum(0)
  ignored = (pred_void + crowd_same) / pred_area > MATCH_IOU
  fp = np.bincount(p_cat[~pred_matched & ~ignored], minlength=num_cats)
  return tp.astype(np.int64), fp.astype(np.int64), fn.astype(np.int64), iou_sum


class PanopticQuality:
  """Streaming PQ over a dataset (sums of TP/FP/FN/IoU per category, divided in `result()`).

  Args:
    categories: list of {id, isthing} (extra keys such as `name` are ignored).
  """

  def __init__(self, categories: Sequence[Mapping]):
    if not categories:
      raise ValueError("categories is empty")
    self.cat_ids = [int(c["id"]) for c in categories]
    if len(set(self.cat_ids)) != len(self.cat_ids):
      raise ValueError("categories contain duplicate ids")
    self.isthing = np.asarray([bool(c.get("isthing", 0)) for c in categories])
    self.cat_index = {cid: i for i, cid in enumerate(self.cat_ids)}
    self.reset()

  def reset(self) -> None:
    c = len(self.cat_ids)
    self.tp = np.zeros(c, np.int64)
    self.fp = np.zeros(c, np.int64)
    self.fn = np.zeros(c, np.int64)
    self.iou = np.zeros(c, np.float64)
    self.num_images = 0
    self.num_nonfinite = 0

  def update(self, gt_ids, gt_segments, pred_ids, pred_segments) -> None:
    """Adds one image: int[H, W] id maps and their segment lists (COCO panoptic format).

    A float `pred_ids` map with NaN/inf values is skipped, counted in `num_nonfinite` and logged.
    """
    pred_arr = _checks.as_array(pred_ids, "pred_ids")
    if _checks.nonfinite_count(pred_arr):
      self.num_nonfinite += 1
      _checks.warn_skipped("PanopticQuality", 1, self.num_nonfinite)
      return
    tp, fp, fn, iou = image_stats(gt_ids, gt_segments, pred_ids, pred_segments, self.cat_index,
                                  image=f"image #{self.num_images}")
    self.tp += tp
    self.fp += fp
    self.fn += fn
    self.iou += iou
    self.num_images += 1

  def merge(self, other: "PanopticQuality") -> "PanopticQuality":
    if other.cat_ids != self.cat_ids:
      raise ValueError("cannot merge PanopticQuality accumulators with different categories")
    self.tp += other.tp
    self.fp += other.fp
    self.fn += other.fn
    self.iou += other.iou
    self.num_images += other.num_images
    self.num_nonfinite += other.num_nonfinite
    return self

  def result(self) -> dict:
    """{"All"|"Things"|"Stuff": {pq, sq, rq, n}, "per_class": {cat_id: {...}}, "num_images",
    "num_nonfinite"}."""
    tp, fp, fn, iou = (x.astype(np.float64) for x in (self.tp, self.fp, self.fn, self.iou))
    counted = (self.tp + self.fp + self.fn) > 0
    denom = np.where(counted, tp + 0.5 * fp + 0.5 * fn, 1.0)
    pq = np.where(counted, iou / denom, 0.0)
    sq = np.where(self.tp > 0, iou / np.maximum(tp, 1.0), 0.0)
    rq = np.where(counted, tp / denom, 0.0)
    out = {}
    for name, sel in (("All", np.ones_like(counted)), ("Things", self.isthing),
                      ("Stuff", ~self.isthing)):
      use = sel & counted
      n = int(use.sum())
      if n:
        out[name] = {"pq": float(pq[use].mean()), "sq": float(sq[use].mean()),
                     "rq": float(rq[use].mean()), "n": n}
      else:
        out[name] = {"pq": float("nan"), "sq": float("nan"), "rq": float("nan"), "n": 0}
    out["per_class"] = {
        cid: {"pq": float(pq[i]), "sq": float(sq[i]), "rq": float(rq[i]), "tp": int(self.tp[i]),
              "fp": int(self.fp[i]), "fn": int(self.fn[i])}
        for i, cid in enumerate(self.cat_ids)}
    out["num_images"] = self.num_images
    out["num_nonfinite"] = self.num_nonfinite
    return out


def panoptic_quality(samples: Iterable[tuple], categories: Sequence[Mapping]) -> dict:
  """PQ over `samples`, an iterable of (gt_ids, gt_segments, pred_ids, pred_segments).

  See the module docstring for the algorithm and `PanopticQuality.result` for the output.
  Raises ValueError (with the count) on a non-finite value in a prediction map.
  """
  acc = PanopticQuality(categories)
  for i, sample in enumerate(samples):
    if len(sample) != 4:
      raise ValueError("each sample must be (gt_ids, gt_segments, pred_ids, pred_segments), got "
                       f"a tuple of {len(sample)}")
    _checks.raise_if_nonfinite(_checks.as_array(sample[2], "pred_ids"), f"pred_ids of sample {i}")
    acc.update(*sample)
  return acc.result()
