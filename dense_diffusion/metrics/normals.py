"""Surface-normal metrics: angular error in degrees, pooled over pixels or averaged over images.

Both prediction and ground truth are normalised to unit length before the angle
`arccos(clip(<p, g>, -1, 1))` (degrees) is taken per pixel. Valid pixels: ground truth with a
non-zero, finite norm (invalid normals are stored as zero vectors) and `mask`. A zero predicted
vector has no direction; it is counted as 90 degrees off (as torch.cosine_similarity gives).

Keys of the result (thresholds as fractions in [0, 1], not percent):
  mean, median, rmse                 angular error statistics in degrees
  a5, a7.5, a11.25, a22.5, a30       fraction of valid pixels with error < 5, ..., 30 degrees

Two conventions, `reduction=`:
  "pixel" (default)  every statistic over all valid pixels of the dataset pooled together:
                     DSINE's `compute_normal_metrics` on the concatenated errors, used by DSINE,
                     Lotus and E2E-FT (and Eigen & Fergus, Bae et al.).
  "image"            every statistic per image (its own valid pixels), then the mean over images:
                     Marigold's `script/normals/eval.py` (batch size 1, `MetricTracker` mean).
                     Images without a valid pixel are skipped (`num_empty`). Marigold rounds
                     each image's numbers to 4 decimals before averaging; we do not.
Means, RMSE and threshold fractions of the two differ only in weighting; medians differ in kind
(median of all errors vs mean of per-image medians).
"""
from __future__ import annotations

import numpy as np

from dense_diffusion.metrics import _checks

THRESHOLDS = (5.0, 7.5, 11.25, 22.5, 30.0)
NORMAL_KEYS = ("mean", "median", "rmse") + tuple(f"a{t:g}" for t in THRESHOLDS)
REDUCTIONS = ("pixel", "image")


def _check_reduction(reduction) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS} (pixel: pooled over the dataset, "
                     f"DSINE / Lotus / E2E-FT; image: per-image mean, Marigold), got "
                     f"{reduction!r}")


def _prepare(pred, gt, mask):
  pred = _checks.as_array(pred, "pred")
  gt = _checks.as_array(gt, "gt")
  _checks.check_ndim(pred, (3, 4), "pred", "(H, W, 3) or (N, H, W, 3)")
  _checks.check_same_shape(pred, gt)
  if pred.shape[-1] != 3:
    raise ValueError(f"normal maps must have 3 channels (x, y, z) in the last axis, got "
                     f"shape {pred.shape}")
  if pred.ndim == 3:
    pred, gt = pred[None], gt[None]
    if mask is not None:
      mask = np.asarray(mask)[None] if np.ndim(mask) == 2 else mask
  if mask is not None:
    mask = _checks.as_array(mask, "mask").astype(bool)
    if mask.shape != pred.shape[:-1]:
      raise ValueError(f"mask shape {mask.shape} does not match the normal maps "
                       f"{pred.shape[:-1]} (without the channel axis)")
  return pred, gt, mask


def angular_error(pred, gt) -> tuple[np.ndarray, np.ndarray]:
  """Per-pixel angular error in degrees and validity of the ground truth.

  Args:
    pred, gt: f[..., 3] normal vectors (need not be unit length).

  Returns:
    (f64[...] error in degrees, bool[...] True where gt has a non-zero finite norm).
  """
  # Channel-first float64 planes: contiguous per-component arithmetic (much faster than
  # reducing over a trailing axis of size 3).
  p = np.moveaxis(np.asarray(pred), -1, 0).astype(np.float64)
  g = np.moveaxis(np.asarray(gt), -1, 0).astype(np.float64)
  dot = p[0] * g[0] + p[1] * g[1] + p[2] * g[2]
  pn2 = p[0] * p[0] + p[1] * p[1] + p[2] * p[2]
  gn2 = g[0] * g[0] + g[1] * g[1] + g[2] * g[2]
  valid = np.isfinite(gn2) & (gn2 > 0)
  norm = np.sqrt(pn2 * gn2)
  ok = valid & (pn2 > 0)
  # Zero prediction -> cos = 0 -> 90 degrees; invalid gt -> 90 degrees too (masked by callers).
  cos = np.divide(dot, norm, out=np.zeros_like(dot), where=ok)
  np.clip(cos, -1.0, 1.0, out=cos)
  return np.degrees(np.arccos(cos)), valid


