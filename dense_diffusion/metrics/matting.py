"""Alpha matting errors as the matting literature computes them: SAD, MSE, MAD, Grad, Conn.

The definitions are those of alphamatting.com (Rhemann et al., CVPR 2009) as coded in the Deep
Image Matting evaluation scripts (Xu et al., CVPR 2017: `compute_sad_loss.m`,
`compute_mse_loss.m`, `compute_gradient_loss.m`, `compute_connectivity_error.m`), which later
papers (GCA, MatteFormer, P3M, AM-2k / GFM, GenPercept) reuse. Alphas are in [0, 1] (the scripts
divide the 8-bit PNGs by 255). Every error is summed (SAD, Grad, Conn) or averaged (MSE, MAD) over
a region: the trimap's unknown pixels for trimap-based benchmarks (Composition-1k), the whole
image for trimap-free ones (P3M-500, AM-2k), which is the default here.

  sad   sum |pred - gt| / 1000                                   (papers report SAD / 1000)
  mse   mean (pred - gt)^2                                       (many tables print it x 1e3)
  mad   mean |pred - gt|                                         (P3M, AM-2k)
  grad  sum (|grad pred| - |grad gt|)^2 / 1000, gradients by first-order Gaussian-derivative
        filters with sigma 1.4 (`gauss_gradient`: the scripts' `gaussgradient`)
  conn  sum |phi(pred) - phi(gt)| / 1000, the connectivity of every pixel to the largest
        4-connected region where both mattes are >= a threshold, thresholds 0.1, 0.2, ..., 1
        (`connectivity_phi`)

The benchmark numbers are means of these per-image values over a test set (`MattingMetrics`).

Differences from the MATLAB scripts, none of which changes a value for 8-bit mattes that reach
both 0 and 1: `compute_gradient_loss.m` first stretches each matte to its own min..max
(`mat2gray`), where we take the alpha as it is (as the Python ports do); the scripts compute in
single precision, we in float64; MATLAB's `max` picks the first of two largest regions of equal
size in column-major order, which we reproduce by labelling the transposed mask.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from dense_diffusion.metrics import _checks

MATTING_KEYS = ("sad", "mse", "mad", "grad", "conn")
GRADIENT_SIGMA = 1.4  # Rhemann et al.'s Gaussian-derivative scale.
# Kernel half size: where the Gaussian falls under this fraction of its peak (`gaussgradient`).
GRADIENT_EPSILON = 1e-2
CONNECTIVITY_STEP = 0.1  # threshold spacing.
CONNECTIVITY_MIN_DIFF = 0.15  # alpha - level differences below this count as connected.
REPORT_SCALE = 1000.0  # SAD, Grad and Conn are reported divided by this.


def _alpha(x, name: str) -> np.ndarray:
  """u8 (0..255) or float [0, 1] alpha [H, W] -> f64 in [0, 1]."""
  arr = _checks.as_array(x, name)
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  _checks.check_ndim(arr, (2,), name, "(H, W)")
  if arr.dtype == np.uint8:
    return arr.astype(np.float64) / 255.0
  if not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(f"{name} must be a float alpha in [0, 1] or uint8 0..255, got {arr.dtype}")
  _checks.raise_if_nonfinite(arr, name)
  return arr.astype(np.float64)


def _region(region, shape) -> np.ndarray:
  if region is None:
    return np.ones(shape, bool)
  region = np.asarray(region)
  if region.shape != shape:
    raise ValueError(f"region has shape {region.shape}, the mattes {shape}")
  return region.astype(bool)


def _inputs(pred, gt, region):
  pred, gt = _alpha(pred, "pred"), _alpha(gt, "gt")
  _checks.check_same_shape(pred, gt)
  return pred, gt, _region(region, gt.shape)


def sad(pred, gt, region=None) -> float:
  """Sum of absolute differences over the region, / 1000."""
  pred, gt, region = _inputs(pred, gt, region)
  return float(np.sum(np.abs(pred - gt)[region]) / REPORT_SCALE)


def mse(pred, gt, region=None) -> float:
  """Mean squared difference over the region (NaN for an empty region)."""
  pred, gt, region = _inputs(pred, gt, region)
  return float(np.mean(np.square(pred - gt)[region])) if region.any() else math.nan


def mad(pred, gt, region=None) -> float:
  """Mean absolute difference over the region (NaN for an empty region)."""
  pred, gt, region = _inputs(pred, gt, region)
  return float(np.mean(np.abs(pred - gt)[region])) if region.any() else math.nan


def gradient_kernel_1d(sigma: float = GRADIENT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
  """(gauss, dgauss): the 1-D factors of `gaussgradient`'s kernel hx[i, j] = gauss[i] *
  dgauss[j] (rows i, columns j), both of length 2 * half + 1, with half = ceil(sigma *
  sqrt(-2 log(sqrt(2 pi) sigma epsilon))) (9 taps for sigma 1.4) and hx scaled to unit L2 norm
  (the scale goes into `dgauss`)."""
  half = math.ceil(sigma * math.sqrt(-2.0 * math.log(math.sqrt(2 * math.pi) * sigma
                                                     * GRADIENT_EPSILON)))
  u = np.arange(-half, half + 1, dtype=np.float64)
  gauss = np.exp(-u**2 / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
  dgauss = -u * gauss / sigma**2
  # ||outer(gauss, dgauss)||_2 = ||gauss|| * ||dgauss||.
  dgauss = dgauss / (np.linalg.norm(gauss) * np.linalg.norm(dgauss))
  return gauss, dgauss


def gauss_gradient(alpha: np.ndarray, sigma: float = GRADIENT_SIGMA
                   ) -> tuple[np.ndarray, np.ndarray]:
  """(gx, gy) f64[H, W]: `imfilter(alpha, hx, 'replicate', 'conv')` and the same with hx' (the
  separable kernel as two 1-D convolutions; borders replicate the edge pixels)."""
  gauss, dgauss = gradient_kernel_1d(sigma)
  a = np.asarray(alpha, np.float64)
  # 'conv' flips the kernel: convolve1d does the same.
  gx = ndimage.convolve1d(ndimage.convolve1d(a, gauss, axis=0, mode="nearest"), dgauss, axis=1,
                          mode="nearest")
  gy = ndimage.convolve1d(ndimage.convolve1d(a, gauss, axis=1, mode="nearest"), dgauss, axis=0,
                          mode="nearest")
  return gx, gy


def gradient_error(pred, gt, region=None, sigma: float = GRADIENT_SIGMA) -> float:
  """Sum over the region of the squared difference of gradient magnitudes, / 1000."""
  pred, gt, region = _inputs(pred, gt, region)
  amp = lambda a: np.hypot(*gauss_gradient(a, sigma))
  return float(np.sum(np.square(amp(pred) - amp(gt))[region]) / REPORT_SCALE)


def _largest_region(mask: np.ndarray) -> np.ndarray:
  """bool[H, W]: the largest 4-connected component of `mask` (MATLAB's first one of equal size
  in column-major order; empty when the mask is)."""
  labels, count = ndimage.label(mask.T)  # scipy's default structure is 4-connectivity
  if count == 0:
    return np.zeros_like(mask)
  sizes = np.bincount(labels.ravel())[1:]
  return (labels == 1 + int(np.argmax(sizes))).T


def connectivity_levels(pred: np.ndarray, gt: np.ndarray, step: float = CONNECTIVITY_STEP
                        ) -> np.ndarray:
  """f64[H, W]: per pixel, the last threshold at which it still belonged to the largest region
  where both mattes are >= the threshold (`l_map` of the scripts; 1 if it always did)."""
  count = int(round(1.0 / step))
  thresholds = np.arange(count + 1) / count  # k / 10: the doubles nearest to 0.1, ..., 1
  level = np.full(pred.shape, -1.0)
  for i in range(1, count + 1):
    omega = _largest_region((pred >= thresholds[i]) & (gt >= thresholds[i]))
    level[(level == -1.0) & ~omega] = thresholds[i - 1]
  level[level == -1.0] = 1.0
  return level


def connectivity_phi(alpha: np.ndarray, level: np.ndarray) -> np.ndarray:
  """phi = 1 - d * [d >= 0.15] with d = alpha - level: how disconnected each pixel is."""
  d = alpha - level
  return 1.0 - d * (d >= CONNECTIVITY_MIN_DIFF)


def connectivity_error(pred, gt, region=None, step: float = CONNECTIVITY_STEP) -> float:
  """Sum over the region of |phi(pred) - phi(gt)|, / 1000 (the regions of the thresholds are
  taken over the whole image)."""
  pred, gt, region = _inputs(pred, gt, region)
  level = connectivity_levels(pred, gt, step)
  diff = np.abs(connectivity_phi(pred, level) - connectivity_phi(gt, level))
  return float(np.sum(diff[region]) / REPORT_SCALE)


def matting_metrics(pred, gt, region=None) -> dict[str, float]:
  """All five errors of one matte (pred, gt: f[H, W] in [0, 1] or u8; region: bool[H, W] or
  None for the whole image)."""
  return {"sad": sad(pred, gt, region), "mse": mse(pred, gt, region),
          "mad": mad(pred, gt, region), "grad": gradient_error(pred, gt, region),
          "conn": connectivity_error(pred, gt, region)}


class MattingMetrics:
  """Streaming per-image mean of the matting errors over a test set.

  `update(pred, gt, region=None)` adds one image (or a batch [N, H, W]); a prediction with
  non-finite values is skipped and counted. `result()`: the mean of each of `MATTING_KEYS`,
  `num_images`, `num_nonfinite`.
  """

  def __init__(self):
    self.sums = dict.fromkeys(MATTING_KEYS, 0.0)
    self.num_images = 0
    self.num_nonfinite = 0

  def update(self, pred, gt, region=None) -> None:
    pred, gt = _checks.as_array(pred, "pred"), _checks.as_array(gt, "gt")
    if pred.ndim == 2:
      pred, gt = pred[None], gt[None]
      region = None if region is None else np.asarray(region)[None]
    _checks.check_same_shape(pred, gt)
    bad = _checks.nonfinite_per_image(pred)
    if bad.any():
      self.num_nonfinite += int(bad.sum())
      _checks.warn_skipped("MattingMetrics", int(bad.sum()), self.num_nonfinite)
    for i in np.flatnonzero(~bad):
      values = matting_metrics(pred[i], gt[i], None if region is None else region[i])
      for k, v in values.items():
        self.sums[k] += v
      self.num_images += 1

  def result(self) -> dict:
    n = self.num_images
    return {**{k: (v / n if n else math.nan) for k, v in self.sums.items()},
            "num_images": n, "num_nonfinite": self.num_nonfinite}
