"""PQ: hand-worked cases (crowd, void, unmatched, things/stuff, skipped category) and the real
COCO panoptic sample (ground truth vs itself and vs perturbed copies)."""
import json

import numpy as np
import pytest
from PIL import Image

from dense_diffusion import metrics

PERSON, CAR, SKY, GRASS, ROAD = 1, 2, 10, 11, 12
CATS = [{"id": PERSON, "isthing": 1}, {"id": CAR, "isthing": 1}, {"id": SKY, "isthing": 0},
        {"id": GRASS, "isthing": 0}, {"id": ROAD, "isthing": 0}]


def _hand_samples():
  # Image 1. gt: 1 person (6 px), 2 crowd person (4 px), 3 sky (5 px), 4 grass (3 px), 2 void.
  gt1 = np.array([[1, 1, 1, 2, 2],
                  [1, 1, 1, 2, 2],
                  [3, 3, 3, 3, 3],
                  [0, 0, 4, 4, 4]])
  gt1_s = [{"id": 1, "category_id": PERSON, "iscrowd": 0},
           {"id": 2, "category_id": PERSON, "iscrowd": 1},
           {"id": 3, "category_id": SKY, "iscrowd": 0},
           {"id": 4, "category_id": GRASS, "iscrowd": 0}]
  pr1 = np.array([[5, 5, 5, 6, 6],
                  [5, 5, 7, 6, 6],
                  [5, 7, 7, 7, 7],
                  [5, 8, 0, 9, 9]])
  pr1_s = [{"id": 5, "category_id": PERSON}, {"id": 6, "category_id": PERSON},
           {"id": 7, "category_id": SKY}, {"id": 8, "category_id": CAR},
           {"id": 9, "category_id": SKY}]
  # pred 5 (7 px, 1 on void) vs gt 1: I = 5, U = 7 + 6 - 5 - 1 = 7 -> TP person, IoU 5/7.
  # pred 6 lies on the person crowd -> ignored; the crowd is no FN.
  # pred 7 vs gt 3: I = 4, U = 5 + 5 - 4 = 6 -> TP sky, IoU 2/3.
  # pred 8 (car) is all void -> ignored. pred 9 (sky) on grass -> FP sky; gt 4 -> FN grass.

  # Image 2. gt: 1 car (4 px), 2 crowd person (4 px).
  gt2 = np.array([[1, 1, 2, 2],
                  [1, 1, 2, 2]])
  gt2_s = [{"id": 1, "category_id": CAR, "iscrowd": 0},
           {"id": 2, "category_id": PERSON, "iscrowd": 1}]
  pr2 = np.array([[3, 3, 3, 4],
                  [5, 5, 4, 4]])
  pr2_s = [{"id": 3, "category_id": PERSON, "iscrowd": 0}, {"id": 4, "category_id": PERSON},
           {"id": 5, "category_id": CAR}]
  # pred 3 (person): 1 of 3 px on the person crowd, not > 1/2 -> FP person.
  # pred 5 (car) vs gt 1: I = 2, U = 2 + 4 - 2 = 4, IoU = 0.5 exactly, not > 0.5 -> FP car and
  # gt 1 -> FN car. pred 4 (person) all on the person crowd -> ignored.
  return [(gt1, gt1_s, pr1, pr1_s), (gt2, gt2_s, pr2, pr2_s)]


def test_hand_worked():
  res = metrics.panoptic_quality(_hand_samples(), CATS)
  pc = res["per_class"]
  assert (pc[PERSON]["tp"], pc[PERSON]["fp"], pc[PERSON]["fn"]) == (1, 1, 0)
  assert (pc[CAR]["tp"], pc[CAR]["fp"], pc[CAR]["fn"]) == (0, 1, 1)
  assert (pc[SKY]["tp"], pc[SKY]["fp"], pc[SKY]["fn"]) == (1, 1, 0)
  assert (pc[GRASS]["tp"], pc[GRASS]["fp"], pc[GRASS]["fn"]) == (0, 0, 1)
  assert (pc[ROAD]["tp"], pc[ROAD]["fp"], pc[ROAD]["fn"]) == (0, 0, 0)
  assert pc[PERSON]["pq"] == pytest.approx((5 / 7) / 1.5)
  assert pc[PERSON]["sq"] == pytest.approx(5 / 7)
  assert pc[PERSON]["rq"] == pytest.approx(2 / 3)
  assert pc[SKY]["pq"] == pytest.approx((2 / 3) / 1.5)
  assert pc[CAR]["pq"] == pc[GRASS]["pq"] == pc[ROAD]["pq"] == 0.0
  things = res["Things"]
  assert things["n"] == 2
  assert things["pq"] == pytest.approx(5 / 21)
  assert things["sq"] == pytest.approx(5 / 14)
  assert things["rq"] == pytest.approx(1 / 3)
  stuff = res["Stuff"]  # road never appears: left out, n = 2 not 3
  assert stuff["n"] == 2
  assert stuff["pq"] == pytest.approx(2 / 9)
  assert stuff["sq"] == pytest.approx(1 / 3)
  assert res["All"]["n"] == 4
  assert res["All"]["pq"] == pytest.approx((10 / 21 + 4 / 9) / 4)
  assert res["All"]["sq"] == pytest.approx((5 / 7 + 2 / 3) / 4)
  assert res["All"]["rq"] == pytest.approx(1 / 3)


