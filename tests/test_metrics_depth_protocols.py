"""Depth evaluation as Marigold's script computes it (alignment in depth and disparity space,
alignment_max_res through torch's own Upsample), and the named protocols (crops, ranges, DIODE's
mask, overrides)."""
import math

import numpy as np
import pytest
import torch

from dense_diffusion import metrics


def _marigold_downsample(x, max_res):
  """What Marigold's align_depth_least_square does to an (H, W) array before the fit: torch's
  nearest Upsample on torch.as_tensor(x).unsqueeze(0) (a (1, H, W) tensor)."""
  scale = np.min(max_res / np.array(x.shape[-2:]))
  if scale >= 1:
    return x
  down = torch.nn.Upsample(scale_factor=scale, mode="nearest")
  if x.dtype == bool:
    return down(torch.as_tensor(x).unsqueeze(0).float()).bool().numpy()[0]
  return down(torch.as_tensor(x).unsqueeze(0)).numpy()[0]


def _reference(pred, gt, valid, min_depth, max_depth, alignment, max_res=None):
  """One image, written out after Marigold's script/depth/eval.py and src/util/metric.py."""
  pred = pred.astype(np.float64)
  gt = gt.astype(np.float64)
  if alignment in ("scale_shift", "scale_shift_disparity"):
    if alignment == "scale_shift":
      target, fit = gt, valid
    else:  # least_square_disparity: gt -> disparity (0 where gt <= 0), fit where both > 0
      target = np.zeros_like(gt)
      target[gt > 0] = 1.0 / gt[gt > 0]
      fit = valid & (gt > 0) & (pred > 0)
    p_fit, t_fit, m_fit = pred, target, fit
    if max_res is not None:
      p_fit, t_fit = _marigold_downsample(pred, max_res), _marigold_downsample(target, max_res)
      m_fit = _marigold_downsample(fit, max_res)
    a = np.stack([p_fit[m_fit], np.ones(int(m_fit.sum()))], axis=1)
    scale, shift = np.linalg.lstsq(a, t_fit[m_fit], rcond=None)[0]
    pred = pred * scale + shift
    if alignment == "scale_shift_disparity":
      disparity = np.clip(pred, 1e-3, None)
      pred = np.zeros_like(disparity)
      pred[disparity > 0] = 1.0 / disparity[disparity > 0]
  pred = np.clip(pred, min_depth, max_depth)
  pred = np.clip(pred, 1e-6, None)
  p, g = pred[valid], gt[valid]
  ratio = np.maximum(p / g, g / p)
  return {
      "abs_rel": np.mean(np.abs(p - g) / g),
      "sq_rel": np.mean(np.abs(p - g) ** 2 / g),
      "rmse": np.sqrt(np.mean((p - g) ** 2)),
      "rmse_log": np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)),
      "log10": np.mean(np.abs(np.log10(p) - np.log10(g))),
      "delta1": np.mean(ratio < 1.25),
      "delta2": np.mean(ratio < 1.25 ** 2),
      "delta3": np.mean(ratio < 1.25 ** 3),
  }


def _mean_reference(pred, gt, valid, *args, **kwargs):
  refs = [_reference(pred[i], gt[i], valid[i], *args, **kwargs) for i in range(len(pred))]
  return {k: float(np.mean([r[k] for r in refs])) for k in metrics.DEPTH_KEYS}


@pytest.fixture(scope="module")
def disparity_batch():
  """Ground truth with holes, a far band and NaN; an affine-invariant disparity prediction with
  noise and some non-positive values (left out of the fit, then clipped at 1e-3)."""
  rng = np.random.default_rng(0)
  gt = rng.uniform(0.6, 9.5, (3, 30, 44))
  gt[0, :5] = 0.0
  gt[1, :, :4] = 11.0
  gt[2, 7, 7] = np.nan
  filled = np.nan_to_num(gt, nan=1.0)
  disp = np.divide(1.0, filled, out=np.zeros_like(filled), where=filled > 0)
  pred = 3.0 * disp - 0.2 + rng.normal(0, 0.05, gt.shape)
  pred[:, -3:, :6] = -0.5
  mask = np.ones(gt.shape[1:], bool)
  mask[:2] = False
  return pred, gt, mask