def _valid_errors(pred, gt, mask):
  """Yields f64[k] angular errors of the valid pixels, chunk by chunk of images (cache-sized)."""
  for c in _checks.image_chunks(pred.shape[0], pred.shape[1] * pred.shape[2]):
    err, valid = angular_error(pred[c], gt[c])
    if mask is not None:
      valid &= mask[c]
    yield err[valid]


def _image_errors(pred, gt, mask):
  """Yields f64[k] angular errors of the valid pixels of each image, one image at a time."""
  for c in _checks.image_chunks(pred.shape[0], pred.shape[1] * pred.shape[2]):
    err, valid = angular_error(pred[c], gt[c])
    if mask is not None:
      valid &= mask[c]
    for e, v in zip(err, valid):
      yield e[v]


def _image_stats(e: np.ndarray) -> dict[str, float]:
  """Every statistic of one image's valid-pixel errors (e non-empty)."""
  n = e.size
  return _summary(e.sum(), (e * e).sum(), [np.count_nonzero(e < t) for t in THRESHOLDS], n,
                  np.median(e))


def _summary(err_sum, err_sq_sum, below, count, median):
  if count == 0:
    return {k: float("nan") for k in NORMAL_KEYS}
  out = {"mean": err_sum / count, "median": median, "rmse": float(np.sqrt(err_sq_sum / count))}
  for t, b in zip(THRESHOLDS, below):
    out[f"a{t:g}"] = b / count
  return {k: float(v) for k, v in out.items()}


def normal_metrics(pred, gt, mask=None, *, reduction: str = "pixel") -> dict[str, float]:
  """Angular-error metrics of one image or a batch.

  Args:
    pred: f[H, W, 3] or f[N, H, W, 3] predicted normals.
    gt: same shape, ground-truth normals (zero vector = invalid pixel).
    mask: optional bool[H, W] or bool[N, H, W] of pixels to evaluate.
    reduction: "pixel" (pooled over all valid pixels) or "image" (per-image statistics averaged
      over the images); see the module docstring.

  Returns:
    dict with `NORMAL_KEYS` (see the module docstring); medians are exact.

  Raises:
    ValueError: shape mismatch, last axis not 3, non-finite predictions (count in the message),
      no valid pixel at all ("pixel") or an image without a valid pixel ("image"), unknown
      reduction.
  """
  _check_reduction(reduction)
  pred, gt, mask = _prepare(pred, gt, mask)
  _checks.raise_if_nonfinite(pred, "pred")
  if reduction == "image":
    per = [_image_stats(e) if e.size else None for e in _image_errors(pred, gt, mask)]
    empty = [i for i, m in enumerate(per) if m is None]
    if empty:
      raise ValueError(f"image(s) {empty} of the batch have no valid pixel (every ground-truth "
                       "normal zero/non-finite or masked out); reduction='image' needs one")
    return {k: float(np.mean([m[k] for m in per])) for k in NORMAL_KEYS}
  e = np.concatenate(list(_valid_errors(pred, gt, mask)))
  if e.size == 0:
    raise ValueError("no valid pixel: every ground-truth normal is zero/non-finite or masked out")
  below = [np.count_nonzero(e < t) for t in THRESHOLDS]
  return _summary(e.sum(), (e * e).sum(), below, e.size, np.median(e))


