"""Monocular depth metrics (NYUv2 / KITTI protocol, Marigold's affine-invariant variants).

Valid pixels are those with `min_depth < gt < max_depth` (and `mask`, when given); NaN ground
truth is never valid. With `valid_range=False` the mask alone says which pixels count (with
finite gt > 0) and the range only clamps the prediction: Marigold's DIODE evaluation, which takes
the dataset's validity mask as it is.

With `alignment`, the prediction is first fitted to the ground truth by least squares over the
valid pixels of each image (as Marigold's `script/depth/eval.py`, prs-eth/Marigold):

  "scale"                  s * pred
  "scale_shift"            s * pred + t                        (Marigold's `least_square`)
  "scale_shift_disparity"  1 / max(s * pred + t, 1e-3), where s, t fit `pred` to 1 / gt over the
                           valid pixels with gt > 0 and pred > 0: `pred` is an affine-invariant
                           disparity (Marigold's `least_square_disparity`, used by Lotus-D)

`alignment_max_res` (Marigold's `--alignment_max_res`, 1024 for ETH3D) fits on a nearest-neighbour
subsample only and applies s, t to the whole image. It subsamples exactly the pixels Marigold's
`align_depth_least_square` uses: that code applies torch's nearest `Upsample` to a (1, H, W)
tensor, which torch reads as (batch, channels, width), so only the columns are resampled: with
f = min(max_res / H, max_res / W) < 1, every row's columns floor(j / f) (float32 arithmetic, as
torch), j < floor(W f). Rows are all kept.

The (aligned) prediction is then clamped to `[min_depth, max_depth]` and, per image:

  abs_rel  = mean(|p - g| / g)          sq_rel = mean((p - g)^2 / g)
  rmse     = sqrt(mean((p - g)^2))      rmse_log = sqrt(mean((ln p - ln g)^2))
  log10    = mean(|log10 p - log10 g|)  deltaK = mean(max(p / g, g / p) < 1.25^K), K = 1, 2, 3

Metrics of a batch (N, H, W) are the mean of the per-image metrics (not pixel-pooled), as
Marigold (batch size 1, `MetricTracker` mean). All arithmetic is float64 numpy, vectorised over
the batch. Named protocols (crop, range, alignment of NYUv2, KITTI, ETH3D, ScanNet, DIODE) are in
`metrics.protocols` (`metrics.depth_protocol("nyu_eigen")`); docs/evaluation.md has the sources.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from dense_diffusion.metrics import _checks

DEPTH_KEYS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "delta1", "delta2", "delta3")
ALIGNMENTS = (None, "scale", "scale_shift", "scale_shift_disparity")
# Marigold's `least_square_disparity` clips the aligned disparity here before inverting it.
MIN_DISPARITY = 1e-3

# NYUv2 Eigen crop, in pixels of the 480x640 frame: rows [45, 471), cols [41, 601).
NYU_SIZE = (480, 640)
EIGEN_CROP = (45, 471, 41, 601)

# KITTI evaluation crops as fractions of the ground truth's (H, W): rows [r0 H, r1 H), cols
# [c0 W, c1 W), each bound truncated by int() (BTS `bts_eval.py`, Marigold `kitti_dataset.py`).
KITTI_CROPS = {
    "garg": (0.40810811, 0.99189189, 0.03594771, 0.96405229),   # Garg et al., ECCV 2016
    "eigen": (0.3324324, 0.91351351, 0.0359477, 0.96405229),    # Eigen et al., NeurIPS 2014
}
# KITTI benchmark crop (KB crop): the bottom 352 rows, 1216 centred columns.
KITTI_BENCHMARK_SIZE = (352, 1216)


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


def kitti_crop_mask(shape, crop: str = "garg") -> np.ndarray:
  """Boolean mask of a KITTI evaluation crop, "garg" or "eigen", for depth maps of `shape`.

  The bounds are fractions of the frame (`KITTI_CROPS`), so the mask fits the raw frames (about
  375x1242) and the 352x1216 benchmark crop (`kitti_benchmark_crop`) alike: on 352x1216, "garg"
  is rows 143:349, cols 43:1172 and "eigen" rows 117:321, cols 43:1172.

  Args:
    shape: (H, W) of the depth maps (a longer shape uses its last two entries).
    crop: "garg" (Garg et al. 2016; BTS, AdaBins, ...) or "eigen" (Eigen et al. 2014; Marigold,
      Lotus and E2E-FT evaluate KITTI with this one, on benchmark-cropped frames).

  Returns:
    bool[H, W].
  """
  if crop not in KITTI_CROPS:
    raise ValueError(f"crop must be one of {sorted(KITTI_CROPS)}, got {crop!r}")
  shape = tuple(int(v) for v in shape)
  if len(shape) < 2:
    raise ValueError(f"shape must contain (H, W), got {shape}")
  h, w = shape[-2:]
  r0, r1, c0, c1 = KITTI_CROPS[crop]
  mask = np.zeros((h, w), bool)
  mask[int(r0 * h):int(r1 * h), int(c0 * w):int(c1 * w)] = True
  return mask


def kitti_benchmark_crop(x, axes: tuple[int, int] = (-2, -1)) -> np.ndarray:
  """The KITTI benchmark crop of an array: the bottom 352 rows and the 1216 centred columns.

  Top margin H - 352, left margin int((W - 1216) / 2), as Marigold's `kitti_benchmark_crop`
  (its `kitti_bm_crop: true` for the Eigen test split) and BTS.

  Args:
    x: array whose axes `axes` are (H, W): (-2, -1) for depth maps (..., H, W), (-3, -2) for
      NHWC images.

  Returns:
    the cropped view, (..., 352, 1216, ...).
  """
  x = np.asarray(x)
  ah, aw = axes
  h, w = x.shape[ah], x.shape[aw]
  ch, cw = KITTI_BENCHMARK_SIZE
  if h < ch or w < cw:
    raise ValueError(f"the KITTI benchmark crop needs frames of at least {ch}x{cw}, got {h}x{w}; "
                     "pass raw KITTI frames (about 375x1242)")
  top, left = h - ch, int((w - cw) / 2)
  index = [slice(None)] * x.ndim
  index[ah] = slice(top, top + ch)
  index[aw] = slice(left, left + cw)
  return x[tuple(index)]


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


def check_alignment(alignment, alignment_max_res) -> None:
  """Raises ValueError for an unknown alignment or a bad alignment_max_res."""
  if alignment not in ALIGNMENTS:
    raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
  if alignment_max_res is not None and (
      isinstance(alignment_max_res, bool) or not isinstance(alignment_max_res, (int, np.integer))
      or alignment_max_res < 1):
    raise ValueError(f"alignment_max_res must be None or a positive int (Marigold: 1024 for "
                     f"ETH3D), got {alignment_max_res!r}")


def alignment_fit_columns(shape, alignment_max_res: int | None) -> np.ndarray | None:
  """Columns of an (H, W) frame that the least-squares fit uses under `alignment_max_res`.

  Marigold's rule (module docstring): f = min(max_res / H, max_res / W); when f < 1 the fit uses
  columns floor(j * float32(1 / f)) for j < floor(W f), as torch's nearest `Upsample` picks
  them; every row is kept.

  Returns:
    int64[W'] column indices, or None when no subsampling happens (max_res None or f >= 1).
  """
  if alignment_max_res is None:
    return None
  h, w = (int(v) for v in tuple(shape)[-2:])
  f = float(np.min(alignment_max_res / np.array([h, w], np.float64)))
  if f >= 1.0:
    return None
  out_w = int(np.floor(w * f))
  src = np.floor(np.arange(out_w, dtype=np.float32) * np.float32(1.0 / f)).astype(np.int64)
  return np.minimum(src, w - 1)


def _fit(p, g, m, with_shift: bool):
  """Per-image least squares of g ~ s p (+ t) over m; p, g f64[N, H, W], m bool -> (s, t) f64[N].

  On centred data for accuracy: s = cov(p, g) / var(p), t = mean(g) - s mean(p). A prediction
  that is (numerically) constant over m has no defined scale: s = 0, t = mean(g), the same
  aligned values as lstsq's minimum-norm solution; with no pixel in m, s = t = 0 (lstsq on an
  empty system).
  """
  axes = (1, 2)
  pm = np.where(m, p, 0.0)
  gm = np.where(m, g, 0.0)
  if not with_shift:
    spp = (pm * pm).sum(axes)
    spg = (pm * gm).sum(axes)
    s = np.divide(spg, spp, out=np.zeros_like(spp), where=spp > 0)
    return s, np.zeros_like(s)
  n_safe = np.maximum(np.count_nonzero(m, axis=axes), 1).astype(np.float64)
  mp = pm.sum(axes) / n_safe
  mg = gm.sum(axes) / n_safe
  pc = np.where(m, p - mp[:, None, None], 0.0)
  gc = np.where(m, g - mg[:, None, None], 0.0)
  var = (pc * pc).sum(axes)
  cov = (pc * gc).sum(axes)
  tiny = 1e-12 * (pm * pm).sum(axes)
  s = np.divide(cov, var, out=np.zeros_like(var), where=var > tiny)
  return s, mg - s * mp


def align_depth(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray, alignment: str | None, *,
                alignment_max_res: int | None = None) -> np.ndarray:
  """Least-squares fit of `pred` to `gt` over `valid` pixels, per image.

  Args:
    pred, gt: f64[N, H, W].
    valid: bool[N, H, W].
    alignment: None, "scale" (minimise |s p - g|^2), "scale_shift" (|s p + t - g|^2) or
      "scale_shift_disparity" (|s p + t - 1/g|^2 over valid pixels with g > 0 and p > 0; the
      result is the depth 1 / max(s p + t, 1e-3)).
    alignment_max_res: fit on Marigold's nearest subsample of the columns (module docstring).

  Returns:
    f64[N, H, W], the aligned prediction as depth (not clamped to the depth range). For a
    prediction that is constant over the fitted pixels the scale is undetermined; the fit then
    returns the mean of the target (the same aligned values as the minimum-norm least-squares
    solution).
  """
  check_alignment(alignment, alignment_max_res)
  if alignment is None:
    return pred
  disparity = alignment == "scale_shift_disparity"
  fit_mask, target = valid, gt
  if disparity:
    positive = gt > 0
    fit_mask = valid & positive & (pred > 0)
    target = np.divide(1.0, gt, out=np.zeros_like(gt), where=positive)
  cols = alignment_fit_columns(pred.shape, alignment_max_res)
  if cols is None:
    s, t = _fit(pred, target, fit_mask, alignment != "scale")
  else:
    s, t = _fit(pred[..., cols], target[..., cols], fit_mask[..., cols], alignment != "scale")
  aligned = pred * s[:, None, None] + t[:, None, None]
  if disparity:
    return 1.0 / np.maximum(aligned, MIN_DISPARITY)
  return aligned


def _per_image(pred, gt, valid, *, min_depth, max_depth, alignment, alignment_max_res):
  """f64[N] per metric (NaN for images without valid pixels) and int64[N] valid counts."""
  parts = [_per_image_chunk(pred[c], gt[c], valid[c], min_depth=min_depth, max_depth=max_depth,
                            alignment=alignment, alignment_max_res=alignment_max_res)
           for c in _checks.image_chunks(pred.shape[0], pred[0].size)]
  return ({k: np.concatenate([m[k] for m, _ in parts]) for k in DEPTH_KEYS},
          np.concatenate([n for _, n in parts]))


def _per_image_chunk(pred, gt, valid, *, min_depth, max_depth, alignment, alignment_max_res):
  pred = align_depth(pred, gt, valid, alignment, alignment_max_res=alignment_max_res)
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


def _valid_mask(gt, mask, min_depth, max_depth, valid_range=True):
  if valid_range:
    valid = (gt > min_depth) & (gt < max_depth)
  else:
    if mask is None:
      raise ValueError(
          "valid_range=False takes the valid pixels from the mask alone; pass the dataset's "
          "validity mask (DIODE: its depth_mask.npy) as `mask`, or use valid_range=True")
    valid = np.isfinite(gt) & (gt > 0)
  if mask is not None:
    valid &= mask
  return valid


def check_depth_range(min_depth, max_depth) -> None:
  """Raises ValueError unless 0 < min_depth < max_depth (max_depth may be inf)."""
  if not 0 < min_depth < max_depth:
    raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")


def depth_metrics(pred, gt, *, min_depth: float = 1e-3, max_depth: float = 10.0, mask=None,
                  alignment: str | None = None, alignment_max_res: int | None = None,
                  valid_range: bool = True) -> dict[str, float]:
  """Depth metrics of one image or the per-image mean over a batch.

  Args:
    pred: f[H, W], f[N, H, W] or f[N, H, W, 1], predicted depth (metres, or affine-invariant
      depth when `alignment` is "scale" / "scale_shift", affine-invariant disparity when it is
      "scale_shift_disparity").
    gt: same shape, ground-truth depth; pixels outside (min_depth, max_depth) are invalid.
    min_depth, max_depth: validity range of `gt` and clamp range of the prediction.
    mask: optional bool broadcastable to the depth maps (e.g. `nyu_eigen_crop_mask()`).
    alignment: None, "scale", "scale_shift" or "scale_shift_disparity" (per-image least squares
      on valid pixels; module docstring).
    alignment_max_res: None, or fit the alignment on Marigold's nearest subsample (module
      docstring; Marigold uses 1024 for ETH3D).
    valid_range: True: valid = min_depth < gt < max_depth and mask. False: valid = mask and
      finite gt > 0 (a mask is then required), the range only clamps the prediction (DIODE).

  Returns:
    dict with float values for `DEPTH_KEYS` (deltas as fractions in [0, 1]).

  Raises:
    ValueError: on shape mismatch, non-finite predictions (message gives the count), an image
      with no valid pixel, an unknown alignment or a bad alignment_max_res.
  """
  check_depth_range(min_depth, max_depth)
  check_alignment(alignment, alignment_max_res)
  pred, gt, mask = _prepare(pred, gt, mask)
  _checks.raise_if_nonfinite(pred, "pred")
  valid = _valid_mask(gt, mask, min_depth, max_depth, valid_range)
  per, n = _per_image(pred, gt, valid, min_depth=min_depth, max_depth=max_depth,
                      alignment=alignment, alignment_max_res=alignment_max_res)
  if np.any(n == 0):
    where = (f"{min_depth} < gt < {max_depth}, inside the mask" if valid_range
             else "gt > 0 inside the mask")
    raise ValueError(
        f"image(s) {np.flatnonzero(n == 0).tolist()} of the batch have no valid pixel ({where})")
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

  `metrics.depth_protocol(name).accumulator()` builds one with a named protocol's settings.
  """

  def __init__(self, *, min_depth: float = 1e-3, max_depth: float = 10.0,
               alignment: str | None = None, mask=None,
               crop: Callable[[tuple[int, int]], np.ndarray] | None = None,
               alignment_max_res: int | None = None, valid_range: bool = True):
    """Settings as in `depth_metrics`, plus two masks ANDed with every update's mask.

    Args:
      mask: optional fixed bool[H, W] mask (e.g. the Eigen crop).
      crop: optional function (H, W) -> bool[H, W] evaluated at each update's size (e.g.
        `nyu_eigen_crop_mask`, or `lambda s: kitti_crop_mask(s, "garg")`), cached per size.
    """
    check_depth_range(min_depth, max_depth)
    check_alignment(alignment, alignment_max_res)
    if crop is not None and not callable(crop):
      raise ValueError(f"crop must be a function (H, W) -> bool[H, W] or None, got {crop!r}; "
                       "pass a fixed array as `mask` instead")
    self.min_depth = float(min_depth)
    self.max_depth = float(max_depth)
    self.alignment = alignment
    self.alignment_max_res = alignment_max_res
    self.valid_range = bool(valid_range)
    self.mask = None if mask is None else np.asarray(mask, bool)
    self.crop = crop
    self._crops: dict[tuple[int, int], np.ndarray] = {}
    self.reset()

  def reset(self) -> None:
    self._sums = {k: 0.0 for k in DEPTH_KEYS}
    self.num_images = 0
    self.num_nonfinite = 0
    self.num_empty = 0

  def _fixed_masks(self, shape) -> list[np.ndarray]:
    masks = []
    if self.mask is not None:
      if self.mask.shape[-2:] != shape[-2:]:
        raise ValueError(f"the accumulator's mask {self.mask.shape} does not match the depth "
                         f"maps {shape}")
      masks.append(self.mask)
    if self.crop is not None:
      hw = tuple(shape[-2:])
      if hw not in self._crops:
        crop = np.asarray(self.crop(hw), bool)
        if crop.shape != hw:
          raise ValueError(f"crop function returned a mask of shape {crop.shape} for depth maps "
                           f"of {hw}")
        self._crops[hw] = crop
      masks.append(self._crops[hw])
    return masks

  def update(self, pred, gt, mask=None) -> None:
    """Adds one image (H, W) or a batch (N, H, W); `mask` as in `depth_metrics`."""
    pred, gt, mask = _prepare(pred, gt, mask)
    for fixed in self._fixed_masks(pred.shape):
      fixed = np.broadcast_to(fixed, pred.shape)
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
    valid = _valid_mask(gt, mask, self.min_depth, self.max_depth, self.valid_range)
    per, n = _per_image(pred, gt, valid, min_depth=self.min_depth, max_depth=self.max_depth,
                        alignment=self.alignment, alignment_max_res=self.alignment_max_res)
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
