"""DIS5K metrics (metrics/dichotomous.py) against straightforward implementations written here
from the papers' formulas (per-threshold loops, per-pixel enhanced alignment, brute-force
nearest foreground pixels, explicit filtering) and on limit cases known by hand."""
import math

import numpy as np
import pytest

from dense_diffusion import metrics
from dense_diffusion.metrics import dichotomous as dis

RNG = np.random.default_rng(0)
EPS = 1e-16


def _prepared(pred):
  """The toolbox's reading of a map: / 255 for u8, then stretched to [0, 1] unless constant."""
  p = pred.astype(np.float64) / 255 if pred.dtype == np.uint8 else pred.astype(np.float64)
  return (p - p.min()) / (p.max() - p.min()) if p.max() > p.min() else p


def _binary_maps(p):
  """The 256 binary maps floor(255 p) >= t, t = 0..255."""
  levels = np.floor(p * 255).astype(int)
  return [levels >= t for t in range(256)]


def _ref_f_curve(pred, gt, beta2=0.3):
  p = _prepared(pred)
  out = []
  for fm in _binary_maps(p):
    tp = np.sum(fm & gt)
    precision = tp / fm.sum() if fm.sum() else 0.0
    recall = tp / gt.sum() if gt.sum() else 0.0
    out.append((1 + beta2) * precision * recall / (beta2 * precision + recall)
               if precision + recall else 0.0)
  return np.array(out)


def _ref_enhanced(fm, gt):
  """Fan et al. 2018: the enhanced-alignment score of a binary map, pixel by pixel."""
  fm, g = fm.astype(np.float64), gt.astype(np.float64)
  n = g.size
  if g.sum() == 0:
    enhanced = 1 - fm
  elif g.sum() == n:
    enhanced = fm
  else:
    phi_fm, phi_gt = fm - fm.mean(), g - g.mean()
    xi = 2 * phi_gt * phi_fm / (phi_gt**2 + phi_fm**2 + EPS)
    enhanced = (xi + 1) ** 2 / 4
  return enhanced.sum() / (n - 1 + EPS)


def _ref_e_curve(pred, gt):
  return np.array([_ref_enhanced(fm, gt) for fm in _binary_maps(_prepared(pred))])


def _ref_s_measure(pred, gt, alpha=0.5):
  """Fan et al. 2017, from the paper: object term + region term about the centroid."""
  p, g = _prepared(pred), gt.astype(np.float64)
  y = g.mean()
  if y == 0:
    return 1 - p.mean()
  if y == 1:
    return p.mean()

  def object_score(values):
    x = values.mean()
    return 2 * x / (x * x + 1 + values.std() + EPS)

  obj = y * object_score(p[gt]) + (1 - y) * object_score(1 - p[~gt])
  h, w = g.shape
  total = g.sum()
  # Centroid: the mean 1-based column / row of the foreground, rounded (half to even).
  cx = int(np.round(sum(j * g[:, j].sum() for j in range(w)) / total)) + 1
  cy = int(np.round(sum(i * g[i, :].sum() for i in range(h)) / total)) + 1
  region = 0.0
  for rows, cols in (((0, cy), (0, cx)), ((0, cy), (cx, w)), ((cy, h), (0, cx)),
                     ((cy, h), (cx, w))):
    bp, bg = p[rows[0]:rows[1], cols[0]:cols[1]], g[rows[0]:rows[1], cols[0]:cols[1]]
    n = bp.size
    if not n:
      continue
    mx, my = bp.mean(), bg.mean()
    vx = ((bp - mx) ** 2).sum() / (n - 1 + np.finfo(float).eps)
    vy = ((bg - my) ** 2).sum() / (n - 1 + np.finfo(float).eps)
    cxy = ((bp - mx) * (bg - my)).sum() / (n - 1 + np.finfo(float).eps)
    a, b = 4 * mx * my * cxy, (mx**2 + my**2) * (vx + vy)
    ssim = a / (b + EPS) if a != 0 else (1.0 if b == 0 else 0.0)
    region += n / (h * w) * ssim
  return max(0.0, alpha * obj + (1 - alpha) * region)