def only_image_2(samples):
  return metrics.panoptic_quality(samples[1:], CATS)["All"]


def test_streaming_equals_one_shot_and_merge():
  samples = _hand_samples()
  a = metrics.PanopticQuality(CATS)
  a.update(*samples[0])
  b = metrics.PanopticQuality(CATS)
  b.update(*samples[1])
  merged = a.merge(b).result()
  one_shot = metrics.panoptic_quality(samples, CATS)
  assert merged["All"] == one_shot["All"] and merged["num_images"] == 2
  # A NaN prediction map: the one-shot function refuses it, the accumulator skips and counts it.
  gt, gt_s, pr, pr_s = samples[0]
  nan_pred = pr.astype(np.float64)
  nan_pred[0, :2] = np.nan
  with pytest.raises(ValueError, match="2 non-finite"):
    metrics.panoptic_quality([samples[1], (gt, gt_s, nan_pred, pr_s)], CATS)
  b.update(gt, gt_s, nan_pred, pr_s)
  assert b.num_nonfinite == 1 and b.num_images == 1
  assert b.result()["All"] == only_image_2(samples)
  # Sums before dividing: image 2 alone has no TP, so the per-image means would differ.
  only2 = metrics.panoptic_quality(samples[1:], CATS)
  assert only2["All"]["pq"] == 0.0 and only2["Stuff"]["n"] == 0
  assert np.isnan(only2["Stuff"]["pq"])


def test_several_crowd_segments_of_one_category_all_count():
  gt = np.array([[1, 1, 2, 2, 3, 3]])
  gt_s = [{"id": 1, "category_id": PERSON, "iscrowd": 1},
          {"id": 2, "category_id": PERSON, "iscrowd": 1},
          {"id": 3, "category_id": SKY, "iscrowd": 0}]
  pred = np.array([[4, 4, 4, 4, 5, 5]])  # 4 px person over two person crowds
  pred_s = [{"id": 4, "category_id": PERSON}, {"id": 5, "category_id": SKY}]
  res = metrics.panoptic_quality([(gt, gt_s, pred, pred_s)], CATS)
  assert res["per_class"][PERSON]["fp"] == 0  # (2 + 2) / 4 on crowd: ignored
  assert res["All"]["n"] == 1 and res["All"]["pq"] == 1.0


def test_errors():
  gt = np.array([[1, 1], [2, 0]])
  gt_s = [{"id": 1, "category_id": PERSON}, {"id": 2, "category_id": SKY}]
  acc = metrics.PanopticQuality(CATS)
  with pytest.raises(ValueError, match=r"pred segment IDs \[7\] are present in the map"):
    acc.update(gt, gt_s, np.array([[1, 7], [2, 0]]), gt_s)
  with pytest.raises(ValueError, match=r"pred segment IDs \[2\] are present in the segment list"):
    acc.update(gt, gt_s, np.array([[1, 1], [1, 0]]), gt_s)
  with pytest.raises(ValueError, match="unknown category_id 99"):
    acc.update(gt, gt_s, gt, [gt_s[0], {"id": 2, "category_id": 99}])
  with pytest.raises(ValueError, match=r"gt segment IDs \[2\] are present in the map"):
    acc.update(gt, gt_s[:1], gt, gt_s)
  with pytest.raises(ValueError, match="shape mismatch"):
    acc.update(gt, gt_s, gt[:1], gt_s)
  with pytest.raises(ValueError, match="more than once"):
    acc.update(gt, gt_s + gt_s[:1], gt, gt_s)
  with pytest.raises(ValueError, match="RGB-encoded"):
    acc.update(np.zeros((2, 2, 3), np.uint8), [], gt, gt_s)
  assert acc.num_images == 0