@pytest.mark.parametrize("alignment", ["scale_shift", "scale_shift_disparity"])
@pytest.mark.parametrize("max_res", [None, 20])
def test_alignment_matches_marigold(disparity_batch, alignment, max_res):
  pred, gt, mask = disparity_batch
  if alignment == "scale_shift":
    pred = 1.0 / np.clip(pred, 0.05, None)  # an affine-invariant depth instead
  got = metrics.depth_metrics(pred, gt, mask=mask, alignment=alignment,
                              alignment_max_res=max_res)
  valid = (gt > 1e-3) & (gt < 10.0) & mask
  expected = _mean_reference(pred, gt, valid, 1e-3, 10.0, alignment, max_res)
  for k in metrics.DEPTH_KEYS:
    assert got[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12), k
  if alignment == "scale_shift_disparity":
    assert got["delta1"] > 0.9  # the fit in disparity space undid the affine distortion
  # The streaming accumulator gives the same per-image mean.
  acc = metrics.DepthMetrics(alignment=alignment, mask=mask, alignment_max_res=max_res)
  acc.update(pred[:2], gt[:2])
  acc.update(pred[2], gt[2])
  res = acc.result()
  for k in metrics.DEPTH_KEYS:
    assert res[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-12), k


def test_disparity_alignment_is_exact_for_affine_disparity():
  rng = np.random.default_rng(1)
  gt = rng.uniform(1.0, 8.0, (2, 12, 16))
  pred = 0.5 / gt + 0.25  # exactly affine in disparity
  got = metrics.depth_metrics(pred, gt, alignment="scale_shift_disparity")
  assert got["abs_rel"] < 1e-12 and got["rmse"] < 1e-11 and got["delta1"] == 1.0
  # Affine in depth instead: the depth-space fit is exact, the disparity-space one is not.
  depth_affine = 2.0 * gt + 1.0
  assert metrics.depth_metrics(depth_affine, gt, alignment="scale_shift")["abs_rel"] < 1e-12
  assert metrics.depth_metrics(depth_affine, gt,
                               alignment="scale_shift_disparity")["abs_rel"] > 1e-3


def test_disparity_fit_with_no_positive_prediction():
  """lstsq on an empty system gives s = t = 0: disparity 1e-3 everywhere, depth clamped to max."""
  gt = np.full((1, 6, 6), 2.0)
  got = metrics.depth_metrics(-np.ones_like(gt), gt, alignment="scale_shift_disparity")
  expected = _reference(-np.ones((6, 6)), gt[0], np.ones((6, 6), bool), 1e-3, 10.0,
                        "scale_shift_disparity")
  assert got["rmse"] == pytest.approx(8.0) == pytest.approx(expected["rmse"])


@pytest.mark.parametrize("shape,max_res", [((4032, 6048), 1024), ((480, 640), 256),
                                           ((100, 37), 30), ((30, 44), 20), ((64, 64), 32),
                                           ((480, 640), 1024)])
def test_fit_columns_are_torch_upsample_columns(shape, max_res):
  h, w = shape
  cols = metrics.alignment_fit_columns(shape, max_res)
  row = np.arange(w, dtype=np.float32)[None, :].repeat(2, 0)  # (2, W): torch sees width W
  scale = np.min(max_res / np.array(shape))
  if scale >= 1:
    assert cols is None
    return
  torch_cols = torch.nn.Upsample(scale_factor=scale, mode="nearest")(
      torch.as_tensor(row).unsqueeze(0)).numpy()[0, 0].astype(np.int64)
  np.testing.assert_array_equal(cols, torch_cols)
  if shape == (4032, 6048):
    assert cols.size == 1024  # ETH3D: every one of the 4032 rows, 1024 of the columns