def _ref_weighted_f(pred, gt, beta=1.0):
  """Margolin et al. 2014, with the nearest foreground pixel found by brute force (the tests'
  ground truths have a unique nearest one) and the 7x7 Gaussian (sigma 5) applied by loops
  with zeros outside the image."""
  p, g = _prepared(pred), gt
  h, w = g.shape
  err = np.abs(p - g)
  fg = np.argwhere(g)
  spread, dist = err.copy(), np.zeros((h, w))
  for y in range(h):
    for x in range(w):
      if not g[y, x]:
        d = np.hypot(fg[:, 0] - y, fg[:, 1] - x)
        k = np.argmin(d)
        spread[y, x], dist[y, x] = err[tuple(fg[k])], d[k]
  yy, xx = np.mgrid[-3:4, -3:4]
  kernel = np.exp(-(xx**2 + yy**2) / 50.0)
  kernel /= kernel.sum()
  blurred = np.zeros((h, w))
  for y in range(h):
    for x in range(w):
      for i in range(-3, 4):
        for j in range(-3, 4):
          if 0 <= y + i < h and 0 <= x + j < w:
            blurred[y, x] += kernel[i + 3, j + 3] * spread[y + i, x + j]
  dependent = np.where(g & (blurred < err), blurred, err)
  importance = np.where(g, 1.0, 2 - 0.5 ** (dist / 5))
  ew = dependent * importance
  tpw = g.sum() - ew[g].sum()
  fpw = ew[~g].sum()
  recall = 1 - ew[g].mean()
  precision = tpw / (tpw + fpw)
  return (1 + beta**2) * recall * precision / (recall + beta * precision)


def _soft_map(gt, rng, noise=0.3):
  """An 8-bit prediction: the ground truth blurred by noise, clipped."""
  p = np.clip(gt * 0.8 + 0.1 + rng.normal(0, noise, gt.shape), 0, 1)
  return np.round(p * 255).astype(np.uint8)


def _disk(h, w, cy, cx, r):
  y, x = np.mgrid[:h, :w]
  return np.hypot(y - cy, x - cx) <= r


def _band(h, w, top, bottom):
  """Foreground rows top..bottom-1 across the whole width: each background pixel has exactly
  one nearest foreground pixel (straight above or below it)."""
  g = np.zeros((h, w), bool)
  g[top:bottom] = True
  return g


