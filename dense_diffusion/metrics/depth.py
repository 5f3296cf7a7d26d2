"""Monocular depth metrics (NYUv2 / KITTI protocol, Marigold affine-invariant variant).

Valid pixels are those with `min_depth < gt < max_depth` (and `mask`, when given); NaN ground
truth is never valid. With `alignment`, the prediction is first fitted to the ground truth by
least squares over the valid pixels of each image ("scale": `s * pred`; "scale_shift":
`s * pred + t`, as Marigold). The (aligned) prediction is then clamped to
`[min_depth, max_depth]` and, per image:

  abs_rel  = mean(|p - g| / g)          sq_rel = mean((p - g)^2 / g)
  rmse     = sqrt(mean((p - g)^2))      rmse_log = sqrt(mean((ln p - ln g)^2))
  log10    = mean(|log10 p - log10 g|)  deltaK = mean(max(p / g, g / p) < 1.25^K), K = 1, 2, 3

Metrics of a batch (N, H, W) are the mean of the per-image metrics (not pixel-pooled). All
arithmetic is float64 numpy, vectorised over the batch.
"""
from __future__ import annotations


import numpy as np

from dense_diffusion.metrics import _checks

DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")
ALIGNMENTS = (None, "scale", "scale_shift")

# NYUv2 Eigen crop, in pixels of the 480x640 frame: rows [45, 471), cols [41, 601).
NYU_SIZE = (480, 640)
EIGEN_CROP = (45, 471, 41, 601)


