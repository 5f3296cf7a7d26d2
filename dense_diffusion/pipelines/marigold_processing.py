"""Host-side pre- and post-processing of the Marigold pipelines (numpy, NHWC, float32).

Everything here reproduces diffusers' `MarigoldImageProcessor` and the pipelines' ensembling
with numpy instead of torch, so that the same input gives the same numbers (all but the depth
ensembles' alignment, below):

- Resizing is torch's `F.interpolate` written out as taps per axis (input indices and weights
  per output pixel, applied separably, accumulated in float32 in tap order). The weights follow
  torch's CPU kernels, float32 arithmetic included: antialiased bilinear / bicubic (PIL-style
  filters whose support grows with the downscale factor, renormalised at the borders; bicubic
  uses a = -0.5), plain bilinear (half-pixel centres, no corner alignment, source index clamped
  at 0), plain bicubic (a = -0.75, clamped taps), nearest (floor(dst * in / out)), nearest-exact
  (floor((dst + 0.5) * in / out)) and area (adaptive average pooling); tested against torch to
  2e-6. (`jax.image.resize(method="linear",
  antialias=True)` happens to agree with torch's antialiased bilinear to ~2e-7, but torch's
  nearest / nearest-exact / area index rules and its plain bilinear / bicubic have no jax
  equivalent, so all five modes share this one mechanism.)
- Padding replicates the last row / column up to a multiple of the VAE downsampling (torch's
  `F.pad(mode="replicate")` on the bottom and right).
- Ensembling: depth aligns the members by scale (and shift) with scipy's BFGS on the objective
  diffusers minimises, from its start with its settings (evaluated as below), then takes the
  median (torch's lower median for even counts) or mean and normalises as diffusers does;
  normals take the member closest to the normalised mean; intrinsics the median or mean.
  Uncertainties as diffusers (median absolute deviation, unbiased standard deviation, mean
  angle / pi).

Depth alignment, the one place where we differ from diffusers, on purpose (docs/evaluation.md has
the numbers). diffusers evaluates the objective in float32 at the parameters cast to float32,
and BFGS differentiates it by finite differences with a step of 2**-26 (relative above 1). In
float32 that step is lost on every parameter of magnitude >= 0.5: every scale (1 / (max - min)
>= 1 for maps in [0, 1]) and the large shifts get a gradient of exactly 0 and never move. We keep
those too, so where that is all of them (maps away from 0) the ensembles are diffusers'. A
smaller shift moves by a float32 ulp or two (or not at all, by the parity of its last bit), and
its gradient is dominated by the float32 rounding of the objective, which depends on the
members' last bits and the summation order: diffusers' ensembled depth jumps (by 0.019 in the
tests for one float32 ulp in every member) when the members change in their last bits, as the
same network's members do between torch and JAX (1e-6). No reimplementation can reproduce that.
We evaluate the objective of those shifts in float64: the same start, objective, optimiser and
settings, a deterministic result that moves by < 1e-5 for such member changes, and a lower
objective than diffusers' in the tests' cases (not in every member set: two BFGS iterations
along two different gradients are two different descents). With reduction "mean" the shifts
cancel in the normalised mean, so the prediction is diffusers' there too and only the
uncertainty differs. Given the same parameters, the aligned, reduced and normalised depth and
its uncertainty are diffusers' (float32, parameters cast to float32).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from dense_diffusion import errors

__all__ = [
    "RESAMPLE_METHODS", "load_images", "resize", "resize_taps", "resize_to_max_edge",
    "max_edge_size", "pad", "unpad", "normalize_normals", "ensemble_depth", "ensemble_normals",
    "ensemble_intrinsics",
]

RESAMPLE_METHODS = ("nearest", "nearest-exact", "bilinear", "bicubic", "area")
_F32 = np.float32


# ---------------------------------------------------------------------------------------------
# Input images.


def _as_nhwc(image: Any, index: int) -> np.ndarray:
  """One input (PIL image or numpy [H, W], [H, W, C], [N, H, W, C]) -> float32 [N, H, W, 3]."""
  if hasattr(image, "mode") and hasattr(image, "size"):  # a PIL image, without importing PIL
    image = np.asarray(image)
  if not isinstance(image, np.ndarray):
    raise errors.ConfigError(f"image[{index}] is a {type(image).__name__}; pass a PIL image or a "
                             "numpy array (HW, HWC or NHWC).")
  if image.ndim == 2:
    image = image[None, :, :, None]
  elif image.ndim == 3:
    image = image[None]
  if image.ndim != 4:
    raise errors.ConfigError(f"image[{index}] has shape {image.shape}; pass HW, HWC or NHWC.")
  kind = image.dtype.kind
  if kind not in "uf":
    raise errors.ConfigError(f"image[{index}] has dtype {image.dtype}; pass unsigned integers "
                             "(e.g. uint8) or floats in [0, 1].")
  scale = float(np.iinfo(image.dtype).max) if kind == "u" else 1.0
  image = image.astype(_F32)
  if scale != 1.0:
    image = image / _F32(scale)
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.shape[-1] != 3:
    raise errors.ConfigError(f"image[{index}] has {image.shape[-1]} channels; pass RGB or "
                             "grayscale (for RGBA PIL images: image.convert('RGB')).")
  return image


def load_images(image: Any) -> np.ndarray:
  """The pipelines' `image` argument -> float32 [N, H, W, 3] in [0, 1].

  Accepts what diffusers' `MarigoldImageProcessor` accepts except torch tensors: a PIL image, a
  numpy array [H, W], [H, W, C] or [N, H, W, C] (C = 1 or 3; unsigned integers are divided by
  their maximum, floats must be in [0, 1]), or a list of these of one size.

  Raises:
    ConfigError: for any other input, mismatched sizes or values outside [0, 1].
  """
  items = image if isinstance(image, (list, tuple)) else [image]
  if not items:
    raise errors.ConfigError("image is an empty list; pass at least one image.")
  arrays = [_as_nhwc(item, i) for i, item in enumerate(items)]
  for i, a in enumerate(arrays[1:], 1):
    if a.shape[1:3] != arrays[0].shape[1:3]:
      raise errors.ConfigError(f"image[{i}] is {a.shape[1]}x{a.shape[2]} but image[0] is "
                               f"{arrays[0].shape[1]}x{arrays[0].shape[2]}; pass images of one "
                               "size.")
  out = np.concatenate(arrays, axis=0)
  if out.min() < 0.0 or out.max() > 1.0:
    raise errors.ConfigError("image values leave [0, 1]; pass floats in [0, 1] or uint8.")
  return out


# ---------------------------------------------------------------------------------------------
# Resizing: torch's F.interpolate as per-axis taps.


def _bilinear_filter(x):
  x = np.abs(x)
  return np.where(x < 1.0, 1.0 - x, 0.0)


def _bicubic_filter(x, a=-0.5):
  """The antialiasing cubic of torch (and PIL), a = -0.5."""
  x = np.abs(x)
  near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


_AA_FILTERS = {"bilinear": (_bilinear_filter, 2), "bicubic": (_bicubic_filter, 4)}


def _scale(in_size: int, out_size: int) -> np.float32:
  return _F32(in_size) / _F32(out_size)  # torch: (float) input_size / output_size


def _antialias_taps(in_size: int, out_size: int, method: str) -> tuple[np.ndarray, np.ndarray]:
  """torch's `_compute_weights_aa`: the filter stretched by the downscale factor (support
  interp_size / 2 * scale when scale >= 1), evaluated at the input pixel centres inside the
  support and normalised to sum 1 (so border rows renormalise the truncated window)."""
  filter_fn, interp_size = _AA_FILTERS[method]
  scale = _scale(in_size, out_size)
  support = _F32(interp_size * 0.5) * scale if scale >= 1.0 else _F32(interp_size * 0.5)
  invscale = _F32(1.0) / scale if scale >= 1.0 else _F32(1.0)
  i = np.arange(out_size, dtype=np.float64)
  center = (np.float64(scale) * (i + 0.5)).astype(_F32)  # double product stored as float
  # float differences, then "+ 0.5" in double, truncated toward zero (C++ casts).
  xmin = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5), 0).astype(np.int64)
  xmax = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5),
                    in_size).astype(np.int64)
  width = int((xmax - xmin).max())
  j = xmin[:, None] + np.arange(width)[None, :]
  inside = j < xmax[:, None]
  arg = ((j.astype(_F32) - center[:, None]).astype(np.float64) + 0.5) * np.float64(invscale)
  w = np.where(inside, filter_fn(arg.astype(_F32).astype(np.float64)), 0.0).astype(_F32)
  total = w.sum(axis=1, keepdims=True, dtype=_F32)
  w = np.where(total != 0, w / np.where(total != 0, total, 1), w).astype(_F32)
  return np.minimum(j, in_size - 1), w


def _source_index(in_size: int, out_size: int) -> np.ndarray:
  """float32 scale * (dst + 0.5) - 0.5 with one rounding (torch's CPU build fuses it to an FMA;
  two float32 roundings differ by up to 8e-6 at a few hundred pixels)."""
  scale = np.float64(_scale(in_size, out_size))
  return (scale * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(_F32)


def _bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  src = np.maximum(_source_index(in_size, out_size), _F32(0))
  idx = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam = np.clip(src - idx.astype(_F32), 0, 1).astype(_F32)
  nxt = np.where(idx < in_size - 1, idx + 1, idx)
  return np.stack([idx, nxt], axis=1), np.stack([_F32(1) - lam, lam], axis=1)


def _bicubic_taps(in_size: int, out_size: int, a: float = -0.75
                  ) -> tuple[np.ndarray, np.ndarray]:
  src = _source_index(in_size, out_size)
  idx = np.floor(src).astype(np.int64)
  t = (src - idx.astype(_F32)).astype(np.float64)

  def near(x):
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  w = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1).astype(_F32)
  return np.clip(idx[:, None] - 1 + np.arange(4)[None, :], 0, in_size - 1), w


def _nearest_taps(in_size: int, out_size: int, exact: bool) -> tuple[np.ndarray, np.ndarray]:
  dst = np.arange(out_size)
  if not exact and out_size == in_size:
    idx = dst
  elif not exact and out_size == 2 * in_size:
    idx = dst >> 1
  else:
    scale = _scale(in_size, out_size)
    pos = ((dst + 0.5) * np.float64(scale)).astype(_F32) if exact else dst.astype(_F32) * scale
    idx = np.minimum(np.floor(pos).astype(np.int64), in_size - 1)
  return idx[:, None], np.ones((out_size, 1), _F32)


def _area_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Adaptive average pooling: output i averages inputs floor(i*in/out) .. ceil((i+1)*in/out)."""
  i = np.arange(out_size)
  start, end = (i * in_size) // out_size, -((-(i + 1) * in_size) // out_size)
  j = start[:, None] + np.arange(int((end - start).max()))[None, :]
  inside = j < end[:, None]
  w = np.where(inside, _F32(1.0) / (end - start).astype(_F32)[:, None], _F32(0)).astype(_F32)
  return np.minimum(j, in_size - 1), w


