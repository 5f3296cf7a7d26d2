"""Named evaluation protocols: the settings under which the literature's tables were computed.

Depth (`depth_protocol(name)`): which pixels count (crop, validity range or the dataset's mask),
the clamp range of the prediction and the alignment, as Marigold's evaluation defines them
(prs-eth/Marigold: `config/dataset_depth/*.yaml`, `src/dataset/*_dataset.py`,
`script/depth/eval/*.sh`), plus the Garg crop for metric KITTI depth:

  name         valid ground truth               crop                      alignment (fit)
  nyu_eigen    1e-3 < gt < 10                   Eigen, rows 45:471 x 41:601  scale_shift
  kitti_eigen  1e-5 < gt < 80                   Eigen (fractions), KB crop   scale_shift
  kitti_garg   1e-3 < gt < 80                   Garg (fractions)             None (metric)
  eth3d        1e-5 < gt < inf                  none                         scale_shift (1024)
  scannet      1e-3 < gt < 10                   none                         scale_shift
  diode        the dataset's mask (gt > 0); predictions clamped to [0.6, 350]  scale_shift

Any field can be overridden: `depth_protocol("nyu_eigen", alignment="scale_shift_disparity")`
evaluates an affine-invariant disparity model (Lotus-D) the way Lotus does.

Restoration (`restoration_protocol(name)`): RGB or BT.601 luma, and whether the images are first
quantised to the 8-bit files the published scripts read (see `metrics.restoration`).

docs/evaluation.md gives each protocol's source and the papers' tables it reproduces.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from dense_diffusion import registry
from dense_diffusion.metrics import depth
from dense_diffusion.metrics import restoration

CropFn = Callable[[tuple[int, int]], np.ndarray]

DEPTH_PROTOCOLS: registry.Registry["DepthProtocol"] = registry.Registry("depth protocol")
RESTORATION_PROTOCOLS: registry.Registry["RestorationProtocol"] = registry.Registry(
    "restoration protocol")


@dataclasses.dataclass(frozen=True)
class DepthProtocol:
  """How one benchmark scores depth.

  Attributes:
    name: the registry name.
    min_depth, max_depth: validity range of the ground truth (when `valid_range`) and clamp
      range of the (aligned) prediction.
    crop: None or a function (H, W) -> bool[H, W] of the evaluation crop.
    alignment: None, "scale", "scale_shift" or "scale_shift_disparity" (`metrics.depth`).
    alignment_max_res: fit the alignment on Marigold's subsample (`metrics.depth`), or None.
    valid_range: False: the dataset's validity mask alone says which pixels count (DIODE);
      `metrics` / `update` then need that mask.
    source: where the settings come from.
  """

  name: str
  min_depth: float
  max_depth: float
  crop: CropFn | None = None
  alignment: str | None = "scale_shift"
  alignment_max_res: int | None = None
  valid_range: bool = True
  source: str = ""

  def __post_init__(self):
    depth.check_depth_range(self.min_depth, self.max_depth)
    depth.check_alignment(self.alignment, self.alignment_max_res)
    if self.crop is not None and not callable(self.crop):
      raise ValueError(f"crop of depth protocol {self.name!r} must be None or a function "
                       f"(H, W) -> bool[H, W], got {self.crop!r}")

  def eval_mask(self, shape) -> np.ndarray | None:
    """bool[H, W] of the crop for depth maps of `shape` (last two entries), or None."""
    if self.crop is None:
      return None
    hw = tuple(int(v) for v in tuple(shape)[-2:])
    return np.asarray(self.crop(hw), bool)

  def metrics(self, pred, gt, mask=None) -> dict[str, float]:
    """`metrics.depth_metrics` under this protocol; `mask` (the dataset's own validity mask,
    required when not `valid_range`) is ANDed with the crop."""
    gt_shape = np.shape(gt)
    crop = self.eval_mask(gt_shape[:3] if len(gt_shape) == 4 else gt_shape)
    if crop is not None:
      if mask is None:
        mask = crop
      else:
        mask_arr = np.asarray(mask, bool)
        if mask_arr.ndim == 4 and mask_arr.shape[-1] == 1:
          mask_arr = mask_arr[..., 0]
        mask = mask_arr & crop
    return depth.depth_metrics(
        pred, gt, min_depth=self.min_depth, max_depth=self.max_depth, mask=mask,
        alignment=self.alignment, alignment_max_res=self.alignment_max_res,
        valid_range=self.valid_range)

  def accumulator(self) -> depth.DepthMetrics:
    """A streaming `metrics.DepthMetrics` with this protocol's settings."""
    return depth.DepthMetrics(
        min_depth=self.min_depth, max_depth=self.max_depth, alignment=self.alignment,
        crop=self.crop, alignment_max_res=self.alignment_max_res, valid_range=self.valid_range)