def nyu_eigen_crop_mask(shape=NYU_SIZE, *, rescale: bool = False) -> np.ndarray:
  """Boolean mask of the NYUv2 Eigen evaluation crop.

  Args:
    shape: (H, W) of the depth maps (a longer shape uses its last two entries).
    rescale: what to do for a size other than 480x640. False (default): raise ValueError, since
      the crop is defined on the original frame and predictions should be resized to 480x640
      before evaluation. True: scale the crop bounds proportionally, `round(b * H / 480)` for
      rows and `round(b * W / 640)` for columns, rounding halves up
      (240x320 -> rows 23:236, cols 21:301).

  Returns:
    bool[H, W], True inside rows 45:471 and cols 41:601 (or their scaled bounds).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) < 2:
    raise ValueError(f"shape must contain (H, W), got {shape}")
  h, w = shape[-2:]
  r0, r1, c0, c1 = EIGEN_CROP
  if (h, w) != NYU_SIZE:
    if not rescale:
      raise ValueError(
          f"the NYUv2 Eigen crop is defined for {NYU_SIZE[0]}x{NYU_SIZE[1]} depth maps, got "
          f"{h}x{w}; resize the prediction to 480x640 first or pass rescale=True to scale the "
          "crop proportionally")
    r0, r1 = (int(np.floor(b * h / NYU_SIZE[0] + 0.5)) for b in (r0, r1))
    c0, c1 = (int(np.floor(b * w / NYU_SIZE[1] + 0.5)) for b in (c0, c1))
  mask = np.zeros((h, w), bool)
  mask[r0:r1, c0:c1] = True
  return mask


def _as_batch(x, name: str) -> np.ndarray:
  arr = _checks.as_array(x, name)
  if arr.ndim == 4 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  _checks.check_ndim(arr, (2, 3), name, "(H, W), (N, H, W) or (N, H, W, 1)")
  return arr[None] if arr.ndim == 2 else arr


def _prepare(pred, gt, mask):
  pred = _as_batch(pred, "pred").astype(np.float64)
  gt = _as_batch(gt, "gt").astype(np.float64)
  _checks.check_same_shape(pred, gt)
  if mask is not None:
    mask = _checks.as_array(mask, "mask").astype(bool)
    if mask.ndim == 4 and mask.shape[-1] == 1:
      mask = mask[..., 0]
    try:
      mask = np.broadcast_to(mask, pred.shape)
    except ValueError:
      raise ValueError(
          f"mask of shape {mask.shape} does not broadcast to the depth maps {pred.shape}"
      ) from None
  return pred, gt, mask


def align_depth(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray,
                alignment: str | None) -> np.ndarray:
  """Least-squares fit of `pred` to `gt` over `valid` pixels, per image.

  Args:
    pred, gt: f64[N, H, W].
    valid: bool[N, H, W].
    alignment: None, "scale" (minimise |s p - g|^2) or "scale_shift" (|s p + t - g|^2).

  Returns:
    f64[N, H, W], the aligned prediction (not clamped). For a prediction that is constant over
    the valid pixels the scale is undetermined; the fit then returns the mean of `gt` (the same
    aligned values as the minimum-norm least-squares solution).
  """
  if alignment not in ALIGNMENTS:
    raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
  if alignment is None:
    return pred
  w = valid.astype(np.float64)
  axes = (1, 2)
  n = w.sum(axes)
  p = np.where(valid, pred, 0.0)
  g = np.where(valid, gt, 0.0)
  if alignment == "scale":
    spp = (p * p).sum(axes)
    spg = (p * g).sum(axes)
    s = np.divide(spg, spp, out=np.zeros_like(spp), where=spp > 0)
    return pred * s[:, None, None]
  # scale_shift, on centred data for accuracy: s = cov(p, g) / var(p), t = mean(g) - s mean(p).
  n_safe = np.maximum(n, 1.0)
  mp = p.sum(axes) / n_safe
  mg = g.sum(axes) / n_safe
  pc = np.where(valid, pred - mp[:, None, None], 0.0)
  gc = np.where(valid, gt - mg[:, None, None], 0.0)
  var = (pc * pc).sum(axes)
  cov = (pc * gc).sum(axes)
  # A (numerically) constant prediction has no defined scale: s = 0, t = mean(g).
  tiny = 1e-12 * (p * p).sum(axes)
  s = np.divide(cov, var, out=np.zeros_like(var), where=var > tiny)
  t = mg - s * mp
  return pred * s[:, None, None] + t[:, None, None]


def _per_image(pred, gt, valid, *, min_depth, max_depth, alignment):
  """f64[N] per metric (NaN for images without valid pixels) and int64[N] valid counts."""
  parts = [_per_image_chunk(pred[c], gt[c], valid[c], min_depth=min_depth, max_depth=max_depth,
                            alignment=alignment)
           for c in _checks.image_chunks(pred.shape[0], pred[0].size)]
  return ({k: np.concatenate([m[k] for m, _ in parts]) for k in DEPTH_KEYS},
          np.concatenate([n for _, n in parts]))


def _per_image_chunk(pred, gt, valid, *, min_depth, max_depth, alignment):
  pred = align_depth(pred, gt, valid, alignment)
  pred = np.clip(pred, min_depth, max_depth)
  axes = (1, 2)
  n = valid.sum(axes)
  n_safe = np.maximum(n, 1)
  n_invalid = valid[0].size - n
  # Invalid pixels get p = g = 1: every error term is exactly 0 there, so plain sums over the
  # image are sums over the valid pixels (and the delta counts subtract the invalid pixels).
  g = np.where(valid, gt, 1.0)
  p = np.where(valid, pred, 1.0)
  diff = p - g
  sq = diff * diff
  log_diff = np.log(p) - np.log(g)
  abs_log = np.abs(log_diff)
  mean = lambda v: v.sum(axes) / n_safe
  # max(p / g, g / p) < 1.25^k  <=>  |ln p - ln g| < k ln 1.25 (no further divisions).
  delta = lambda k: (np.count_nonzero(abs_log < k * np.log(1.25), axis=axes) - n_invalid) / n_safe
  out = {
      "abs_rel": mean(np.abs(diff) / g),
      "sq_rel": mean(sq / g),
      "rmse": np.sqrt(mean(sq)),
      "rmse_log": np.sqrt(mean(log_diff * log_diff)),
      "log10": mean(abs_log) / np.log(10.0),
      "delta1": delta(1),
      "delta2": delta(2),
      "delta3": delta(3),
  }
  empty = n == 0
  return {k: np.where(empty, np.nan, v) for k, v in out.items()}, n


def _valid_mask(gt, mask, min_depth, max_depth):
  valid = (gt > min_depth) & (gt < max_depth)
  if mask is not None:
    valid &= mask
  return valid


def _check_range(min_depth, max_depth):
  if not 0 < min_depth < max_depth:
    raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")


def depth_metrics(pred, gt, *, min_depth: float = 1e-3, max_depth: float = 10.0, mask=None,
                  alignment: str | None = None) -> dict[str, float]:
  """Depth metrics of one image or the per-image mean over a batch.

  Args:
    pred: f[H, W], f[N, H, W] or f[N, H, W, 1], predicted depth (metres, or affine-invariant
      depth when `alignment` is set).
    gt: same shape, ground-truth depth; pixels outside (min_depth, max_depth) are invalid.
    min_depth, max_depth: validity range of `gt` and clamp range of the prediction.
    mask: optional bool broadcastable to the depth maps (e.g. `nyu_eigen_crop_mask()`).
    alignment: None, "scale" or "scale_shift" (per-image least squares on valid pixels).

  Returns:
    dict with float values for `DEPTH_KEYS` (deltas as fractions in [0, 1]).

  Raises:
    ValueError: on shape mismatch, non-finite predictions (message gives the count), an image
      with no valid pixel, or an unknown alignment.
  """
  _check_range(min_depth, max_depth)
  pred, gt, mask = _prepare(pred, gt, mask)
  _checks.raise_if_nonfinite(pred, "pred")
  valid = _valid_mask(gt, mask, min_depth, max_depth)
  per, n = _per_image(pred, gt, valid, min_depth=min_depth, max_depth=max_depth,
                      alignment=alignment)
  if np.any(n == 0):
    raise ValueError(
        f"image(s) {np.flatnonzero(n == 0).tolist()} of the batch have no valid pixel "
        f"(min_depth < gt < max_depth = {min_depth} < gt < {max_depth}, inside the mask)")
  return {k: float(v.mean()) for k, v in per.items()}


class DepthMetrics:
  """Streaming depth metrics: per-image metrics averaged over all images seen.

  Images whose prediction has a NaN/inf anywhere are skipped (counted in `num_nonfinite`, logged
  as a warning); images with no valid pixel are skipped and counted in `num_empty`.

  Example:
    acc = DepthMetrics(alignment="scale_shift", mask=nyu_eigen_crop_mask())
    for pred, gt in batches:  # f[N, 480, 640] each
      acc.update(pred, gt)
    acc.result()  # {"abs_rel": ..., ..., "num_images": 654, "num_nonfinite": 0, "num_empty": 0}
  """

  def __init__(self, *, min_depth: float = 1e-3, max_depth: float = 10.0,
               alignment: str | None = None, mask=None):
    """`mask` is an optional fixed mask (e.g. the Eigen crop) ANDed with every update's mask."""
    _check_range(min_depth, max_depth)
    if alignment not in ALIGNMENTS:
      raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    self.min_depth = float(min_depth)
    self.max_depth = float(max_depth)
    self.alignment = alignment
    self.mask = None if mask is None else np.asarray(mask, bool)
    self.reset()

  def reset(self) -> None:
    self._sums = {k: 0.0 for k in DEPTH_KEYS}
    self.num_images = 0
    self.num_nonfinite = 0
    self.num_empty = 0

  def update(self, pred, gt, mask=None) -> None:
    """Adds one image (H, W) or a batch (N, H, W); `mask` as in `depth_metrics`."""
    pred, gt, mask = _prepare(pred, gt, mask)
    if self.mask is not None:
      if self.mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"the accumulator's mask {self.mask.shape} does not match the depth "
                         f"maps {pred.shape}")
      fixed = np.broadcast_to(self.mask, pred.shape)
      mask = fixed if mask is None else (mask & fixed)
    bad = _checks.nonfinite_per_image(pred)
    if bad.any():
      self.num_nonfinite += int(bad.sum())
      _checks.warn_skipped("DepthMetrics", int(bad.sum()), self.num_nonfinite)
      keep = ~bad
      pred, gt = pred[keep], gt[keep]
      mask = None if mask is None else mask[keep]
      if pred.shape[0] == 0:
        return
    valid = _valid_mask(gt, mask, self.min_depth, self.max_depth)
    per, n = _per_image(pred, gt, valid, min_depth=self.min_depth, max_depth=self.max_depth,
                        alignment=self.alignment)
    ok = n > 0
    self.num_empty += int((~ok).sum())
    self.num_images += int(ok.sum())
    for k in DEPTH_KEYS:
      self._sums[k] += float(per[k][ok].sum())

  def result(self) -> dict[str, float]:
    """Per-image mean of every metric (NaN when no image was counted) plus the counts."""
    n = self.num_images
    out: dict[str, float] = {k: (v / n if n else float("nan")) for k, v in self._sums.items()}
    out.update(num_images=n, num_nonfinite=self.num_nonfinite, num_empty=self.num_empty)
    return out

  def merge(self, other: "DepthMetrics") -> "DepthMetrics":
    """Adds the sums of another accumulator (e.g. from another host); returns self."""
    for k in DEPTH_KEYS:
      self._sums[k] += other._sums[k]
    self.num_images += other.num_images
    self.num_nonfinite += other.num_nonfinite
    self.num_empty += other.num_empty
    return self
