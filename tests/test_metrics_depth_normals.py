"""Depth metrics vs a direct transcription of the formulas; alignment vs lstsq; normals."""
import logging

import numpy as np
import pytest

from dense_diffusion import metrics


def _reference_depth(pred, gt, valid, min_depth, max_depth, alignment):
  """Straight transcription, one image at a time, with np.linalg.lstsq for alignment."""
  p = pred[valid].astype(np.float64)
  g = gt[valid].astype(np.float64)
  if alignment == "scale":
    s = np.linalg.lstsq(p[:, None], g, rcond=None)[0][0]
    p = s * p
  elif alignment == "scale_shift":
    s, t = np.linalg.lstsq(np.stack([p, np.ones_like(p)], 1), g, rcond=None)[0]
    p = s * p + t
  p = np.clip(p, min_depth, max_depth)
  thresh = np.maximum(p / g, g / p)
  return {
      "abs_rel": np.mean(np.abs(p - g) / g),
      "sq_rel": np.mean((p - g) ** 2 / g),
      "rmse": np.sqrt(np.mean((p - g) ** 2)),
      "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)),
      "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
      "delta1": np.mean(thresh < 1.25),
      "delta2": np.mean(thresh < 1.25 ** 2),
      "delta3": np.mean(thresh < 1.25 ** 3),
  }


@pytest.fixture(scope="module")
def depth_batch():
  rng = np.random.default_rng(0)
  gt = rng.uniform(0.5, 9.0, (3, 24, 32))
  gt[0, :4] = 0.0          # invalid (0 = missing)
  gt[1, :, :3] = 12.0      # beyond max_depth
  gt[2, 5, 5] = np.nan     # never valid
  # An affine-distorted, noisy prediction (what an affine-invariant model outputs).
  pred = 0.3 * gt + 0.1 + rng.normal(0, 0.03, gt.shape)
  pred = np.nan_to_num(pred, nan=1.0)
  pred[1, 10, 10] = 25.0   # gets clamped to max_depth
  mask = np.ones(gt.shape[1:], bool)
  mask[:, -2:] = False
  return pred, gt, mask


@pytest.mark.parametrize("alignment", [None, "scale", "scale_shift"])
def test_depth_matches_reference(depth_batch, alignment):
  pred, gt, mask = depth_batch
  got = metrics.depth_metrics(pred, gt, mask=mask, alignment=alignment)
  valid = (gt > 1e-3) & (gt < 10.0) & mask
  refs = [_reference_depth(pred[i], gt[i], valid[i], 1e-3, 10.0, alignment) for i in range(3)]
  for k in metrics.DEPTH_KEYS:
    assert got[k] == pytest.approx(np.mean([r[k] for r in refs]), rel=1e-9, abs=1e-12), k
  if alignment == "scale_shift":
    assert got["delta1"] > 0.8  # alignment undid the affine distortion
  if alignment is None:
    assert got["delta1"] < 0.2


def test_alignment_vs_lstsq(depth_batch):
  pred, gt, _ = depth_batch
  valid = (gt > 1e-3) & (gt < 10.0)
  for alignment in ("scale", "scale_shift"):
    aligned = metrics.align_depth(pred, np.nan_to_num(gt), valid, alignment)
    for i in range(3):
      p, g = pred[i][valid[i]], gt[i][valid[i]]
      a = p[:, None] if alignment == "scale" else np.stack([p, np.ones_like(p)], 1)
      coef = np.linalg.lstsq(a, g, rcond=None)[0]
      expected = coef[0] * pred[i] + (coef[1] if alignment == "scale_shift" else 0.0)
      np.testing.assert_allclose(aligned[i], expected, rtol=1e-10)
  # Constant prediction: scale undetermined, the fit gives mean(gt) like lstsq's min-norm answer.
  const = metrics.align_depth(np.full((1, 4, 4), 2.0), gt[:1, 10:14, 10:14],
                              np.ones((1, 4, 4), bool), "scale_shift")
  np.testing.assert_allclose(const, gt[:1, 10:14, 10:14].mean())