@functools.lru_cache(maxsize=64)
def resize_taps(in_size: int, out_size: int, method: str, antialias: bool
                ) -> tuple[np.ndarray, np.ndarray]:
  """torch's interpolation along one axis as taps: output i = sum_k w[i, k] * x[idx[i, k]].

  Args:
    in_size, out_size: lengths of the axis before and after.
    method: one of RESAMPLE_METHODS.
    antialias: torch's `antialias` (only used by bilinear and bicubic, as in torch).
  Returns:
    (idx int64[out_size, K], w float32[out_size, K]), read-only (cached).
  """
  if method not in RESAMPLE_METHODS:
    raise errors.ConfigError(f"resample method {method!r} is unknown; use one of "
                             f"{list(RESAMPLE_METHODS)}.")
  if antialias and method in _AA_FILTERS:
    taps = _antialias_taps(in_size, out_size, method)
  else:
    builders: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
        "bilinear": lambda: _bilinear_taps(in_size, out_size),
        "bicubic": lambda: _bicubic_taps(in_size, out_size),
        "nearest": lambda: _nearest_taps(in_size, out_size, exact=False),
        "nearest-exact": lambda: _nearest_taps(in_size, out_size, exact=True),
        "area": lambda: _area_taps(in_size, out_size),
    }
    taps = builders[method]()
  for array in taps:
    array.flags.writeable = False
  return taps