def depth_protocol(name: str, **overrides) -> DepthProtocol:
  """The registered depth protocol `name`, with any of its fields replaced by `overrides`.

  Raises:
    UnknownNameError (a KeyError): unknown name; the message lists the known ones.
    ValueError: an override that is not a field, or a value the protocol cannot take.
  """
  proto = DEPTH_PROTOCOLS.get(name)
  if not overrides:
    return proto
  fields = [f.name for f in dataclasses.fields(DepthProtocol) if f.name != "name"]
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    raise ValueError(f"unknown override(s) {unknown} for depth protocol {name!r}; the fields "
                     f"are {fields}")
  return dataclasses.replace(proto, **overrides)


def _kitti(crop: str) -> CropFn:
  def fn(shape):
    return depth.kitti_crop_mask(shape, crop)
  fn.__name__ = f"kitti_{crop}_crop_mask"
  return fn


DEPTH_PROTOCOLS.register("nyu_eigen", DepthProtocol(
    "nyu_eigen", 1e-3, 10.0, crop=depth.nyu_eigen_crop_mask,
    source="Marigold data_nyu_test.yaml / nyu_dataset.py: NYUv2 654 test images at 480x640, "
           "Eigen crop rows 45:471, cols 41:601; eval with --alignment least_square"))
DEPTH_PROTOCOLS.register("kitti_eigen", DepthProtocol(
    "kitti_eigen", 1e-5, 80.0, crop=_kitti("eigen"),
    source="Marigold data_kitti_eigen_test.yaml / kitti_dataset.py: Eigen test split (652 "
           "images with ground truth), KITTI benchmark crop 352x1216 (kitti_benchmark_crop), "
           "valid_mask_crop: eigen; eval with --alignment least_square"))
DEPTH_PROTOCOLS.register("kitti_garg", DepthProtocol(
    "kitti_garg", 1e-3, 80.0, crop=_kitti("garg"), alignment=None,
    source="Garg et al. (ECCV 2016) crop with the 80 m cap, as BTS bts_eval.py "
           "(--garg_crop, min_depth_eval 1e-3, max_depth_eval 80): metric depth, no alignment"))
DEPTH_PROTOCOLS.register("eth3d", DepthProtocol(
    "eth3d", 1e-5, math.inf, alignment_max_res=1024,
    source="Marigold data_eth3d.yaml / eth3d_dataset.py: 454 images of 4032x6048, inf depth read "
           "as 0 (invalid); 32_eval_eth3d.sh: --alignment least_square --alignment_max_res 1024"))
DEPTH_PROTOCOLS.register("scannet", DepthProtocol(
    "scannet", 1e-3, 10.0,
    source="Marigold data_scannet_val.yaml / scannet_dataset.py: 800 sampled validation frames "
           "(scannet_val_sampled_list_800_1.txt); eval with --alignment least_square"))
DEPTH_PROTOCOLS.register("diode", DepthProtocol(
    "diode", 0.6, 350.0, valid_range=False,
    source="Marigold data_diode_all.yaml / diode_dataset.py: 771 validation images (indoor + "
           "outdoor); valid = the dataset's depth_mask.npy as is (no range test), predictions "
           "clamped to [0.6, 350]; eval with --alignment least_square"))


@dataclasses.dataclass(frozen=True)
class RestorationProtocol:
  """How one benchmark scores PSNR / SSIM: Y or RGB, and 8-bit quantisation first or not."""

  name: str
  y_channel: bool
  as_uint8: bool
  source: str = ""

  @property
  def options(self) -> dict[str, bool]:
    """Keyword arguments for `metrics.psnr` / `metrics.ssim`."""
    return {"y_channel": self.y_channel, "as_uint8": self.as_uint8}

  def accumulator(self, data_range: float = 1.0) -> restoration.RestorationMetrics:
    """A streaming `metrics.RestorationMetrics` with this protocol's settings."""
    return restoration.RestorationMetrics(data_range, **self.options)


def restoration_protocol(name: str) -> RestorationProtocol:
  """The registered restoration protocol `name` (UnknownNameError lists the known ones)."""
  return RESTORATION_PROTOCOLS.get(name)


RESTORATION_PROTOCOLS.register("rain100", RestorationProtocol(
    "rain100", y_channel=True, as_uint8=True,
    source="Restormer / MPRNet Deraining/evaluate_PSNR_SSIM.m: the restored image saved as 8-bit "
           "PNG (img_as_ubyte), imread (uint8), rgb2ycbcr on uint8 (Y rounded), PSNR with peak "
           "255 and Wang's SSIM_index (L = 255) on Y; Rain100L/H, Test100/1200/2800"))
RESTORATION_PROTOCOLS.register("sidd", RestorationProtocol(
    "sidd", y_channel=False, as_uint8=False,
    source="MPRNet / Restormer: restored blocks clamped to [0, 1] and saved as float "
           "(Idenoised.mat); evaluate_SIDD.m: MATLAB psnr (peak 1) and ssim on the RGB 256x256 "
           "blocks (1,280)"))
RESTORATION_PROTOCOLS.register("lol", RestorationProtocol(
    "lol", y_channel=False, as_uint8=False,
    source="LOL eval15 (15 pairs of 400x600): PSNR / SSIM on RGB; the papers' scripts differ in "
           "quantisation and SSIM window (docs/evaluation.md)"))