def test_streaming_depth_and_eigen_crop(depth_batch, caplog):
  pred, gt, mask = depth_batch
  acc = metrics.DepthMetrics(alignment="scale_shift", mask=mask)
  acc.update(pred[0], gt[0])
  bad = pred[1:].copy()
  bad[0, 0, 0] = np.inf
  with caplog.at_level(logging.WARNING, logger="dense_diffusion.metrics"):
    acc.update(bad, gt[1:])
    acc.update(pred[2], np.zeros_like(gt[2]))  # no valid pixel: skipped as empty
  res = acc.result()
  assert (res["num_images"], res["num_nonfinite"], res["num_empty"]) == (2, 1, 1)
  assert "non-finite" in caplog.text
  expected = metrics.depth_metrics(pred[[0, 2]], gt[[0, 2]], mask=mask, alignment="scale_shift")
  for k in metrics.DEPTH_KEYS:
    assert res[k] == pytest.approx(expected[k], rel=1e-12)

  crop = metrics.nyu_eigen_crop_mask()
  assert crop.shape == (480, 640) and crop.sum() == (471 - 45) * (601 - 41)
  assert crop[45, 41] and crop[470, 600] and not crop[44, 41] and not crop[45, 601]
  with pytest.raises(ValueError, match="480x640"):
    metrics.nyu_eigen_crop_mask((240, 320))
  half = metrics.nyu_eigen_crop_mask((240, 320), rescale=True)
  assert half.sum() == (236 - 23) * (301 - 21)  # 45/2, 471/2, 41/2, 601/2 rounded half up
  assert half[23, 21] and not half[22, 21] and not half[23, 301]


def test_depth_bad_input():
  gt = np.full((8, 8), 2.0)
  with pytest.raises(ValueError, match="shape mismatch"):
    metrics.depth_metrics(np.ones((8, 9)), gt)
  pred = np.ones((8, 8))
  pred[:3, 0] = np.nan
  with pytest.raises(ValueError, match="3 non-finite"):
    metrics.depth_metrics(pred, gt)
  with pytest.raises(ValueError, match="alignment"):
    metrics.depth_metrics(np.ones((8, 8)), gt, alignment="affine")
  with pytest.raises(ValueError, match="no valid pixel"):
    metrics.depth_metrics(np.ones((2, 8, 8)), np.stack([gt, gt * 0]))
  with pytest.raises(ValueError, match="dims"):
    metrics.depth_metrics(np.ones((2, 8, 8, 3)), np.ones((2, 8, 8, 3)))


def _rand_normals(rng, shape):
  v = rng.normal(size=shape + (3,))
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_normals_vs_arccos_of_dot_products():
  rng = np.random.default_rng(0)
  gt = _rand_normals(rng, (2, 16, 20))
  pred = gt + rng.normal(0, 0.3, gt.shape)  # not unit length: the metric normalises
  gt[0, 0, :5] = 0.0                          # invalid ground truth
  mask = np.ones((2, 16, 20), bool)
  mask[1, 3:6] = False
  got = metrics.normal_metrics(pred, gt, mask=mask)
  pu = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
  valid = (np.linalg.norm(gt, axis=-1) > 0) & mask
  ang = np.degrees(np.arccos(np.clip(np.sum(pu * gt, -1), -1, 1)))[valid]
  assert ang.size == 2 * 16 * 20 - 5 - 3 * 20
  assert got["mean"] == pytest.approx(ang.mean(), rel=1e-10)
  assert got["median"] == pytest.approx(np.median(ang), rel=1e-10)
  assert got["rmse"] == pytest.approx(np.sqrt(np.mean(ang ** 2)), rel=1e-10)
  for t, key in ((11.25, "a11.25"), (22.5, "a22.5"), (30.0, "a30")):
    assert got[key] == pytest.approx(np.mean(ang < t), abs=1e-12)
  assert 0 < got["a11.25"] < got["a22.5"] < got["a30"] < 1
  # Known angles: perpendicular -> 90, opposite -> 180, zero prediction counted as 90.
  z = np.array([[[0.0, 0.0, 1.0]] * 3])
  p = np.array([[[1.0, 0.0, 0.0], [0.0, 0.0, -2.0], [0.0, 0.0, 0.0]]])
  np.testing.assert_allclose(metrics.angular_error(p, z)[0], [[90.0, 180.0, 90.0]])

  # Streaming: pixel-pooled over images, non-finite image skipped, histogram median.
  acc = metrics.NormalMetrics()
  acc.update(pred[0], gt[0], mask[0])
  bad = pred[1:].copy()
  bad[0, 0, 0, 0] = np.nan
  acc.update(bad, gt[1:], mask[1:])
  acc.update(pred[1], gt[1], mask[1])
  res = acc.result()
  assert res["num_nonfinite"] == 1 and res["num_images"] == 2 and res["num_pixels"] == ang.size
  assert res["mean"] == pytest.approx(ang.mean(), rel=1e-10)
  assert res["a22.5"] == pytest.approx(np.mean(ang < 22.5), abs=1e-12)
  assert abs(res["median"] - np.median(ang)) <= 1e-3


def test_normals_bad_input():
  n = np.zeros((4, 4, 3))
  n[..., 2] = 1
  with pytest.raises(ValueError, match="3 channels"):
    metrics.normal_metrics(np.zeros((4, 4, 2)), np.zeros((4, 4, 2)))
  with pytest.raises(ValueError, match="shape mismatch"):
    metrics.normal_metrics(n, n[:3])
  bad = n.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="1 non-finite"):
    metrics.normal_metrics(bad, n)
  with pytest.raises(ValueError, match="mask shape"):
    metrics.normal_metrics(n, n, mask=np.ones((4, 5), bool))