def test_protocol_registry_and_settings():
  assert metrics.DEPTH_PROTOCOLS.names() == [
      "diode", "eth3d", "kitti_eigen", "kitti_garg", "nyu_eigen", "scannet"]
  p = {n: metrics.depth_protocol(n) for n in metrics.DEPTH_PROTOCOLS.names()}
  # Marigold's dataset classes: (min_depth, max_depth); DIODE's mask alone decides validity.
  assert (p["nyu_eigen"].min_depth, p["nyu_eigen"].max_depth) == (1e-3, 10.0)
  assert (p["kitti_eigen"].min_depth, p["kitti_eigen"].max_depth) == (1e-5, 80.0)
  assert (p["kitti_garg"].min_depth, p["kitti_garg"].max_depth) == (1e-3, 80.0)
  assert (p["eth3d"].min_depth, p["eth3d"].max_depth) == (1e-5, math.inf)
  assert (p["scannet"].min_depth, p["scannet"].max_depth) == (1e-3, 10.0)
  assert (p["diode"].min_depth, p["diode"].max_depth, p["diode"].valid_range) == (0.6, 350.0,
                                                                                  False)
  assert p["eth3d"].alignment_max_res == 1024
  assert p["kitti_garg"].alignment is None
  assert all(p[n].alignment == "scale_shift" for n in p if n != "kitti_garg")
  np.testing.assert_array_equal(p["nyu_eigen"].eval_mask((480, 640)),
                                metrics.nyu_eigen_crop_mask())
  assert p["scannet"].eval_mask((480, 640)) is None
  with pytest.raises(KeyError, match="known depth protocols: diode, eth3d"):
    metrics.depth_protocol("nyu")
  lotus = metrics.depth_protocol("nyu_eigen", alignment="scale_shift_disparity")
  assert lotus.alignment == "scale_shift_disparity" and lotus.crop is p["nyu_eigen"].crop
  with pytest.raises(ValueError, match="unknown override"):
    metrics.depth_protocol("nyu_eigen", max_res=5)
  with pytest.raises(ValueError, match="alignment must be one of"):
    metrics.depth_protocol("nyu_eigen", alignment="affine")


def test_kitti_crops():
  # Written out from the fractions (BTS / Marigold): int(f * size) bounds.
  for (h, w), crop, box in [((352, 1216), "garg", (143, 349, 43, 1172)),
                            ((352, 1216), "eigen", (117, 321, 43, 1172)),
                            ((375, 1242), "garg", (153, 371, 44, 1197))]:
    mask = metrics.kitti_crop_mask((h, w), crop)
    expected = np.zeros((h, w), bool)
    expected[box[0]:box[1], box[2]:box[3]] = True
    np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(metrics.depth_protocol("kitti_garg").eval_mask((352, 1216)),
                                metrics.kitti_crop_mask((352, 1216), "garg"))
  raw = np.arange(375 * 1242).reshape(375, 1242)
  kb = metrics.kitti_benchmark_crop(raw)
  assert kb.shape == (352, 1216) and kb[0, 0] == raw[23, 13]  # top 375 - 352, left 26 / 2
  img = np.zeros((2, 375, 1242, 3))
  assert metrics.kitti_benchmark_crop(img, axes=(-3, -2)).shape == (2, 352, 1216, 3)
  with pytest.raises(ValueError, match="at least 352x1216"):
    metrics.kitti_benchmark_crop(np.zeros((300, 1216)))
  with pytest.raises(ValueError, match="crop must be one of"):
    metrics.kitti_crop_mask((352, 1216), "eigen_crop")


