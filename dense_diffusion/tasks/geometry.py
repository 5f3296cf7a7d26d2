"""Depth, surface normals and shading: scalar or vector fields encoded linearly."""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from dense_diffusion import metrics
from dense_diffusion.tasks import base
from dense_diffusion.tasks import outputs

DEPTH_PNG_SCALE = 1000.0  # depth PNG: uint16 millimetres (metres * 1000), 0 = invalid/too far.
DEPTH_COLORMAP = "Spectral_r"  # matplotlib colormap of the depth preview (near = blue).


def _pick(d: dict, keys) -> dict:
  return {k: float(d[k]) for k in keys if k in d}


class DepthEvaluator(base.Evaluator):
  """AbsRel, RMSE, delta1; baseline: every image predicted as its own mean valid depth."""
  KEYS = ("abs_rel", "rmse", "delta1")

  def __init__(self, task: "DepthTask"):
    super().__init__(task)
    self.model = metrics.DepthMetrics(max_depth=task.max_depth, alignment=task.alignment)
    self.baseline = metrics.DepthMetrics(max_depth=task.max_depth, alignment=task.alignment)

  def update(self, answers, truths, inputs):
    for pred, gt in zip(answers, truths):
      self.model.update(pred, gt)
      valid = gt > 0
      self.baseline.update(np.full_like(gt, gt[valid].mean() if valid.any() else 1.0), gt)

  def result(self):
    return {**_pick(self.model.result(), self.KEYS),
            "baseline": _pick(self.baseline.result(), self.KEYS)}


@base.register("depth")
@dataclasses.dataclass(frozen=True)
class DepthTask(base.Task):
  """Depth in metres (0 = invalid) as grey v = (d - min_depth) / (max_depth - min_depth).

  With `affine_invariant=True` each image is normalised by its own `quantiles` of valid depth
  instead (GenPercept / Marigold); `decode` then returns relative depth in [0, 1], which is
  evaluated after least-squares scale-and-shift alignment (`alignment`).
  """

  name: str = "depth"
  prompt: str = "Perform depth estimation"
  min_depth: float = 0.0  # metres mapped to -1 (NYUv2: 0).
  max_depth: float = 10.0  # metres mapped to +1 (NYUv2: 10).
  affine_invariant: bool = False
  quantiles: tuple[float, float] = (0.02, 0.98)  # per-image range for the affine-invariant mode.

  label_key = "depth"
  headline = "abs_rel"
  head = "depth"
  higher_is_better = False

  def __post_init__(self):
    if not self.max_depth > self.min_depth:
      raise ValueError(f"depth needs max_depth > min_depth, got {self.min_depth}..{self.max_depth}")
    lo, hi = self.quantiles
    if not 0.0 <= lo < hi <= 1.0:
      raise ValueError(f"depth quantiles must satisfy 0 <= lo < hi <= 1, got {self.quantiles}")
    object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))

  @property
  def alignment(self) -> str | None:
    """How predictions are aligned to metric ground truth before the depth metrics."""
    return "scale_shift" if self.affine_invariant else None

  def value_range(self, depth: np.ndarray) -> tuple[float, float]:
    """The (low, high) depth that maps to (-1, +1) for this image."""
    if not self.affine_invariant:
      return self.min_depth, self.max_depth
    valid = depth[depth > 0]
    if valid.size == 0:
      return 0.0, 1.0
    lo, hi = np.quantile(valid, self.quantiles)
    return float(lo), float(max(hi, lo + 1e-6))

  def _encode(self, depth):
    depth = base.check_map(depth, self.name, "a depth map (H, W) in metres").astype(np.float32)
    lo, hi = self.value_range(depth)
    return base.grey((depth - lo) / (hi - lo))

  def valid_mask(self, depth):
    depth = base.check_map(depth, self.name, "a depth map (H, W) in metres")
    return np.isfinite(depth) & (depth > 0)

  def _decode_batch(self, rgb):
    v = base.channel_mean01(rgb)
    if self.affine_invariant:
      return v
    return self.min_depth + v * (self.max_depth - self.min_depth)

  def evaluator(self):
    return DepthEvaluator(self)

  def image_loss(self, pred, target, valid):
    """L1 of the depth code (channel mean) on known pixels; with `affine_invariant`, after the
    per-image least-squares scale and shift of the prediction onto the target (E2E-FT's
    scale-and-shift-invariant loss)."""
    p, t = jnp.mean(pred, axis=-1), jnp.mean(target, axis=-1)
    m = (jnp.ones_like(p) if valid is None else jnp.asarray(valid[..., 0], p.dtype))
    if self.affine_invariant:
      scale, shift = least_squares_scale_shift(p, t, m)
      p = scale[:, None, None] * p + shift[:, None, None]
    return base.masked_mean(jnp.abs(p - t)[..., None], m[..., None])

  def write(self, out, stem, image, depth):
    """`X_depth.png`: 16-bit millimetres (relative depth * 65535 when affine-invariant);
    `X_depth_color.png`: the image's own min..max through a colormap."""
    if self.affine_invariant:
      path = outputs.save_unit_u16(out / f"{stem}_depth.png", depth)
    else:
      coded = np.round(np.clip(depth * DEPTH_PNG_SCALE, 0, outputs.UINT16_MAX))
      path = outputs.save_png(out / f"{stem}_depth.png", coded.astype(np.uint16))
    from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
    lo, hi = float(np.min(depth)), float(np.max(depth))
    v = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
    rgb = colormaps[DEPTH_COLORMAP](v)[..., :3]
    return [path, outputs.save_png(out / f"{stem}_depth_color.png", outputs.u8(rgb))]