def _torch_errors(pred, gt):
  """Per-pixel angles as DSINE's compute_normal_error / Marigold's compute_cosine_error take
  them: torch.cosine_similarity over the channel axis, clamped, acos, degrees."""
  import torch  # pylint: disable=g-import-not-at-top
  p = torch.as_tensor(np.moveaxis(pred, -1, 0), dtype=torch.float64)
  g = torch.as_tensor(np.moveaxis(gt, -1, 0), dtype=torch.float64)
  cos = torch.clamp(torch.cosine_similarity(p, g, dim=0), -1.0, 1.0)
  return (torch.acos(cos) * 180.0 / np.pi).numpy()


def _stats(e):
  """DSINE's compute_normal_metrics on a 1-D array of errors (fractions instead of percent)."""
  out = {"mean": np.average(e), "median": np.median(e), "rmse": np.sqrt(np.sum(e * e) / e.size)}
  for t in (5, 7.5, 11.25, 22.5, 30):
    out[f"a{t:g}"] = np.sum(e < t) / e.size
  return out


@pytest.fixture(scope="module")
def normals_batch():
  """Three images with very different numbers of valid pixels and error levels, so the pooled and
  the per-image conventions disagree."""
  rng = np.random.default_rng(5)
  gt = _rand_normals(rng, (3, 18, 22))
  noise = np.array([0.05, 0.3, 0.8])[:, None, None, None]
  pred = gt + rng.normal(size=gt.shape) * noise
  gt[0, 2:] = 0.0        # image 0: only 2 rows valid (and nearly right)
  gt[2, :, :4] = 0.0
  mask = np.ones(gt.shape[:3], bool)
  mask[1, :5] = False
  return pred, gt, mask


def test_normal_reductions_match_dsine_and_marigold(normals_batch):
  pred, gt, mask = normals_batch
  assert metrics.NORMAL_KEYS == ("mean", "median", "rmse", "a5", "a7.5", "a11.25", "a22.5",
                                 "a30")
  valid = (np.linalg.norm(gt, axis=-1) > 0) & mask
  errs = [_torch_errors(pred[i], gt[i])[valid[i]] for i in range(3)]
  pooled = _stats(np.concatenate(errs))                       # DSINE / Lotus / E2E-FT
  per_image = [_stats(e) for e in errs]                       # Marigold, then MetricTracker mean
  averaged = {k: np.mean([m[k] for m in per_image]) for k in pooled}
  got_pixel = metrics.normal_metrics(pred, gt, mask)
  got_image = metrics.normal_metrics(pred, gt, mask, reduction="image")
  for k in metrics.NORMAL_KEYS:
    assert got_pixel[k] == pytest.approx(pooled[k], rel=1e-9, abs=1e-12), k
    assert got_image[k] == pytest.approx(averaged[k], rel=1e-9, abs=1e-12), k
  assert abs(got_pixel["median"] - got_image["median"]) > 1.0  # the conventions really differ
  assert abs(got_pixel["mean"] - got_image["mean"]) > 1.0

  # Streaming, per image: exact medians, empty and non-finite images skipped and counted.
  acc = metrics.NormalMetrics(reduction="image")
  acc.update(pred[0], gt[0], mask[0])
  bad = pred[1:].copy()
  bad[0, 0, 0, 0] = np.inf
  acc.update(bad, gt[1:], mask[1:])          # image 1 skipped (non-finite), image 2 counted
  acc.update(pred[1], gt[1], mask[1])
  acc.update(pred[2], np.zeros_like(gt[2]))  # no valid pixel
  res = acc.result()
  assert (res["num_images"], res["num_nonfinite"], res["num_empty"]) == (3, 1, 1)
  assert res["num_pixels"] == sum(e.size for e in errs)
  for k in metrics.NORMAL_KEYS:
    assert res[k] == pytest.approx(averaged[k], rel=1e-9, abs=1e-12), k
  # Streaming, pooled (default): as before, the histogram median within a bin.
  pix = metrics.NormalMetrics()
  pix.update(pred, gt, mask)
  assert pix.result()["a5"] == pytest.approx(pooled["a5"], abs=1e-12)
  assert abs(pix.result()["median"] - pooled["median"]) <= 1e-3


def test_normal_reduction_errors(normals_batch):
  pred, gt, _ = normals_batch
  with pytest.raises(ValueError, match="reduction must be one of"):
    metrics.normal_metrics(pred, gt, reduction="images")
  with pytest.raises(ValueError, match="reduction must be one of"):
    metrics.NormalMetrics(reduction="dataset")
  gt0 = gt.copy()
  gt0[1] = 0.0
  with pytest.raises(ValueError, match=r"image\(s\) \[1\]"):
    metrics.normal_metrics(pred, gt0, reduction="image")