def _resize_axis(images: np.ndarray, out_size: int, axis: int, method: str,
                 antialias: bool) -> np.ndarray:
  idx, w = resize_taps(images.shape[axis], out_size, method, antialias)
  shape = [1] * images.ndim
  shape[axis] = out_size
  out = np.zeros(images.shape[:axis] + (out_size,) + images.shape[axis + 1:], _F32)
  for k in range(idx.shape[1]):  # taps in order, accumulated in float32 (as torch's kernels)
    out += np.take(images, idx[:, k], axis=axis) * w[:, k].reshape(shape)
  return out


def resize(images: np.ndarray, size: Sequence[int], method: str,
           antialias: bool = False) -> np.ndarray:
  """torch's `F.interpolate(x, size, mode=method, antialias=antialias)` on NHWC float32.

  Args:
    images: f32[N, H, W, C].
    size: (out_h, out_w).
    method: one of RESAMPLE_METHODS.
    antialias: as torch (bilinear / bicubic only).
  Returns:
    f32[N, out_h, out_w, C]. Width is resized first, then height (torch's separable order).
  """
  x = _resize_axis(np.asarray(images, _F32), int(size[1]), 2, method, antialias)
  return _resize_axis(x, int(size[0]), 1, method, antialias)


def max_edge_size(height: int, width: int, max_edge: int) -> tuple[int, int]:
  """(h, w) with the longer side `max_edge`, rounded down as diffusers (h * max_edge // max)."""
  longest = max(height, width)
  new_h, new_w = height * max_edge // longest, width * max_edge // longest
  if new_h == 0 or new_w == 0:
    raise errors.ConfigError(f"image of {width}x{height} has too extreme an aspect ratio for "
                             f"processing_resolution {max_edge}; raise processing_resolution.")
  return new_h, new_w