class NormalsEvaluator(base.Evaluator):
  """Mean/median angle, fraction under 11.25 deg; baseline: the image's mean normal everywhere."""
  KEYS = ("mean", "median", "a11.25")

  def __init__(self, task):
    super().__init__(task)
    self.model, self.baseline = metrics.NormalMetrics(), metrics.NormalMetrics()

  def update(self, answers, truths, inputs):
    for pred, gt in zip(answers, truths):
      self.model.update(pred, gt)
      mean = gt.reshape(-1, 3).mean(0)
      mean = mean / max(np.linalg.norm(mean), 1e-6)
      self.baseline.update(np.broadcast_to(mean, gt.shape).copy(), gt)

  def result(self):
    return {**_pick(self.model.result(), self.KEYS),
            "baseline": _pick(self.baseline.result(), self.KEYS)}


@base.register("normals")
@dataclasses.dataclass(frozen=True)
class NormalsTask(base.Task):
  """Unit normals in camera coordinates (x right, y down, z forward) stored as rgb = n; a zero
  vector is an unknown normal."""

  name: str = "normals"
  prompt: str = "Perform surface normal estimation"

  label_key = "normals"
  flip_negates_x = True
  head = "normals"
  headline = "mean"
  higher_is_better = False

  def _encode(self, normals):
    normals = base.check_map(normals, self.name, "normals (H, W, 3)", ndim=3)
    if normals.shape[-1] != 3:
      raise ValueError(f"normals.encode expects 3 channels, got shape {normals.shape}")
    return normals

  def valid_mask(self, normals):
    n2 = np.sum(np.square(np.asarray(normals, np.float32)), axis=-1)
    return np.isfinite(n2) & (n2 > 0)

  def _decode_batch(self, rgb):
    norm = np.linalg.norm(rgb, axis=-1, keepdims=True)
    # A zero vector (invalid pixel, or a sampler that put out grey) stays zero.
    return np.where(norm > 1e-6, rgb / np.maximum(norm, 1e-6), 0.0).astype(np.float32)

  def resize(self, normals, height, width):
    """Bilinear, then renormalised (interpolation shortens the vectors between pixels)."""
    n = base.resize_map(normals, height, width, nearest=False)
    return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)

  def evaluator(self):
    return NormalsEvaluator(self)

  def image_loss(self, pred, target, valid):
    """Mean angle (radians) between the predicted and true normals on known pixels."""
    n = pred / jnp.maximum(jnp.linalg.norm(pred, axis=-1, keepdims=True), 1e-6)
    # Clipped inside (-1, 1): arccos has an infinite slope at the ends.
    cos = jnp.clip(jnp.sum(n * target, axis=-1, keepdims=True), -1.0 + 1e-6, 1.0 - 1e-6)
    return base.masked_mean(jnp.arccos(cos), valid)

  def write(self, out, stem, image, normals):
    """`X_normals.png`: RGB (n + 1) / 2 * 255."""
    return [outputs.save_png(out / f"{stem}_normals.png", outputs.u8((normals + 1.0) * 0.5))]


class ShadingEvaluator(base.Evaluator):
  """RMSE of the shading; baseline: the image's mean shading everywhere."""

  def __init__(self, task):
    super().__init__(task)
    self.sq, self.sq_base, self.n = 0.0, 0.0, 0

  def update(self, answers, truths, inputs):
    for pred, gt in zip(answers, truths):
      self.sq += float(np.mean((pred - gt) ** 2))
      self.sq_base += float(np.mean((gt.mean() - gt) ** 2))
      self.n += 1

  def result(self):
    n = max(self.n, 1)
    return {"rmse": math.sqrt(self.sq / n), "baseline": {"rmse": math.sqrt(self.sq_base / n)}}


@base.register("shading")
@dataclasses.dataclass(frozen=True)
class ShadingTask(base.Task):
  """Grey shading s, clipped to [0, max_shading], as v = s / max_shading."""

  name: str = "shading"
  prompt: str = "Perform shading estimation"
  max_shading: float = 1.0  # image = albedo * shading; 1 keeps an unsaturated 8-bit image.

  label_key = "shading"
  headline = "rmse"
  higher_is_better = False

  def _encode(self, shading):
    shading = base.check_map(shading, self.name, "a shading map (H, W)")
    return base.grey(shading.astype(np.float32) / self.max_shading)

  def _decode_batch(self, rgb):
    return base.channel_mean01(rgb) * self.max_shading

  def evaluator(self):
    return ShadingEvaluator(self)

  def write(self, out, stem, image, shading):
    """`X_shading.png`: 16-bit grey of shading / max_shading * 65535."""
    return [outputs.save_unit_u16(out / f"{stem}_shading.png", shading / self.max_shading)]


def least_squares_scale_shift(pred, target, mask):
  """Per-image (scale f32[B], shift f32[B]) minimising sum(mask * (scale * pred + shift -
  target)^2) over f32[B, H, W] maps: the 2x2 normal equations, solved in closed form; (1, 0)
  where they are singular (fewer than two distinct known values)."""
  a00 = jnp.sum(mask * pred * pred, (1, 2))
  a01 = jnp.sum(mask * pred, (1, 2))
  a11 = jnp.sum(mask, (1, 2))
  b0 = jnp.sum(mask * pred * target, (1, 2))
  b1 = jnp.sum(mask * target, (1, 2))
  det = a00 * a11 - a01 * a01
  ok = det > 1e-12
  safe = jnp.where(ok, det, 1.0)
  scale = jnp.where(ok, (a11 * b0 - a01 * b1) / safe, 1.0)
  shift = jnp.where(ok, (a00 * b1 - a01 * b0) / safe, 0.0)
  return scale, shift