# ----- real COCO panoptic sample -----

@pytest.fixture(scope="module")
def coco(shared_fixtures):
  root = shared_fixtures / "coco_panoptic_sample"
  data = json.loads((root / "sample_data" / "panoptic_examples.json").read_text())
  cats = json.loads((root / "panoptic_coco_categories.json").read_text())
  images = []
  for ann in data["annotations"]:
    rgb = np.asarray(Image.open(root / "sample_data" / "panoptic_examples" / ann["file_name"]),
                     np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    images.append((ids, ann["segments_info"]))
  return images, cats


def _present_categories(images):
  """Categories with at least one non-crowd gt segment (only those are counted)."""
  return {s["category_id"] for _, segs in images for s in segs if not s["iscrowd"]}


def test_coco_gt_against_itself(coco):
  images, cats = coco
  res = metrics.panoptic_quality([(ids, s, ids, s) for ids, s in images], cats)
  present = _present_categories(images)
  assert res["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": len(present)}
  isthing = {c["id"]: c["isthing"] for c in cats}
  assert res["Things"]["n"] == sum(isthing[c] for c in present) > 0
  assert res["Stuff"]["n"] == sum(1 - isthing[c] for c in present) > 0
  # Crowd gt segments, copied into the prediction, are neither TP, FP nor FN.
  crowd_person = sum(1 for _, segs in images for s in segs if s["iscrowd"] and
                     s["category_id"] == 1)
  assert crowd_person == 2
  n_person = sum(1 for _, segs in images for s in segs if not s["iscrowd"] and
                 s["category_id"] == 1)
  assert res["per_class"][1] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "tp": n_person, "fp": 0,
                                 "fn": 0}


def test_coco_one_segment_removed(coco):
  images, cats = coco
  ids, segs = images[0]
  victim = next(s for s in segs if s["category_id"] == 1 and not s["iscrowd"])
  pred_ids = np.where(ids == victim["id"], 0, ids)
  pred_segs = [s for s in segs if s["id"] != victim["id"]]
  samples = [(ids, segs, pred_ids, pred_segs)] + [(i, s, i, s) for i, s in images[1:]]
  res = metrics.panoptic_quality(samples, cats)
  n_person = sum(1 for _, ss in images for s in ss if not s["iscrowd"] and s["category_id"] == 1)
  pc = res["per_class"][1]
  assert (pc["tp"], pc["fp"], pc["fn"]) == (n_person - 1, 0, 1)
  pq_person = (n_person - 1) / (n_person - 1 + 0.5)  # every TP has IoU 1
  assert pc["pq"] == pytest.approx(pq_person, rel=1e-12)
  assert pc["sq"] == 1.0
  n = len(_present_categories(images))
  assert res["All"]["pq"] == pytest.approx((n - 1 + pq_person) / n, rel=1e-12)
  n_things = res["Things"]["n"]
  assert res["Things"]["pq"] == pytest.approx((n_things - 1 + pq_person) / n_things, rel=1e-12)
  assert res["Stuff"]["pq"] == 1.0


def _erode(mask):
  """4-neighbour binary erosion with plain numpy shifts (outside the image counts as off)."""
  p = np.pad(mask, 1)
  return (p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:])


def test_coco_one_segment_eroded(coco):
  images, cats = coco
  ids, segs = images[1]
  victim = max((s for s in segs if s["category_id"] == 19 and not s["iscrowd"]),
               key=lambda s: s["area"])  # the largest non-crowd horse
  eroded = _erode(ids == victim["id"])
  pred_ids = np.where((ids == victim["id"]) & ~eroded, 0, ids)  # boundary ring -> void
  # IoU by set counting, independent of the metric's bincount.
  gt_pix = set(zip(*np.nonzero(ids == victim["id"])))
  pred_pix = set(zip(*np.nonzero(pred_ids == victim["id"])))
  iou = len(gt_pix & pred_pix) / len(gt_pix | pred_pix)
  assert 0.5 < iou < 0.95
  samples = [(images[0][0], images[0][1], images[0][0], images[0][1]),
             (ids, segs, pred_ids, segs)]
  res = metrics.panoptic_quality(samples, cats)
  n_horse = sum(1 for s in segs if s["category_id"] == 19 and not s["iscrowd"])
  pc = res["per_class"][19]
  assert (pc["tp"], pc["fp"], pc["fn"]) == (n_horse, 0, 0)
  sq_horse = (n_horse - 1 + iou) / n_horse
  assert pc["sq"] == pytest.approx(sq_horse, rel=1e-12)
  assert pc["pq"] == pytest.approx(sq_horse, rel=1e-12) and pc["rq"] == 1.0
  n = res["All"]["n"]
  assert res["All"]["sq"] == pytest.approx((n - 1 + sq_horse) / n, rel=1e-12)
  assert res["All"]["pq"] == pytest.approx((n - 1 + sq_horse) / n, rel=1e-12)
  assert res["All"]["rq"] == 1.0


