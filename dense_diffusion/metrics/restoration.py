"""Image restoration metrics: PSNR and SSIM, on RGB or on the BT.601 luma (Y) channel.

PSNR = 10 log10(data_range^2 / MSE), MSE over all pixels and channels of an image (float64
numpy; the same as `skimage.metrics.peak_signal_noise_ratio`). Identical images give +inf.

SSIM follows Wang et al. (2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03,
population (not sample) covariances, computed per channel on the "valid" part of the image (the
window never leaves the image) and averaged over pixels and channels. This equals
`skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=..., channel_axis=-1)`, which filters the whole image and
then crops (11 - 1) // 2 = 5 pixels from every border before averaging: the same pixels.
We use `dm_pix.ssim` (same formula, 'valid' filtering; it matches scikit-image to ~1e-6 in the
tests) with one change: its default Gaussian filter runs `jnp.convolve` under a vmap, which is
slow on CPU (~260 ms CPU time per 512x512 RGB image on the dev machine), so we pass as
`filter_fn` the same separable 11-tap Gaussian written as blocked banded matrix products
(~36 ms; see `_filter_leading_axis`). Images are divided by `data_range` first and SSIM is
taken with max_val = 1: SSIM is invariant under this joint rescaling (C1, C2 scale with
data_range^2) and float32 keeps more precision on [0, 1] than on [0, 255].

Y channel: RGB in [0, data_range] is mapped to ITU-R BT.601 luma as MATLAB `rgb2ycbcr` does,
Y = 16 + 65.481 R + 128.553 G + 24.966 B with R, G, B in [0, 1], so Y lies in [16, 235]; we
return Y / 255 and take PSNR and SSIM on it with data range 1 (both metrics are unchanged when the
images and the data range are scaled together, so this equals PSNR with peak 255 and SSIM with
L = 255 on Y in [16, 235]). scikit-image `color.rgb2ycbcr` and BasicSR `bgr2ycbcr(...,
y_only=True)` compute the same unrounded Y.

8-bit files (`as_uint8=True`): the published scripts score the PNG files the test script wrote,
not the network's float output. Restormer / MPRNet `Deraining/evaluate_PSNR_SSIM.m` (the Rain100L
/ Rain100H / Test100 / Test1200 / Test2800 numbers of MPRNet, Restormer and the papers that reuse
the script) read both images with `imread` (uint8, the restored one saved by `img_as_ubyte` of the
[0, 1]-clamped output) and call `rgb2ycbcr` on uint8, which returns uint8: Y is rounded to an
integer. PSNR is then 20 log10(255 / RMSE) on those integer Y values and SSIM is Wang's
`SSIM_index` (Gaussian 11x11, sigma 1.5, K = 0.01, 0.03, L = 255, 'valid' filtering), which is
our SSIM. With `as_uint8=True` both images are clipped to [0, data_range] and rounded to 256
levels, `rint(x / data_range * 255)` (as `img_as_ubyte`; ground truth that is already 8-bit is
unchanged) and, with `y_channel`, Y is rounded half up to an integer (MATLAB's `imlincomb`
rounding; an exact tie cannot be told apart from float rounding, so a handful of the 2^24 colours
may land one level off MATLAB's own sum). Without `as_uint8` nothing is clipped, quantised or
rounded (BasicSR `calculate_psnr(..., test_y_channel=True)` on float images).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from dense_diffusion.metrics import _checks

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
# MATLAB rgb2ycbcr / ITU-R BT.601 luma weights for R, G, B in [0, 1] (output in 0..255 scale).
Y_WEIGHTS = (65.481, 128.553, 24.966)
Y_OFFSET = 16.0


def _gaussian_1d(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  x = np.arange(size) - (size - 1) / 2
  g = np.exp(-0.5 * (x / sigma) ** 2)
  return g / g.sum()


def _filter_leading_axis(z: jax.Array, block: int = 32) -> jax.Array:
  """Gaussian 'valid' filter along axis 0 of z f32[L, ...] -> f32[L - 10, ...].

  Written as matrix products so that it runs at BLAS speed on CPU: output rows are taken in
  blocks of `block`; each block is a (block x block+10) banded matrix, whose row i holds the 11
  weights at columns i..i+10, times the block+10 input rows it needs. This does ~(block+10)/11
  times the multiply-adds of a direct 11-tap sum, yet is ~3x faster than XLA's fused
  shifted-slice sum and ~7x faster than dm-pix's `jnp.convolve` filter on CPU.
  """
  g = _gaussian_1d()
  k = g.size
  length = z.shape[0]
  out_len = length - k + 1
  block = min(block, out_len)
  num_blocks = -(-out_len // block)
  band = np.zeros((block, block + k - 1), np.float32)
  for i in range(block):
    band[i, i:i + k] = g
  rows = np.arange(num_blocks)[:, None] * block + np.arange(block + k - 1)[None, :]
  rows = np.minimum(rows, length - 1)  # rows past the end only feed outputs cropped below
  gathered = z.reshape(length, -1)[rows]  # [blocks, block + 10, M]
  out = jnp.einsum("ij,bjm->bim", band, gathered, precision=jax.lax.Precision.HIGHEST)
  return out.reshape((num_blocks * block,) + z.shape[1:])[:out_len]


def _separable_valid_filter(z: jax.Array) -> jax.Array:
  """2-D Gaussian filter of z f32[N, H, W, C] with 'valid' borders -> f32[N, H-10, W-10, C]."""
  y = _filter_leading_axis(jnp.moveaxis(z, 1, 0))  # [H', N, W, C]
  y = _filter_leading_axis(jnp.moveaxis(y, 2, 0))  # [W', H', N, C]
  return jnp.transpose(y, (2, 1, 0, 3))


@jax.jit
def _ssim_batch(a: jax.Array, b: jax.Array) -> jax.Array:
  """SSIM per image of f32[N, H, W, C] pairs in [0, 1] -> f32[N]."""
  # Imported here, not at the top: dm-pix is absent on the GPU machines (bench/device_check.sh)
  # and every task imports this module; only SSIM needs it.
  import dm_pix  # pylint: disable=g-import-not-at-top
  return dm_pix.ssim(a, b, max_val=1.0, filter_size=SSIM_WINDOW, filter_sigma=SSIM_SIGMA,
                     filter_fn=_separable_valid_filter)


def quantize_uint8(x: np.ndarray, data_range: float) -> np.ndarray:
  """The 8-bit levels an image in [0, data_range] is saved with: f64 integers in 0..255.

  Clipped to [0, data_range], then `rint(x / data_range * 255)`, as skimage `img_as_ubyte`.
  NaN and +-inf stay as they are, so that the metrics' non-finite checks still see them.
  """
  x = np.asarray(x, np.float64) / data_range
  levels = np.rint(np.clip(x, 0.0, 1.0) * 255.0)
  return np.where(np.isfinite(x), levels, x)


def rgb_to_y(rgb: np.ndarray, data_range: float, *, as_uint8: bool = False) -> np.ndarray:
  """BT.601 luma of RGB in [0, data_range]: f[..., 3] -> f64[...] in [16/255, 235/255].

  Y / 255 with Y = 16 + 65.481 R + 128.553 G + 24.966 B, R, G, B in [0, 1] (MATLAB `rgb2ycbcr`).
  `as_uint8`: the image is first quantised to 8 bits (`quantize_uint8`) and Y rounded half up to
  an integer, as MATLAB `rgb2ycbcr` on a uint8 image (module docstring).
  """
  if as_uint8:
    x = quantize_uint8(rgb, data_range) / 255.0
    return np.floor(Y_OFFSET + x @ np.asarray(Y_WEIGHTS) + 0.5) / 255.0
  x = np.asarray(rgb, np.float64) / data_range
  return (Y_OFFSET + x @ np.asarray(Y_WEIGHTS)) / 255.0


def _prepare(pred, gt, data_range, y_channel, as_uint8=False):
  """Validates and returns (pred, gt) as f64[N, H, W, C] scaled to [0, 1], C = 1 for Y."""
  pred = _checks.as_array(pred, "pred")
  gt = _checks.as_array(gt, "gt")
  _checks.check_ndim(pred, (3, 4), "pred", "(H, W, 3) or (N, H, W, 3)")
  _checks.check_same_shape(pred, gt)
  if pred.shape[-1] != 3:
    raise ValueError(f"images must be RGB with 3 channels in the last axis (NHWC), got shape "
                     f"{pred.shape}")
  if not data_range > 0:
    raise ValueError(f"data_range must be > 0 (1.0 for float images, 255 for uint8), got "
                     f"{data_range}")
  if pred.ndim == 3:
    pred, gt = pred[None], gt[None]
  if y_channel:
    return (rgb_to_y(pred, data_range, as_uint8=as_uint8)[..., None],
            rgb_to_y(gt, data_range, as_uint8=as_uint8)[..., None])
  if as_uint8:
    return quantize_uint8(pred, data_range) / 255.0, quantize_uint8(gt, data_range) / 255.0
  return pred.astype(np.float64) / data_range, gt.astype(np.float64) / data_range


def _psnr01(p: np.ndarray, g: np.ndarray) -> np.ndarray:
  """PSNR per image of f64[N, H, W, C] in [0, 1] scale (data range 1) -> f64[N]."""
  mse = np.mean((p - g) ** 2, axis=(1, 2, 3))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(1.0 / mse)


def _ssim01(p: np.ndarray, g: np.ndarray) -> np.ndarray:
  if p.shape[1] < SSIM_WINDOW or p.shape[2] < SSIM_WINDOW:
    raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got "
                     f"{p.shape[1]}x{p.shape[2]}")
  return np.asarray(_ssim_batch(jnp.asarray(p, jnp.float32), jnp.asarray(g, jnp.float32)),
                    np.float64)


def psnr(pred, gt, data_range: float, *, y_channel: bool = False, as_uint8: bool = False,
         reduce: bool = True):
  """PSNR in dB of RGB images f[H, W, 3] or f[N, H, W, 3] with values in [0, data_range].

  Args:
    pred, gt: same shape.
    data_range: 1.0 for float images, 255 for uint8-range images.
    y_channel: evaluate the BT.601 luma instead of RGB (deraining).
    as_uint8: score the 8-bit images the published scripts read: clip and round both images to
      256 levels first, and Y to an integer (module docstring; Rain100 protocol with
      `y_channel`).
    reduce: True -> mean over the batch (float); False -> f64[N] per image.

  Raises:
    ValueError: shape mismatch, last axis not 3, non-finite prediction (count in the message).
  """
  p, g = _prepare(pred, gt, data_range, y_channel, as_uint8)
  _checks.raise_if_nonfinite(p, "pred")
  v = _psnr01(p, g)
  return float(v.mean()) if reduce else v


def ssim(pred, gt, data_range: float, *, y_channel: bool = False, as_uint8: bool = False,
         reduce: bool = True):
  """SSIM (Wang et al., Gaussian 11x11, sigma 1.5) of RGB f[H, W, 3] or f[N, H, W, 3].

  Arguments as in `psnr`. Images must be at least 11x11.
  """
  p, g = _prepare(pred, gt, data_range, y_channel, as_uint8)
  _checks.raise_if_nonfinite(p, "pred")
  v = _ssim01(p, g)
  return float(v.mean()) if reduce else v


class RestorationMetrics:
  """Streaming PSNR / SSIM averaged per image over a dataset.

  Args:
    data_range: value range of the images (1.0 or 255).
    y_channel: measure on BT.601 luma (deraining) instead of RGB.
    as_uint8: quantise both images to 8 bits first, and Y to integers (as `psnr`).

  `metrics.restoration_protocol(name).accumulator(data_range)` builds one with a named
  protocol's settings ("rain100": Y and 8-bit; "sidd", "lol": RGB).

  Images with a non-finite predicted value are skipped, counted (`num_nonfinite`) and logged.
  An image identical to its ground truth has PSNR +inf, which makes the mean +inf.
  """

  def __init__(self, data_range: float = 1.0, *, y_channel: bool = False,
               as_uint8: bool = False):
    if not data_range > 0:
      raise ValueError(f"data_range must be > 0, got {data_range}")
    self.data_range = float(data_range)
    self.y_channel = bool(y_channel)
    self.as_uint8 = bool(as_uint8)
    self.reset()

  def reset(self) -> None:
    self._psnr_sum = 0.0
    self._ssim_sum = 0.0
    self.num_images = 0
    self.num_nonfinite = 0

  def update(self, pred, gt) -> None:
    """Adds one image (H, W, 3) or a batch (N, H, W, 3)."""
    p, g = _prepare(pred, gt, self.data_range, self.y_channel, self.as_uint8)
    bad = _checks.nonfinite_per_image(p)
    if bad.any():
      self.num_nonfinite += int(bad.sum())
      _checks.warn_skipped("RestorationMetrics", int(bad.sum()), self.num_nonfinite)
      p, g = p[~bad], g[~bad]
      if p.shape[0] == 0:
        return
    self._psnr_sum += float(_psnr01(p, g).sum())
    self._ssim_sum += float(_ssim01(p, g).sum())
    self.num_images += int(p.shape[0])

  def result(self) -> dict[str, float]:
    n = self.num_images
    return {"psnr": self._psnr_sum / n if n else float("nan"),
            "ssim": self._ssim_sum / n if n else float("nan"),
            "num_images": n, "num_nonfinite": self.num_nonfinite}