def resize_to_max_edge(images: np.ndarray, max_edge: int, method: str) -> np.ndarray:
  """Aspect-preserving resize so the longer side is `max_edge` (antialiased for bilinear and
  bicubic, as diffusers' `resize_to_max_edge`). images f32[N, H, W, C]."""
  size = max_edge_size(images.shape[1], images.shape[2], max_edge)
  return resize(images, size, method, antialias=True)


def pad(images: np.ndarray, align: int) -> tuple[np.ndarray, tuple[int, int]]:
  """Replicate-pads bottom and right to multiples of `align`; returns (images, (ph, pw))."""
  ph, pw = -images.shape[1] % align, -images.shape[2] % align
  return np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge"), (ph, pw)


def unpad(images: np.ndarray, padding: tuple[int, int]) -> np.ndarray:
  """Removes what `pad` added. images [N, H, W, C]."""
  ph, pw = padding
  return images[:, :images.shape[1] - ph, :images.shape[2] - pw]


# ---------------------------------------------------------------------------------------------
# Ensembling.


def normalize_normals(normals: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """Unit-length normals: [..., 3] / max(|n|, eps)."""
  norm = np.sqrt(np.sum(np.square(normals, dtype=_F32), axis=-1, keepdims=True, dtype=_F32))
  return (normals / np.maximum(norm, _F32(eps))).astype(_F32)


def _lower_median(x: np.ndarray) -> np.ndarray:
  """Median over axis 0; the lower middle value for even counts (torch.median's rule)."""
  return np.sort(x, axis=0)[(x.shape[0] - 1) // 2]


def _reduce(members: np.ndarray, reduction: str, with_uncertainty: bool):
  """(prediction, uncertainty or None) over axis 0 (members), diffusers' rules."""
  if reduction == "mean":
    prediction = members.mean(axis=0, dtype=_F32)
    spread = members.std(axis=0, ddof=1, dtype=_F32) if with_uncertainty else None
  else:
    prediction = _lower_median(members)
    spread = _lower_median(np.abs(members - prediction)) if with_uncertainty else None
  return prediction, spread


def _check_reduction(reduction: str, allowed: Sequence[str]) -> None:
  if reduction not in allowed:
    raise errors.ConfigError(f"ensembling_kwargs['reduction'] = {reduction!r}; use one of "
                             f"{list(allowed)}.")


def _depth_alignment(depth: np.ndarray, shift_invariant: bool, reduction: str,
                     regularizer_strength: float, max_iter: int, tol: float, max_res: int | None
                     ) -> Callable[[np.ndarray], np.ndarray]:
  """Fits per-member scale (and shift) with BFGS; returns the function applying them.

  The objective is diffusers': the sum over member pairs of the RMS difference of the aligned
  maps, plus `regularizer_strength` * (|min| + |1 - max|) of their reduction; the start (min-max,
  in float32), the optimiser (scipy's BFGS, finite-difference gradient) and its settings are
  diffusers' too. Unlike diffusers it is evaluated in float64, with the start's parameters of
  magnitude >= 0.5 rounded to float32 as diffusers rounds them (the module docstring says why).
  The pairwise RMS comes from the members' means and covariances, computed once: an evaluation
  then costs one pass over the pixels, for the regulariser's reduction.
  """
  import scipy.optimize  # pylint: disable=import-outside-toplevel

  members = depth.shape[0]
  fit_on = depth
  if max_res is not None and max(depth.shape[1:3]) > max_res:
    fit_on = resize_to_max_edge(depth, max_res, "nearest-exact")
  flat = np.asarray(fit_on, _F32).reshape(members, -1)
  lo, hi = flat.min(axis=1), flat.max(axis=1)
  if shift_invariant:
    s0 = _F32(1.0) / np.maximum(hi - lo, _F32(1e-6))
    param0 = np.concatenate([s0, -s0 * lo]).astype(np.float64)
  else:
    param0 = (_F32(1.0) / np.maximum(hi, _F32(1e-6))).astype(np.float64)

  # diffusers casts the parameters to float32, where BFGS' finite-difference step (2**-26,
  # relative above 1) is lost on every parameter of magnitude >= 0.5, so BFGS never moves them.
  # Those are seen in float32 here too (the same zero gradient); the others in float64, where
  # diffusers' step would move them by a float32 ulp or two and their gradient be rounding noise.
  in_float32 = np.abs(param0) >= 0.5

  pixels = flat.T.astype(np.float64)            # [P, E]
  mean = pixels.mean(axis=0)                    # [E]
  centred = pixels - mean
  cov = centred.T @ centred / pixels.shape[0]   # [E, E]
  first, second = np.triu_indices(members, 1)   # member pairs, itertools.combinations' order
  middle = (members - 1) // 2                   # torch's lower median
  work = np.empty_like(pixels)

  def split(param: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if shift_invariant:
      return param[:members], param[members:]
    return param, np.zeros(members)

  def cost(param: np.ndarray) -> float:
    s, t = split(np.where(in_float32, param.astype(_F32), param))
    # mean((a_i - a_j)^2) = var(s_i d_i - s_j d_j) + (mean(a_i) - mean(a_j))^2, a = s d + t.
    scaled_cov = cov * np.outer(s, s)
    variance = (scaled_cov[first, first] + scaled_cov[second, second]
                - 2.0 * scaled_cov[first, second])
    aligned_mean = s * mean + t
    offset = aligned_mean[first] - aligned_mean[second]
    total = float(np.sum(np.sqrt(np.maximum(variance, 0.0) + offset * offset)))
    if regularizer_strength > 0:
      if reduction == "mean":
        prediction = pixels @ s / members + t.mean()
      else:  # in place in one buffer: ~2x faster than temporaries at 768 x 576 x 10
        np.add(np.multiply(pixels, s, out=work), t, out=work)
        work.partition(middle, axis=1)
        prediction = work[:, middle]
      total += (abs(prediction.min()) + abs(1.0 - prediction.max())) * regularizer_strength
    return total

  def align(maps: np.ndarray, param: np.ndarray) -> np.ndarray:
    """Diffusers' last step: float32 maps, float32 parameters, float32 arithmetic."""
    s, t = (p.astype(_F32).reshape((members,) + (1,) * (maps.ndim - 1)) for p in split(param))
    return (maps * s + t).astype(_F32) if shift_invariant else (maps * s).astype(_F32)

  result = scipy.optimize.minimize(cost, param0, method="BFGS", tol=tol,
                                   options={"maxiter": max_iter, "disp": False})
  return functools.partial(align, param=result.x)


def ensemble_depth(depth: np.ndarray, scale_invariant: bool = True, shift_invariant: bool = True,
                   output_uncertainty: bool = False, reduction: str = "median",
                   regularizer_strength: float = 0.02, max_iter: int = 2, tol: float = 1e-3,
                   max_res: int | None = 1024) -> tuple[np.ndarray, np.ndarray | None]:
  """Ensembles E depth maps of one image (diffusers' `MarigoldDepthPipeline.ensemble_depth`).

  Affine-invariant (or scale-invariant) members are first aligned to each other (see
  `_depth_alignment`: diffusers' objective, partly evaluated in float64 where diffusers' float32
  turns its gradient into rounding noise, so the result can differ from diffusers': the module
  docstring), then reduced per pixel, then the result is normalised to [0, 1] (min-max;
  scale-only: divided by the max).

  Args:
    depth: f32[E, H, W, 1].
    scale_invariant, shift_invariant: the model's invariances (model_index.json); scale
      invariance is required (diffusers raises for absolute depth too).
    output_uncertainty: also return the uncertainty.
    reduction: "median" (uncertainty: median absolute deviation) or "mean" (uncertainty:
      unbiased standard deviation).
    regularizer_strength, max_iter, tol, max_res: alignment settings (diffusers' defaults).
  Returns:
    f32[1, H, W, 1] depth and f32[1, H, W, 1] uncertainty (or None).
  """
  _check_reduction(reduction, ("median", "mean"))
  if not scale_invariant:  # diffusers refuses these too (pure shift, or absolute depth)
    raise errors.ConfigError("ensembling needs a scale-invariant depth model (model_index.json "
                             "scale_invariant: true); use ensemble_size=1.")
  align = _depth_alignment(depth, shift_invariant, reduction, regularizer_strength, max_iter,
                           tol, max_res)
  prediction, uncertainty = _reduce(align(depth), reduction, output_uncertainty)
  low = prediction.min() if shift_invariant else _F32(0.0)
  span = np.maximum(prediction.max() - low, _F32(1e-6))
  prediction = ((prediction - low) / span)[None].astype(_F32)
  if uncertainty is not None:
    uncertainty = (uncertainty / span)[None].astype(_F32)
  return prediction, uncertainty


def ensemble_normals(normals: np.ndarray, output_uncertainty: bool = False,
                     reduction: str = "closest") -> tuple[np.ndarray, np.ndarray | None]:
  """Ensembles E normal maps of one image (diffusers' `ensemble_normals`).

  The mean normal is normalised; "closest" picks, per pixel, the member with the largest cosine
  to it (the first on ties), "mean" returns the normalised mean. Uncertainty: the mean angle
  between members and the mean normal, divided by pi.

  Args:
    normals: f32[E, H, W, 3] unit normals.
  Returns:
    f32[1, H, W, 3] normals and f32[1, H, W, 1] uncertainty (or None).
  """
  _check_reduction(reduction, ("closest", "mean"))
  mean = normalize_normals(normals.mean(axis=0, keepdims=True, dtype=_F32))
  cos = np.clip(np.sum(mean * normals, axis=-1, keepdims=True, dtype=_F32), -1.0, 1.0)
  uncertainty = None
  if output_uncertainty:
    uncertainty = (np.arccos(cos).mean(axis=0, keepdims=True, dtype=_F32) / _F32(np.pi))
    uncertainty = uncertainty.astype(_F32)
  if reduction == "mean":
    return mean, uncertainty
  closest = np.argmax(cos, axis=0)[None]  # [1, H, W, 1]
  return np.take_along_axis(normals, np.broadcast_to(closest, (1,) + normals.shape[1:]),
                            axis=0), uncertainty


def ensemble_intrinsics(targets: np.ndarray, output_uncertainty: bool = False,
                        reduction: str = "median") -> tuple[np.ndarray, np.ndarray | None]:
  """Ensembles E intrinsic decompositions of one image (diffusers' `ensemble_intrinsics`).

  Args:
    targets: f32[E, T, H, W, 3].
    reduction: "median" (uncertainty: median absolute deviation) or "mean" (unbiased std).
  Returns:
    f32[T, H, W, 3] prediction and f32[T, H, W, 3] uncertainty (or None).
  """
  _check_reduction(reduction, ("median", "mean"))
  return _reduce(targets, reduction, output_uncertainty)