def _loop_reference(samples, cats):
  """Pair-by-pair restatement of the panopticapi rules with dicts and Python loops."""
  stats = {c["id"]: [0, 0, 0, 0.0] for c in cats}  # tp, fp, fn, iou
  for gt, gt_s, pr, pr_s in samples:
    gseg = {s["id"]: s for s in gt_s}
    pseg = {s["id"]: s for s in pr_s}
    garea = {k: int((gt == k).sum()) for k in gseg}
    parea = {k: int((pr == k).sum()) for k in pseg}
    inter = {}
    for g, p in zip(gt.ravel().tolist(), pr.ravel().tolist()):
      inter[(g, p)] = inter.get((g, p), 0) + 1
    gm, pm = set(), set()
    for (g, p), n in inter.items():
      if g == 0 or p == 0 or gseg[g].get("iscrowd", 0):
        continue
      if gseg[g]["category_id"] != pseg[p]["category_id"]:
        continue
      iou = n / (parea[p] + garea[g] - n - inter.get((0, p), 0))
      if iou > 0.5:
        st = stats[gseg[g]["category_id"]]
        st[0] += 1
        st[3] += iou
        gm.add(g)
        pm.add(p)
    for g, s in gseg.items():
      if g not in gm and not s.get("iscrowd", 0):
        stats[s["category_id"]][2] += 1
    for p, s in pseg.items():
      if p in pm:
        continue
      ign = inter.get((0, p), 0) + sum(
          inter.get((g, p), 0) for g, gs in gseg.items()
          if gs.get("iscrowd", 0) and gs["category_id"] == s["category_id"])
      if ign / parea[p] <= 0.5:
        stats[s["category_id"]][1] += 1
  return stats


def test_random_layouts_vs_loop_reference():
  rng = np.random.default_rng(0)
  samples = []
  for _ in range(6):
    h, w = 24, 30
    # Blocky gt: 6x6 cells with 12 segment ids; prediction = gt with cells relabelled/merged,
    # its own random ids, pixel noise and void holes.
    cell = rng.integers(0, 13, (h // 6, w // 6))
    gt = np.kron(cell, np.ones((6, 6), int))
    gt_ids = np.unique(gt[gt > 0])
    gt_s = [{"id": int(i), "category_id": int(rng.choice([PERSON, CAR, SKY, GRASS])),
             "iscrowd": int(rng.random() < 0.2)} for i in gt_ids]
    pr = np.where(rng.random(gt.shape) < 0.15, rng.integers(0, 13, gt.shape), gt)
    pr = np.where(rng.random(gt.shape) < 0.05, 0, pr) * 7 + np.where(pr > 0, 1000, 0)
    pr_ids = np.unique(pr[pr > 0])
    by_gt = {s["id"]: s["category_id"] for s in gt_s}
    pr_s = [{"id": int(i), "category_id": by_gt.get((int(i) - 1000) // 7, SKY)
             if rng.random() < 0.8 else int(rng.choice([PERSON, CAR, SKY, GRASS]))}
            for i in pr_ids]
    samples.append((gt, gt_s, pr, pr_s))
  res = metrics.panoptic_quality(samples, CATS)
  ref = _loop_reference(samples, CATS)
  assert sum(v[0] for v in ref.values()) > 5 and sum(v[1] for v in ref.values()) > 5
  for cid, (tp, fp, fn, iou) in ref.items():
    pc = res["per_class"][cid]
    assert (pc["tp"], pc["fp"], pc["fn"]) == (tp, fp, fn), cid
    if tp:
      assert pc["sq"] == pytest.approx(iou / tp, rel=1e-12)
