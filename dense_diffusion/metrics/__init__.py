"""Evaluation metrics for dense prediction, streaming over a dataset (numpy + dm-pix/JAX).

- depth: `depth_metrics`, `DepthMetrics`, `align_depth` (scale, scale_shift,
  scale_shift_disparity), `nyu_eigen_crop_mask`, `kitti_crop_mask`, `kitti_benchmark_crop`
- normals: `normal_metrics`, `NormalMetrics` (reduction "pixel" or "image"), `angular_error`
- semantic: `SemanticConfusion`, `semantic_metrics` (`reduce_zero_label` for ADE20K / mmseg)
- panoptic: `panoptic_quality`, `PanopticQuality`
- matting: `matting_metrics`, `MattingMetrics` (SAD, MSE, MAD, Grad, Conn as the DIM scripts)
- dichotomous (DIS5K): `dis_metrics`, `DichotomousMetrics` (max F, weighted F, MAE, S-, E-measure)
- referring (RefCOCO): `referring_metrics`, `ReferringMetrics` (oIoU, mIoU, prec_0.5..0.9)
- restoration: `psnr`, `ssim`, `RestorationMetrics`, `rgb_to_y`, `quantize_uint8`
- protocols: `depth_protocol(name)` (nyu_eigen, kitti_eigen, kitti_garg, eth3d, scannet, diode),
  `restoration_protocol(name)` (rain100, sidd, lol); docs/evaluation.md has their sources
- scoring: `protocol(name)`, the benchmarks of `main eval --protocol` (the depth protocols,
  ade20k, coco_panoptic, rain100, sidd, lol, normals_pixel, normals_image): which task, which
  headline, per-image and split-wide numbers (`Scorer`)

One-shot functions raise ValueError on bad input (shape mismatch, wrong channel count, NaN/inf
predictions with their count). Streaming accumulators (`update(...)`, `result()`) skip images
with non-finite predictions, log a warning and report `num_nonfinite` in `result()`.
"""
from dense_diffusion.metrics.depth import DEPTH_KEYS
from dense_diffusion.metrics.depth import DepthMetrics
from dense_diffusion.metrics.depth import align_depth
from dense_diffusion.metrics.depth import alignment_fit_columns
from dense_diffusion.metrics.depth import depth_metrics
from dense_diffusion.metrics.depth import kitti_benchmark_crop
from dense_diffusion.metrics.depth import kitti_crop_mask
from dense_diffusion.metrics.depth import nyu_eigen_crop_mask
from dense_diffusion.metrics.dichotomous import DIS_KEYS
from dense_diffusion.metrics.dichotomous import DichotomousMetrics
from dense_diffusion.metrics.dichotomous import dis_metrics
from dense_diffusion.metrics.matting import MATTING_KEYS
from dense_diffusion.metrics.matting import MattingMetrics
from dense_diffusion.metrics.matting import matting_metrics
from dense_diffusion.metrics.normals import NORMAL_KEYS
from dense_diffusion.metrics.normals import NormalMetrics
from dense_diffusion.metrics.normals import angular_error
from dense_diffusion.metrics.normals import normal_metrics
from dense_diffusion.metrics.panoptic import PanopticQuality
from dense_diffusion.metrics.panoptic import panoptic_quality
from dense_diffusion.metrics.protocols import DEPTH_PROTOCOLS
from dense_diffusion.metrics.protocols import RESTORATION_PROTOCOLS
from dense_diffusion.metrics.protocols import DepthProtocol
from dense_diffusion.metrics.protocols import RestorationProtocol
from dense_diffusion.metrics.protocols import depth_protocol
from dense_diffusion.metrics.protocols import restoration_protocol
from dense_diffusion.metrics.scoring import PROTOCOLS
from dense_diffusion.metrics.scoring import Protocol
from dense_diffusion.metrics.scoring import Scorer
from dense_diffusion.metrics.scoring import protocol
from dense_diffusion.metrics.referring import REFERRING_KEYS
from dense_diffusion.metrics.referring import ReferringMetrics
from dense_diffusion.metrics.referring import referring_metrics
from dense_diffusion.metrics.restoration import RestorationMetrics
from dense_diffusion.metrics.restoration import psnr
from dense_diffusion.metrics.restoration import quantize_uint8
from dense_diffusion.metrics.restoration import rgb_to_y
from dense_diffusion.metrics.restoration import ssim
from dense_diffusion.metrics.semantic import SemanticConfusion
from dense_diffusion.metrics.semantic import semantic_metrics

__all__ = [
    "DEPTH_KEYS", "DepthMetrics", "align_depth", "alignment_fit_columns", "depth_metrics",
    "kitti_benchmark_crop", "kitti_crop_mask", "nyu_eigen_crop_mask",
    "DIS_KEYS", "DichotomousMetrics", "dis_metrics",
    "MATTING_KEYS", "MattingMetrics", "matting_metrics",
    "NORMAL_KEYS", "NormalMetrics", "angular_error", "normal_metrics",
    "PanopticQuality", "panoptic_quality",
    "DEPTH_PROTOCOLS", "RESTORATION_PROTOCOLS", "DepthProtocol", "RestorationProtocol",
    "depth_protocol", "restoration_protocol", "PROTOCOLS", "Protocol", "Scorer", "protocol",
    "REFERRING_KEYS", "ReferringMetrics", "referring_metrics",
    "RestorationMetrics", "psnr", "quantize_uint8", "rgb_to_y", "ssim",
    "SemanticConfusion", "semantic_metrics",
]
