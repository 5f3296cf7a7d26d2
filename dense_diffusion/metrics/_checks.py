"""Input checks shared by the metric modules: shapes, channels and non-finite values."""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

logger = logging.getLogger("dense_diffusion.metrics")


def as_array(x, name: str, dtype=None) -> np.ndarray:
  """Returns `x` as a numpy array (host copy of JAX arrays too)."""
  try:
    arr = np.asarray(x, dtype=dtype)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{name} could not be converted to a numeric array: {e}") from e
  if arr.dtype == object:
    raise ValueError(f"{name} is not a numeric array (dtype=object)")
  return arr


def check_same_shape(pred: np.ndarray, gt: np.ndarray, what: str = "pred and gt") -> None:
  if pred.shape != gt.shape:
    raise ValueError(
        f"shape mismatch between {what}: {pred.shape} vs {gt.shape}; pass arrays of the same "
        "shape (resize the prediction to the ground-truth resolution first)")


def check_ndim(x: np.ndarray, allowed: Sequence[int], name: str, layout: str) -> None:
  if x.ndim not in allowed:
    raise ValueError(f"{name} must have shape {layout}, got {x.shape} ({x.ndim} dims)")


def nonfinite_count(x: np.ndarray) -> int:
  """Number of NaN or +-inf entries (0 for integer arrays)."""
  if not np.issubdtype(x.dtype, np.floating):
    return 0
  return int(x.size - np.count_nonzero(np.isfinite(x)))


def nonfinite_per_image(x: np.ndarray) -> np.ndarray:
  """Bool[N]: True where image n of a batch (leading axis) has any non-finite value."""
  if not np.issubdtype(x.dtype, np.floating):
    return np.zeros(x.shape[0], bool)
  return ~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)


def raise_if_nonfinite(x: np.ndarray, name: str = "pred") -> None:
  """Raises ValueError saying how many values of `x` are NaN / inf."""
  if not np.issubdtype(x.dtype, np.floating):
    return
  n_nan = int(np.count_nonzero(np.isnan(x)))
  n_inf = int(np.count_nonzero(np.isinf(x)))
  if n_nan or n_inf:
    raise ValueError(
        f"{name} has {n_nan + n_inf} non-finite values out of {x.size} ({n_nan} NaN, {n_inf} "
        f"inf); the one-shot metric functions refuse them. Fix the model output, or use the "
        "streaming accumulator, which skips and counts such images")


def warn_skipped(kind: str, num: int, total_so_far: int) -> None:
  logger.warning(
      "%s: skipped %d image(s) with non-finite predictions (%d skipped so far)", kind, num,
      total_so_far)


# Elementwise float64 work is done on chunks of images of at most this many pixels (one 512x512
# image), so that the temporaries stay in the CPU cache: ~2x faster than whole batches.
CHUNK_PIXELS = 1 << 18


def image_chunks(num_images: int, pixels_per_image: int, max_pixels: int = CHUNK_PIXELS):
  """Slices over the leading (image) axis, each covering about `max_pixels` pixels (>= 1 image)."""
  step = max(1, max_pixels // max(1, pixels_per_image))
  return [slice(i, min(i + step, num_images)) for i in range(0, num_images, step)]
