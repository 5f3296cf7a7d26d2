"""mIoU from the streaming confusion matrix vs torchmetrics and vs a hand-worked case."""
import logging

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from dense_diffusion import metrics


def test_hand_worked():
  gt = np.array([[0, 1, 2, 255], [0, 1, 1, 1]])
  pred = np.array([[0, 1, 1, 3], [0, 0, 0, 1]])
  res = metrics.semantic_metrics(pred, gt, num_classes=5)
  # class 0: tp 2, fp 2 (gt 1 read as 0 twice), fn 0 -> 2/4; class 1: tp 2 of gt 4, pred 3 -> 2/5;
  # class 2: in gt only -> 0; class 3 predicted only on an ignored pixel and class 4 never -> NaN.
  np.testing.assert_allclose(res["iou"], [0.5, 0.4, 0.0, np.nan, np.nan])
  assert res["miou"] == pytest.approx(0.3)
  assert res["pixel_accuracy"] == pytest.approx(4 / 7)
  assert res["num_pixels"] == 7
  np.testing.assert_allclose(res["accuracy"], [1.0, 0.5, 0.0, np.nan, np.nan])
  assert res["mean_accuracy"] == pytest.approx(0.5)


def test_matches_torchmetrics_streaming():
  k = 7
  rng = np.random.default_rng(0)
  gt = rng.integers(0, k - 2, (6, 20, 24))  # classes 5 and 6 never in gt
  gt[:, :3] = 255
  pred = np.where(rng.random(gt.shape) < 0.6, np.where(gt == 255, 0, gt),
                  rng.integers(0, k - 1, gt.shape))  # class 5 predicted, class 6 never
  acc = metrics.SemanticConfusion(k, ignore_index=255)
  acc.update(pred[0:2], gt[0:2])  # stream: two batches of 2, then two single images
  acc.update(pred[2:4], gt[2:4])
  acc.update(pred[4], gt[4])
  acc.update(pred[5], gt[5])
  res = acc.result()
  tm_none = MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="none")(
      torch.from_numpy(pred), torch.from_numpy(gt)).numpy()
  tm_macro = float(MulticlassJaccardIndex(num_classes=k, ignore_index=255, average="macro")(
      torch.from_numpy(pred), torch.from_numpy(gt)))
  present = ~np.isnan(res["iou"])
  assert present.tolist() == [True] * 6 + [False]  # class 5: predicted only -> IoU 0, counted
  assert res["iou"][5] == 0.0
  np.testing.assert_allclose(res["iou"][present], tm_none[present], atol=1e-6)
  # Documented difference: torchmetrics gives 0 (zero_division) where we give NaN...
  assert tm_none[6] == 0.0
  # ...and its macro average leaves such classes out, as our mIoU does.
  assert res["miou"] == pytest.approx(tm_macro, abs=1e-6)
  assert res["num_images"] == 6


def test_bincount_confusion_vs_loop_counting():
  k = 4
  rng = np.random.default_rng(1)
  gt = rng.integers(0, k, (9, 11))
  pred = rng.integers(0, k, (9, 11))
  acc = metrics.SemanticConfusion(k)
  acc.update(pred, gt)
  expected = np.zeros((k, k), int)
  for g, p in zip(gt.ravel(), pred.ravel()):
    expected[g, p] += 1
  np.testing.assert_array_equal(acc.confusion, expected)


def test_bad_input_and_nonfinite(caplog):
  acc = metrics.SemanticConfusion(3)
  with pytest.raises(ValueError, match="shape mismatch"):
    acc.update(np.zeros((4, 4), int), np.zeros((4, 5), int))
  with pytest.raises(ValueError, match=r"gt has labels \[7\]"):
    acc.update(np.zeros((2, 2), int), np.array([[0, 7], [1, 255]]))
  with pytest.raises(ValueError, match=r"pred has labels \[3\]"):
    acc.update(np.array([[0, 3], [1, 1]]), np.zeros((2, 2), int))
  with pytest.raises(ValueError, match="collides"):
    metrics.SemanticConfusion(300, ignore_index=255)
  pred = np.zeros((2, 3, 3))
  pred[1, 0, 0] = np.nan
  with pytest.raises(ValueError, match="1 non-finite"):
    metrics.semantic_metrics(pred, np.zeros((2, 3, 3), int), 3)
  with caplog.at_level(logging.WARNING, logger="dense_diffusion.metrics"):
    acc.update(pred, np.zeros((2, 3, 3), int))
  res = acc.result()
  assert res["num_nonfinite"] == 1 and res["num_images"] == 1 and res["num_pixels"] == 9
  assert res["miou"] == 1.0 and "skipped 1 image" in caplog.text


