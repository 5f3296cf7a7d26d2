"""Depth, surface normals and shading: scalar or vector fields encoded linearly."""
from __future__ import annotations

import dataclasses

import numpy as np

from dense_diffusion.tasks import base


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

  def __post_init__(self):
    if not self.max_depth > self.min_depth:
      raise ValueError(f"depth needs max_depth > min_depth, got {self.min_depth}..{self.max_depth}")
    lo, hi = self.quantiles
    if not 0.0 <= lo < hi <= 1.0:
      raise ValueError(f"depth quantiles must satisfy 0 <= lo < hi <= 1, got {self.quantiles}")

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

  def _decode_batch(self, rgb):
    v = base.channel_mean01(rgb)
    if self.affine_invariant:
      return v
    return self.min_depth + v * (self.max_depth - self.min_depth)


@base.register("normals")
@dataclasses.dataclass(frozen=True)
class NormalsTask(base.Task):
  """Unit normals in camera coordinates (x right, y down, z forward) stored as rgb = n."""

  name: str = "normals"
  prompt: str = "Perform surface normal estimation"

  def _encode(self, normals):
    normals = base.check_map(normals, self.name, "normals (H, W, 3)", ndim=3)
    if normals.shape[-1] != 3:
      raise ValueError(f"normals.encode expects 3 channels, got shape {normals.shape}")
    return normals

  def _decode_batch(self, rgb):
    norm = np.linalg.norm(rgb, axis=-1, keepdims=True)
    # A zero vector (invalid pixel, or a sampler that put out grey) stays zero.
    return np.where(norm > 1e-6, rgb / np.maximum(norm, 1e-6), 0.0).astype(np.float32)


@base.register("shading")
@dataclasses.dataclass(frozen=True)
class ShadingTask(base.Task):
  """Grey shading s, clipped to [0, max_shading], as v = s / max_shading."""

  name: str = "shading"
  prompt: str = "Perform shading estimation"
  max_shading: float = 1.0  # image = albedo * shading; 1 keeps an unsaturated 8-bit image.

  def _encode(self, shading):
    shading = base.check_map(shading, self.name, "a shading map (H, W)")
    return base.grey(shading.astype(np.float32) / self.max_shading)

  def _decode_batch(self, rgb):
    return base.channel_mean01(rgb) * self.max_shading
