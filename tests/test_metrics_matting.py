"""Matting errors (metrics/matting.py) against the DIM / Rhemann formulas written out here
independently (explicit loops over kernels, pixels and components), and on hand-made cases whose
answer is known by hand."""
import math

import numpy as np
import pytest

from dense_diffusion import metrics
from dense_diffusion.metrics import matting

RNG = np.random.default_rng(0)


# --- References written from the MATLAB scripts (compute_*_loss.m, gaussgradient.m) ----------
def _ref_kernel(sigma=1.4, epsilon=1e-2):
  """gaussgradient.m's hx, element by element."""
  half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * epsilon)))
  size = 2 * half + 1
  gauss = lambda x: math.exp(-x * x / (2 * sigma * sigma)) / (sigma * math.sqrt(2 * math.pi))
  dgauss = lambda x: -x * gauss(x) / (sigma * sigma)
  hx = np.zeros((size, size))
  for i in range(size):
    for j in range(size):
      hx[i, j] = gauss(i - half) * dgauss(j - half)
  return hx / math.sqrt(np.sum(np.abs(hx) ** 2))


def _ref_conv_replicate(image, kernel):
  """imfilter(image, kernel, 'replicate', 'conv'): out(y, x) = sum k(i, j) I(y - i, x - j)."""
  h, w = image.shape
  half = kernel.shape[0] // 2
  out = np.zeros((h, w))
  for y in range(h):
    for x in range(w):
      total = 0.0
      for i in range(-half, half + 1):
        for j in range(-half, half + 1):
          yy = min(max(y - i, 0), h - 1)
          xx = min(max(x - j, 0), w - 1)
          total += kernel[i + half, j + half] * image[yy, xx]
      out[y, x] = total
  return out


def _ref_gradient_error(pred, gt):
  hx = _ref_kernel()
  amp = lambda a: np.sqrt(_ref_conv_replicate(a, hx) ** 2 + _ref_conv_replicate(a, hx.T) ** 2)
  return float(np.sum((amp(pred) - amp(gt)) ** 2) / 1000)


def _ref_components(mask):
  """4-connected components (BFS), numbered in MATLAB's column-major scan order."""
  h, w = mask.shape
  labels = np.zeros((h, w), int)
  sizes = []
  for x in range(w):
    for y in range(h):
      if mask[y, x] and not labels[y, x]:
        sizes.append(0)
        labels[y, x] = len(sizes)
        queue = [(y, x)]
        while queue:
          cy, cx = queue.pop()
          sizes[-1] += 1
          for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
              labels[ny, nx] = len(sizes)
              queue.append((ny, nx))
  return labels, sizes


def _ref_connectivity(pred, gt, step=0.1):
  """compute_connectivity_error.m, line by line."""
  steps = [round(k * step, 10) for k in range(int(round(1 / step)) + 1)]
  l_map = -np.ones(pred.shape)
  for ii in range(1, len(steps)):
    labels, sizes = _ref_components((pred >= steps[ii]) & (gt >= steps[ii]))
    omega = np.zeros(pred.shape)
    if sizes:
      omega[labels == 1 + sizes.index(max(sizes))] = 1  # max: the first of equal sizes
    flag = (l_map == -1) & (omega == 0)
    l_map[flag] = steps[ii - 1]
  l_map[l_map == -1] = 1
  pred_d, gt_d = pred - l_map, gt - l_map
  pred_phi = 1 - pred_d * (pred_d >= 0.15)
  gt_phi = 1 - gt_d * (gt_d >= 0.15)
  return float(np.sum(np.abs(pred_phi - gt_phi)) / 1000)


def _blobby(h, w, rng):
  """A matte with a few soft blobs, some pixels at exactly 0 and 1, quantised to 8 bits."""
  y, x = np.mgrid[:h, :w]
  a = np.zeros((h, w))
  for _ in range(3):
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(1.5, 4)
    a = np.maximum(a, np.clip(1.5 - np.hypot(y - cy, x - cx) / r, 0, 1))
  return np.round(np.clip(a + rng.normal(0, 0.1, (h, w)) * (a > 0), 0, 1) * 255) / 255


# --- Gradient --------------------------------------------------------------------------------
def test_gradient_kernel_is_gaussgradients():
  gauss, dgauss = matting.gradient_kernel_1d(1.4)
  assert gauss.size == 9  # half size 4 for sigma 1.4
  np.testing.assert_allclose(np.outer(gauss, dgauss), _ref_kernel(), rtol=1e-12, atol=1e-15)


def test_gradient_error_matches_the_reference():
  for _ in range(3):
    pred, gt = _blobby(11, 14, RNG), _blobby(11, 14, RNG)
    assert matting.gradient_error(pred, gt) == pytest.approx(_ref_gradient_error(pred, gt),
                                                             rel=1e-10)


