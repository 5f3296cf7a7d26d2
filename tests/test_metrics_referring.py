"""Referring-segmentation metrics (metrics/referring.py) against a per-example loop written here
from the RefCOCO papers' definitions, on hand-made masks, and accumulated over batches."""
import math

import numpy as np
import pytest

from dense_diffusion import metrics
from dense_diffusion.metrics import referring

RNG = np.random.default_rng(0)


def _box(h, w, top, left, bottom, right):
  m = np.zeros((h, w), bool)
  m[top:bottom, left:right] = True
  return m


def _reference(preds, gts, valids):
  """oIoU, mIoU, prec_X written out example by example (an empty union scores IoU 1)."""
  sum_i = sum_u = 0
  ious = []
  for p, g, v in zip(preds, gts, valids):
    i = u = 0
    for y in range(p.shape[0]):
      for x in range(p.shape[1]):
        if v[y, x]:
          i += int(p[y, x] and g[y, x])
          u += int(p[y, x] or g[y, x])
    sum_i, sum_u = sum_i + i, sum_u + u
    ious.append(i / u if u else 1.0)
  out = {"oiou": sum_i / sum_u, "miou": sum(ious) / len(ious)}
  for t in (0.5, 0.6, 0.7, 0.8, 0.9):
    out[f"prec_{t}"] = sum(iou >= t for iou in ious) / len(ious)
  return out


def _hand_made():
  """Five 8x8 examples: exact, half overlap, a shifted box, an empty prediction, and an empty
  union (nothing predicted, nothing true). IoUs 1, 0.5, 9/23, 0, 1 (empty union)."""
  h = w = 8
  gts = [_box(h, w, 2, 2, 6, 6), _box(h, w, 0, 0, 4, 8), _box(h, w, 1, 1, 5, 5),
         _box(h, w, 0, 0, 2, 2), np.zeros((h, w), bool)]
  preds = [_box(h, w, 2, 2, 6, 6), _box(h, w, 0, 0, 2, 8), _box(h, w, 2, 2, 6, 6),
           np.zeros((h, w), bool), np.zeros((h, w), bool)]
  return np.stack(preds), np.stack(gts)


def test_hand_made_masks_equal_the_reference_and_known_values():
  preds, gts = _hand_made()
  got = metrics.referring_metrics(preds, gts)
  want = _reference(preds, gts, np.ones_like(gts))
  for k in referring.REFERRING_KEYS:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k
  # By hand: intersections 16 + 16 + 9 + 0 + 0, unions 16 + 32 + 23 + 4 + 0.
  assert got["oiou"] == pytest.approx(41 / 75)
  assert got["miou"] == pytest.approx((1 + 0.5 + 9 / 23 + 0 + 1) / 5)
  assert got["prec_0.5"] == pytest.approx(3 / 5)  # 1, 0.5 (>= 0.5 counts), empty union
  assert got["prec_0.6"] == pytest.approx(2 / 5)


def test_validity_mask_and_random_batches_accumulated():
  m = metrics.ReferringMetrics()
  preds, gts, valids = [], [], []
  for n in (3, 1, 4):  # batches of different sizes
    p = RNG.uniform(size=(n, 12, 10)) > 0.6
    g = RNG.uniform(size=(n, 12, 10)) > 0.5
    v = RNG.uniform(size=(n, 12, 10)) > 0.2
    m.update(p, g, v)
    preds += list(p)
    gts += list(g)
    valids += list(v)
  got, want = m.result(), _reference(preds, gts, valids)
  assert got["num_examples"] == 8
  for k in referring.REFERRING_KEYS:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k


def test_soft_predictions_threshold_and_nonfinite_are_skipped():
  preds, gts = _hand_made()
  soft = np.where(preds, 0.8, 0.3).astype(np.float32)
  assert metrics.referring_metrics(soft, gts) == metrics.referring_metrics(preds, gts)
  m = metrics.ReferringMetrics()
  bad = soft.copy()
  bad[1, 0, 0] = np.nan
  m.update(bad, gts)
  assert m.result()["num_nonfinite"] == 1 and m.num_examples == 4
  keep = [0, 2, 3, 4]
  assert m.result()["oiou"] == pytest.approx(
      metrics.referring_metrics(preds[keep], gts[keep])["oiou"])
  m.update(preds[0], gts[0])  # a single (H, W) example
  assert m.num_examples == 5


def test_empty_and_errors():
  assert math.isnan(metrics.ReferringMetrics().result()["oiou"])
  with pytest.raises(ValueError, match="shape mismatch"):
    metrics.referring_metrics(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