# --- Against the references ------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curves_mae_and_s_measure_match_the_references(seed):
  rng = np.random.default_rng(seed)
  gt = _disk(20, 24, rng.uniform(6, 14), rng.uniform(6, 18), rng.uniform(3, 7))
  pred = _soft_map(gt, rng)
  np.testing.assert_allclose(dis.f_curve(pred, gt)["f"], _ref_f_curve(pred, gt), atol=1e-12)
  np.testing.assert_allclose(dis.e_curve(pred, gt), _ref_e_curve(pred, gt), rtol=1e-12)
  assert dis.mae(pred, gt) == pytest.approx(np.mean(np.abs(_prepared(pred) - gt)), abs=1e-15)
  assert dis.s_measure(pred, gt) == pytest.approx(_ref_s_measure(pred, gt), abs=1e-12)
  # Adaptive E: the map binarised at min(2 mean, 1).
  p = _prepared(pred)
  assert dis.adaptive_e(pred, gt) == pytest.approx(
      _ref_enhanced(p >= min(2 * p.mean(), 1), gt), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_f_matches_the_reference(seed):
  rng = np.random.default_rng(seed)
  gt = _band(16, 12, 5, 10)
  pred = _soft_map(gt, rng, noise=0.25)
  assert dis.weighted_f(pred, gt) == pytest.approx(_ref_weighted_f(pred, gt), rel=1e-10)


def test_set_level_numbers_average_the_curves_then_take_the_max():
  rng = np.random.default_rng(3)
  pairs = []
  for _ in range(3):
    gt = _disk(18, 18, rng.uniform(6, 12), rng.uniform(6, 12), rng.uniform(3, 6))
    pairs.append((_soft_map(gt, rng), gt))
  acc = metrics.DichotomousMetrics()
  for p, g in pairs:
    acc.update(p, g)
  result = acc.result()
  f = np.mean([_ref_f_curve(p, g) for p, g in pairs], axis=0)
  e = np.mean([_ref_e_curve(p, g) for p, g in pairs], axis=0)
  assert result["num_images"] == 3
  assert result["max_f"] == pytest.approx(f.max(), abs=1e-12)  # one threshold for the set
  assert result["mean_e"] == pytest.approx(e.mean(), rel=1e-12)
  assert result["max_e"] == pytest.approx(e.max(), rel=1e-12)
  assert result["s_measure"] == pytest.approx(np.mean([_ref_s_measure(p, g) for p, g in pairs]))
  assert result["mae"] == pytest.approx(np.mean([dis.mae(p, g) for p, g in pairs]))


# --- Limit cases by hand ---------------------------------------------------------------------
def test_perfect_prediction():
  gt = _disk(20, 20, 10, 9, 5)
  n = gt.size
  perfect = (gt * 255).astype(np.uint8)
  r = dis.dis_metrics(perfect, gt)
  assert r["max_f"] == pytest.approx(1.0)
  assert r["weighted_f"] == pytest.approx(1.0)
  assert r["mae"] == 0.0
  assert r["s_measure"] == pytest.approx(1.0)
  # Every threshold but 0 (where every pixel is foreground: xi = 0, 1/4 per pixel) reproduces the
  # ground truth: xi = 1 everywhere, sum N over N - 1.
  assert r["max_e"] == pytest.approx(n / (n - 1))
  assert r["mean_e"] == pytest.approx((255 * n / (n - 1) + 0.25 * n / (n - 1)) / 256)
  assert r["adaptive_e"] == pytest.approx(n / (n - 1))


def test_inverted_prediction():
  gt = _disk(20, 20, 10, 10, 5)  # 3 pixels or more from every border
  inverted = ((~gt) * 255).astype(np.uint8)
  r = dis.dis_metrics(inverted, gt)
  assert r["mae"] == 1.0
  assert r["weighted_f"] == pytest.approx(0.0, abs=1e-12)  # every error 1, spread or not
  assert r["s_measure"] == 0.0  # negative correlation in every block, clipped at 0
  # Its best threshold is 0, "everything is foreground": F of precision p, recall 1.
  p = gt.mean()
  assert r["max_f"] == pytest.approx(1.3 * p / (0.3 * p + 1))
  # Thresholds >= 1 give the exact opposite: xi = -1, enhanced 0.
  assert dis.e_curve(inverted, gt)[1:] == pytest.approx(0.0, abs=1e-12)


def test_empty_ground_truth_and_constant_maps():
  gt = np.zeros((8, 8), bool)
  dark = np.full((8, 8), 0.2)
  assert dis.s_measure(dark, gt) == pytest.approx(0.8)  # 1 - mean: constant maps unstretched
  assert dis.weighted_f(dark, gt) == 0.0
  assert dis.mae(dark, gt) == pytest.approx(0.2)
  full = np.ones((8, 8), bool)
  assert dis.s_measure(dark, full) == pytest.approx(0.2)
  # Without foreground the E-measure scores the background the map predicts: at threshold
  # t <= 51 (floor(0.2 * 255) = 51) none, above it all 64 pixels.
  curve = dis.e_curve(dark, gt)
  assert curve[:52] == pytest.approx(0.0) and curve[52:] == pytest.approx(64 / 63)


def test_normalisation_like_the_toolbox():
  """A map is stretched to its own min..max first: an affine change of it changes nothing."""
  rng = np.random.default_rng(4)
  gt = _disk(16, 16, 8, 8, 4)
  # Quarter steps, squeezed into [1/4, 3/4]: every value and its stretching back is exact.
  pred = np.round(_soft_map(gt, rng).astype(np.float64) / 255 * 4) / 4
  squeezed = 0.25 + 0.5 * pred
  a, b = dis.dis_metrics(pred, gt), dis.dis_metrics(squeezed, gt)
  for key in metrics.DIS_KEYS:
    assert a[key] == b[key], key
  # u8 ground truth is foreground above 128 (DIS5K's PNGs).
  u8 = np.where(gt, 200, 100).astype(np.uint8)
  assert dis.dis_metrics(pred, u8)["s_measure"] == pytest.approx(a["s_measure"])


def test_bad_inputs_raise_and_nonfinite_is_skipped():
  with pytest.raises(ValueError, match="shape mismatch"):
    dis.mae(np.zeros((4, 4)), np.zeros((4, 5), bool))
  with pytest.raises(ValueError, match="non-finite"):
    dis.mae(np.full((2, 2), np.inf), np.zeros((2, 2), bool))
  acc = metrics.DichotomousMetrics()
  acc.update(np.full((4, 4), np.nan), np.zeros((4, 4), bool))
  assert acc.result()["num_nonfinite"] == 1 and math.isnan(acc.result()["max_f"])