class NormalMetrics:
  """Streaming normal metrics, pooled over pixels (default) or averaged over images.

  reduction="pixel": mean, RMSE and threshold fractions are exact. The median comes from a
  histogram of the errors with `median_bin_deg`-wide bins (the middle order statistics placed
  evenly inside their bins), so it is within `median_bin_deg` degrees of the exact pooled median
  without storing every pixel.
  reduction="image": every statistic, medians included, is exact per image and averaged over the
  images that have a valid pixel (the others are counted in `num_empty`).
  Either way, images with any non-finite predicted value are skipped and counted
  (`num_nonfinite`).
  """

  def __init__(self, median_bin_deg: float = 1e-3, *, reduction: str = "pixel"):
    if not median_bin_deg > 0:
      raise ValueError(f"median_bin_deg must be > 0, got {median_bin_deg}")
    _check_reduction(reduction)
    self.bin = float(median_bin_deg)
    self.num_bins = int(np.ceil(180.0 / self.bin)) + 1
    self.reduction = reduction
    self.reset()

  def reset(self) -> None:
    self._hist = np.zeros(self.num_bins, np.int64)
    self._sum = 0.0
    self._sq_sum = 0.0
    self._below = np.zeros(len(THRESHOLDS), np.int64)
    self._image_sums = {k: 0.0 for k in NORMAL_KEYS}
    self.num_pixels = 0
    self.num_images = 0
    self.num_nonfinite = 0
    self.num_empty = 0

  def update(self, pred, gt, mask=None) -> None:
    """Adds one image (H, W, 3) or a batch (N, H, W, 3)."""
    pred, gt, mask = _prepare(pred, gt, mask)
    bad = _checks.nonfinite_per_image(pred)
    if bad.any():
      self.num_nonfinite += int(bad.sum())
      _checks.warn_skipped("NormalMetrics", int(bad.sum()), self.num_nonfinite)
      pred, gt = pred[~bad], gt[~bad]
      mask = None if mask is None else mask[~bad]
    if pred.shape[0] == 0:
      return
    if self.reduction == "image":
      for e in _image_errors(pred, gt, mask):
        if e.size == 0:
          self.num_empty += 1
          continue
        for k, v in _image_stats(e).items():
          self._image_sums[k] += v
        self.num_pixels += int(e.size)
        self.num_images += 1
      return
    for e in _valid_errors(pred, gt, mask):
      self._add(e)
    self.num_images += int(pred.shape[0])

  def _add(self, e: np.ndarray) -> None:
    self._hist += np.bincount(np.minimum((e / self.bin).astype(np.int64), self.num_bins - 1),
                              minlength=self.num_bins)
    self._sum += float(e.sum())
    self._sq_sum += float((e * e).sum())
    self._below += np.array([np.count_nonzero(e < t) for t in THRESHOLDS])
    self.num_pixels += int(e.size)

  def _median(self) -> float:
    """The median from the histogram: each middle order statistic (one for an odd count, the
    two averaged for an even one, as np.median) placed evenly inside its bin, so each is within
    one bin of its exact value and so is the median."""
    n = self.num_pixels
    if n == 0:
      return float("nan")
    cum = np.cumsum(self._hist)

    def at_rank(k: int) -> float:  # the k-th smallest error, k = 1..n
      b = int(np.searchsorted(cum, k, side="left"))
      before = cum[b - 1] if b > 0 else 0
      return (b + (k - before - 0.5) / self._hist[b]) * self.bin

    if n % 2:
      return at_rank((n + 1) // 2)
    return 0.5 * (at_rank(n // 2) + at_rank(n // 2 + 1))

  def result(self) -> dict[str, float]:
    """The statistics (NaN when nothing was counted) plus `num_pixels`, `num_images`,
    `num_nonfinite` and, for reduction="image", `num_empty`."""
    if self.reduction == "image":
      n = self.num_images
      out = {k: (v / n if n else float("nan")) for k, v in self._image_sums.items()}
      out.update(num_pixels=self.num_pixels, num_images=n, num_nonfinite=self.num_nonfinite,
                 num_empty=self.num_empty)
      return out
    out = _summary(self._sum, self._sq_sum, self._below, self.num_pixels, self._median())
    out.update(num_pixels=self.num_pixels, num_images=self.num_images,
               num_nonfinite=self.num_nonfinite)
    return out