def _mmseg_reference(preds, raw_gts, num_classes, ignore_index=255):
  """ADE20K as mmsegmentation 1.x scores it, written out: LoadAnnotations(reduce_zero_label=True)
  on the uint8 annotation, IoUMetric.intersect_and_union (torch.histc) per image, areas summed
  over the split, total_area_to_metrics, then np.nanmean per metric."""
  totals = [torch.zeros(num_classes, dtype=torch.float64) for _ in range(4)]
  for pred, raw in zip(preds, raw_gts):
    gt = raw.astype(np.uint8).copy()
    gt[gt == 0] = 255          # "avoid using underflow conversion"
    gt = gt - 1
    gt[gt == 254] = 255
    pred_t = torch.from_numpy(pred.astype(np.int64))
    label = torch.from_numpy(gt.astype(np.int64))
    keep = label != ignore_index
    pred_t, label = pred_t[keep], label[keep]
    intersect = pred_t[pred_t == label]
    hist = lambda x: torch.histc(x.double(), bins=num_classes, min=0, max=num_classes - 1)
    area_intersect, area_pred, area_label = hist(intersect), hist(pred_t), hist(label)
    area_union = area_pred + area_label - area_intersect
    for total, area in zip(totals, (area_intersect, area_union, area_pred, area_label)):
      total += area
  inter, union, _, label = totals
  iou = (inter / union).numpy()        # 0 / 0 -> NaN for classes absent from both
  acc = (inter / label).numpy()
  return {"aAcc": float(inter.sum() / label.sum()), "mIoU": float(np.nanmean(iou)),
          "mAcc": float(np.nanmean(acc)), "IoU": iou, "Acc": acc}


def test_ade20k_reduce_zero_label_matches_mmseg():
  k = 12
  rng = np.random.default_rng(7)
  raw = rng.integers(0, k - 1, (5, 24, 30)).astype(np.uint8)  # raw 0..10: class 10 and 11 absent
  raw[:, :2] = 0                                              # "other": ignored
  raw[1, 5:8] = 255                                           # an ignore value in the raw map
  classes = np.where(raw == 0, 0, raw.astype(np.int64) - 1)   # what a decent model would predict
  pred = np.where(rng.random(raw.shape) < 0.7, classes, rng.integers(0, k - 1, raw.shape))
  pred[:, 0, :] = k - 1                                       # class 11: predicted on ignored only
  pred[2, 10, :3] = k - 2                                     # class 10: predicted, never in gt
  acc = metrics.SemanticConfusion(k, reduce_zero_label=True)
  for i in range(0, 5, 2):
    acc.update(pred[i:i + 2], raw[i:i + 2])
  res = acc.result()
  ref = _mmseg_reference(pred, raw, k)
  np.testing.assert_allclose(res["iou"], ref["IoU"], rtol=1e-12)  # NaN in the same places
  np.testing.assert_allclose(res["accuracy"], ref["Acc"], rtol=1e-12)
  assert np.isnan(res["iou"][k - 1]) and res["iou"][k - 2] == 0.0
  assert res["miou"] == pytest.approx(ref["mIoU"], rel=1e-12)
  assert res["pixel_accuracy"] == pytest.approx(ref["aAcc"], rel=1e-12)
  assert res["mean_accuracy"] == pytest.approx(ref["mAcc"], rel=1e-12)
  assert res["num_pixels"] == int(((raw != 0) & (raw != 255)).sum())
  one_shot = metrics.semantic_metrics(pred, raw, k, reduce_zero_label=True)
  assert one_shot["miou"] == pytest.approx(ref["mIoU"], rel=1e-12)
  # Without the option the same raw map is read as classes 0..K-1: a different number.
  plain = metrics.semantic_metrics(pred, raw, k)
  assert abs(plain["miou"] - res["miou"]) > 0.05


def test_reduce_zero_label_bad_input():
  acc = metrics.SemanticConfusion(3, reduce_zero_label=True)
  with pytest.raises(ValueError, match=r"raw labels \[4\] outside 0..3"):
    acc.update(np.zeros((2, 2), int), np.array([[0, 4], [1, 3]]))
  with pytest.raises(ValueError, match="collides"):
    metrics.SemanticConfusion(150, ignore_index=150, reduce_zero_label=True)
  metrics.SemanticConfusion(150, ignore_index=0, reduce_zero_label=True)  # raw 0 is ignored anyway
  with pytest.raises(ValueError, match="reduce_zero_label"):
    metrics.SemanticConfusion(3).merge(acc)