def test_gradient_of_a_ramp_by_hand():
  """alpha = s * x: away from the borders gy = 0 and gx = s sum_i g_i sum_j j^2 g_j c / sigma^2,
  where c scales the kernel to unit norm (the convolution of a line, done by hand)."""
  s, sigma = 0.03, 1.4
  alpha = np.tile(s * np.arange(30.0), (20, 1))
  gx, gy = matting.gauss_gradient(alpha, sigma)
  u = np.arange(-4, 5.0)
  g = np.exp(-u**2 / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
  c = 1 / math.sqrt(np.sum(np.outer(g, u * g / sigma**2) ** 2))
  expected = s * g.sum() * np.sum(u**2 * g) * c / sigma**2
  np.testing.assert_allclose(np.abs(gx[4:-4, 4:-4]), expected, rtol=1e-12)
  np.testing.assert_allclose(gy[4:-4, 4:-4], 0, atol=1e-15)
  # The gradient error against a flat matte: the squared magnitudes, summed, / 1000.
  flat = np.full_like(alpha, 0.5)
  ref = np.sum(np.hypot(gx, gy) ** 2) / 1000
  assert matting.gradient_error(flat, alpha) == pytest.approx(ref, rel=1e-12)


# --- Connectivity ----------------------------------------------------------------------------
def test_connectivity_matches_the_reference():
  for _ in range(4):
    pred, gt = _blobby(12, 10, RNG), _blobby(12, 10, RNG)
    assert matting.connectivity_error(pred, gt) == pytest.approx(_ref_connectivity(pred, gt),
                                                                 abs=1e-12)


@pytest.mark.parametrize("stray, expected", [(1.0, 1.0), (0.5, 0.5), (0.1, 0.0)])
def test_connectivity_of_a_stray_blob_by_hand(stray, expected):
  """A 3x3 opaque block in both mattes; the prediction adds one pixel of alpha `stray` apart
  from it. The block is the largest region at every threshold (level 1), every other pixel
  leaves it at the first (level 0): the stray pixel has d = stray, phi = 1 - stray when
  d >= 0.15, and every other phi is 1 in both. Conn = (1 - phi) / 1000."""
  gt = np.zeros((6, 6))
  gt[:3, :3] = 1
  pred = gt.copy()
  pred[5, 5] = stray
  assert matting.connectivity_error(pred, gt) == pytest.approx(expected / 1000, abs=1e-15)


def test_connectivity_ties_go_to_the_first_region_in_column_major_order():
  """Two equal regions: MATLAB's max picks the first found scanning columns; the other's pixels
  get level 0 and, at alpha 1 in the prediction only, phi 0."""
  gt = np.zeros((5, 5))
  gt[0, 3:5] = 1  # region A: first in row-major order
  gt[3:5, 0] = 1  # region B: first in column-major order
  pred = gt.copy()
  pred[2, 2] = 1.0  # a stray pixel, level 0 either way
  level = matting.connectivity_levels(pred, gt)
  assert np.all(level[3:5, 0] == 1) and np.all(level[0, 3:5] == 0)
  assert matting.connectivity_error(pred, gt) == pytest.approx(_ref_connectivity(pred, gt))


# --- SAD / MSE / MAD, regions, units ---------------------------------------------------------
def test_sad_mse_mad_by_hand_and_regions():
  gt = np.zeros((10, 10))
  gt[2:5, 2:6] = 1.0  # 12 pixels
  pred = np.zeros((10, 10))
  # Missing the whole foreground: SAD 12 / 1000, MSE = MAD = 12 / 100.
  assert matting.sad(pred, gt) == pytest.approx(0.012)
  assert matting.mse(pred, gt) == pytest.approx(0.12)
  assert matting.mad(pred, gt) == pytest.approx(0.12)
  # Half-transparent everywhere: |0.5 - a| = 0.5 at every pixel, squared 0.25.
  half = np.full((10, 10), 0.5)
  assert matting.sad(half, gt) == pytest.approx(0.05)
  assert matting.mse(half, gt) == pytest.approx(0.25)
  # A trimap's unknown region: only its pixels count.
  region = np.zeros((10, 10), bool)
  region[2, :] = True  # 4 foreground + 6 background pixels
  assert matting.sad(pred, gt, region) == pytest.approx(0.004)
  assert matting.mse(pred, gt, region) == pytest.approx(0.4)
  # 8-bit mattes are read as / 255 (as the scripts read the PNGs).
  u8 = np.round(gt * 255).astype(np.uint8)
  assert matting.sad(pred, u8) == pytest.approx(0.012)


def test_perfect_matte_scores_zero_and_errors_are_symmetric():
  pred, gt = _blobby(16, 16, RNG), _blobby(16, 16, RNG)
  assert matting.matting_metrics(gt, gt) == {k: 0.0 for k in metrics.MATTING_KEYS}
  for key in ("sad", "mse", "mad", "grad", "conn"):
    a = matting.matting_metrics(pred, gt)[key]
    b = matting.matting_metrics(gt, pred)[key]
    assert a == pytest.approx(b) and a > 0


def test_streaming_mean_and_skips_nonfinite():
  pairs = [(_blobby(8, 9, RNG), _blobby(8, 9, RNG)) for _ in range(3)]
  acc = metrics.MattingMetrics()
  for p, g in pairs:
    acc.update(p, g)
  bad = pairs[0][0].copy()
  bad[0, 0] = np.nan
  acc.update(bad, pairs[0][1])
  result = acc.result()
  assert result["num_images"] == 3 and result["num_nonfinite"] == 1
  for key in metrics.MATTING_KEYS:
    expected = np.mean([matting.matting_metrics(p, g)[key] for p, g in pairs])
    assert result[key] == pytest.approx(expected)
  batched = metrics.MattingMetrics()
  batched.update(np.stack([p for p, _ in pairs]), np.stack([g for _, g in pairs]))
  assert batched.result()["sad"] == pytest.approx(result["sad"])


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="shape mismatch"):
    matting.sad(np.zeros((4, 4)), np.zeros((4, 5)))
  with pytest.raises(ValueError, match="non-finite"):
    matting.mse(np.full((2, 2), np.nan), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="float alpha"):
    matting.sad(np.zeros((2, 2), np.int32), np.zeros((2, 2)))
