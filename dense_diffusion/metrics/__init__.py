"""Evaluation metrics for dense prediction, streaming over a dataset (numpy + dm-pix/JAX).

- depth: `depth_metrics`, `DepthMetrics`, `nyu_eigen_crop_mask`, `align_depth`
- normals: `normal_metrics`, `NormalMetrics`, `angular_error`
- semantic: `SemanticConfusion`, `semantic_metrics`
- panoptic: `panoptic_quality`, `PanopticQuality`
- restoration: `psnr`, `ssim`, `RestorationMetrics`, `rgb_to_y`

One-shot functions raise ValueError on bad input (shape mismatch, wrong channel count, NaN/inf
predictions with their count). Streaming accumulators (`update(...)`, `result()`) skip images
with non-finite predictions, log a warning and report `num_nonfinite` in `result()`.
"""
from dense_diffusion.metrics.depth import DEPTH_KEYS
from dense_diffusion.metrics.depth import DepthMetrics
from dense_diffusion.metrics.depth import align_depth
from dense_diffusion.metrics.depth import depth_metrics
from dense_diffusion.metrics.depth import nyu_eigen_crop_mask
from dense_diffusion.metrics.normals import NORMAL_KEYS
from dense_diffusion.metrics.normals import NormalMetrics
from dense_diffusion.metrics.normals import angular_error
from dense_diffusion.metrics.normals import normal_metrics
from dense_diffusion.metrics.panoptic import PanopticQuality
from dense_diffusion.metrics.panoptic import panoptic_quality
from dense_diffusion.metrics.restoration import RestorationMetrics
from dense_diffusion.metrics.restoration import psnr
from dense_diffusion.metrics.restoration import rgb_to_y
from dense_diffusion.metrics.restoration import ssim
from dense_diffusion.metrics.semantic import SemanticConfusion
from dense_diffusion.metrics.semantic import semantic_metrics

__all__ = [
    "DEPTH_KEYS", "DepthMetrics", "align_depth", "depth_metrics", "nyu_eigen_crop_mask",
    "NORMAL_KEYS", "NormalMetrics", "angular_error", "normal_metrics",
    "PanopticQuality", "panoptic_quality",
    "RestorationMetrics", "psnr", "rgb_to_y", "ssim",
    "SemanticConfusion", "semantic_metrics",
]