def test_protocol_metrics_and_accumulator_nyu():
  rng = np.random.default_rng(2)
  gt = rng.uniform(0.5, 9.0, (2, 480, 640)).astype(np.float32)
  gt[0, 100:120] = 0.0
  pred = 0.4 * gt + 0.3 + rng.normal(0, 0.05, gt.shape).astype(np.float32)
  proto = metrics.depth_protocol("nyu_eigen")
  got = proto.metrics(pred, gt)
  crop = metrics.nyu_eigen_crop_mask()
  valid = (gt > 1e-3) & (gt < 10.0) & crop
  expected = _mean_reference(pred, gt, valid, 1e-3, 10.0, "scale_shift")
  for k in metrics.DEPTH_KEYS:
    assert got[k] == pytest.approx(expected[k], rel=1e-7), k
  acc = proto.accumulator()
  acc.update(pred[0], gt[0])
  acc.update(pred[1:], gt[1:])
  res = acc.result()
  assert res["num_images"] == 2
  for k in metrics.DEPTH_KEYS:
    assert res[k] == pytest.approx(got[k], rel=1e-12), k
  # A further mask (e.g. the dataset's own) is ANDed with the crop.
  extra = np.ones((480, 640), bool)
  extra[200:300] = False
  got2 = proto.metrics(pred, gt, mask=extra)
  expected2 = _mean_reference(pred, gt, valid & extra, 1e-3, 10.0, "scale_shift")
  assert got2["abs_rel"] == pytest.approx(expected2["abs_rel"], rel=1e-7)
  with pytest.raises(ValueError, match="480x640"):
    proto.metrics(pred[:, :240, :320], gt[:, :240, :320])


def test_diode_validity_is_the_mask():
  rng = np.random.default_rng(3)
  gt = rng.uniform(0.3, 40.0, (2, 20, 24))  # values below 0.6 m still count inside the mask
  gt[0, :3] = 0.0
  mask = np.ones(gt.shape, bool)
  mask[0, :3] = False
  mask[1, :, :5] = False
  pred = 0.1 * gt + 0.5 + rng.normal(0, 0.1, gt.shape)
  proto = metrics.depth_protocol("diode")
  with pytest.raises(ValueError, match="validity mask"):
    proto.metrics(pred, gt)
  got = proto.metrics(pred, gt, mask=mask)
  expected = _mean_reference(pred, gt, mask, 0.6, 350.0, "scale_shift")
  for k in metrics.DEPTH_KEYS:
    assert got[k] == pytest.approx(expected[k], rel=1e-9), k
  acc = proto.accumulator()
  with pytest.raises(ValueError, match="validity mask"):
    acc.update(pred, gt)
  acc.update(pred, gt, mask)
  assert acc.result()["abs_rel"] == pytest.approx(got["abs_rel"], rel=1e-12)


def test_eth3d_protocol_runs_with_infinite_range():
  rng = np.random.default_rng(4)
  gt = rng.uniform(0.5, 30.0, (1, 40, 60))
  gt[0, :4] = 0.0  # ETH3D's inf depth, read as 0: invalid
  pred = 1.0 / gt.clip(0.5) * 2 + 0.1
  got = metrics.depth_protocol("eth3d", alignment_max_res=16).metrics(1.0 / pred, gt)
  valid = (gt > 1e-5) & (gt < np.inf)
  expected = _mean_reference(1.0 / pred, gt, valid, 1e-5, np.inf, "scale_shift", 16)
  for k in metrics.DEPTH_KEYS:
    assert got[k] == pytest.approx(expected[k], rel=1e-9), k


def test_bad_arguments():
  gt = np.full((8, 8), 2.0)
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="alignment_max_res"):
      metrics.depth_metrics(gt, gt, alignment="scale_shift", alignment_max_res=bad)
  with pytest.raises(ValueError, match="alignment_max_res"):
    metrics.DepthMetrics(alignment_max_res=0)
  with pytest.raises(ValueError, match="crop must be a function"):
    metrics.DepthMetrics(crop=np.ones((8, 8), bool))
  with pytest.raises(ValueError, match="validity mask"):
    metrics.depth_metrics(gt, gt, valid_range=False)
  acc = metrics.DepthMetrics(crop=lambda hw: np.ones((4, 4), bool))
  with pytest.raises(ValueError, match="crop function returned"):
    acc.update(gt, gt)
