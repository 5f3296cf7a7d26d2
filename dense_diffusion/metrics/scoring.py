"""Benchmarks by name: what `main eval --protocol NAME` scores, image by image and over a split.

    proto = metrics.protocol("nyu_eigen")               # task "depth", headline "abs_rel"
    scorer = proto.scorer(task_obj, alignment="scale_shift_disparity")
    for pred, truth, mask in examples:                  # answers at the truth's resolution
      per_image = scorer.add(pred, truth, mask)         # {"abs_rel": ..., ...} or None
    scorer.summary()                                    # the split's numbers, as the papers'

Every protocol names the task whose answers it scores, its headline metric and direction, and
builds a `Scorer` from the task object (which knows the number of classes, the categories) and
the protocol's options (depth: any `DepthProtocol` field, e.g. `alignment`). The summary is the
protocol's own reduction: per-image means for depth (Marigold) and restoration, split-wide
confusion for ADE20K (mmsegmentation), split-wide PQ sums for COCO panoptic (panopticapi),
pooled pixels or per-image means for normals. The per-image numbers are each image scored alone
with the same settings (what the worst-cases picture ranks).

  name                                          task       headline   settings
  nyu_eigen kitti_eigen kitti_garg eth3d        depth      abs_rel    `depth_protocol(name)`
  scannet diode
  ade20k                                        semantic   miou       150 classes, ignore 255
  coco_panoptic                                 panoptic   pq         the task's categories
  rain100 / sidd / lol                          derain / denoise / lowlight  psnr  Y 8-bit / RGB
  normals_pixel / normals_image                 normals    mean       DSINE pooled / Marigold
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from dense_diffusion import errors
from dense_diffusion import registry
from dense_diffusion.metrics import depth as depth_lib
from dense_diffusion.metrics import normals as normals_lib
from dense_diffusion.metrics import panoptic as panoptic_lib
from dense_diffusion.metrics import protocols
from dense_diffusion.metrics import semantic as semantic_lib


def _scalars(result: Mapping[str, Any], keys) -> dict[str, float]:
  return {k: float(result[k]) for k in keys if k in result}


class Scorer:
  """Streams one protocol over a split: `add` one image, `summary` of all of them.

  Args:
    make: () -> a fresh streaming accumulator of the `metrics` package.
    update: (accumulator, pred, truth, mask) -> None, adds one image.
    keys: the metrics reported per image and in the summary.
    summarize: accumulator result -> the summary's metrics (default: `keys` of the result).
  """

  def __init__(self, make: Callable[[], Any], update: Callable[..., None], keys,
               summarize: Callable[[dict], dict] | None = None):
    self._make, self._update, self.keys = make, update, tuple(keys)
    self._summarize = summarize or (lambda r: _scalars(r, self.keys))
    self.total = make()
    self.num_images = 0

  def add(self, pred, truth, mask=None) -> dict[str, float] | None:
    """Scores one image alone and adds it to the split; None when it does not count (no valid
    pixel, non-finite prediction: the accumulator's counts say why)."""
    one = self._make()
    self._update(one, pred, truth, mask)
    self._update(self.total, pred, truth, mask)
    self.num_images += 1
    result = one.result()
    if not result.get("num_images", 1):
      return None
    return self._summarize(result)

  def summary(self) -> dict[str, Any]:
    result = self.total.result()
    out = self._summarize(result)
    for k in ("num_images", "num_empty", "num_nonfinite"):
      if k in result:
        out[k] = int(result[k])
    return out


@dataclasses.dataclass(frozen=True)
class Protocol:
  """One benchmark's scoring.

  Attributes:
    name: the registry name (`--protocol`).
    task: the task whose answers it scores.
    headline, higher_is_better: the metric that ranks models (and the worst images).
    build: (task object, **options) -> Scorer.
    options: the option names `scorer` accepts.
    source: where the settings come from (docs/evaluation.md has more).
  """

  name: str
  task: str
  headline: str
  higher_is_better: bool
  build: Callable[..., Scorer]
  options: tuple[str, ...] = ()
  source: str = ""

  def scorer(self, task: Any = None, **options) -> Scorer:
    """A fresh `Scorer`; `options` override the protocol's settings (ConfigError if it has no
    such setting or the value does not fit)."""
    unknown = sorted(set(options) - set(self.options))
    if unknown:
      known = ", ".join(self.options) or "none"
      raise errors.ConfigError(f"protocol {self.name!r} has no setting {', '.join(unknown)} "
                               f"(its settings: {known})")
    try:
      return self.build(task, **options)
    except ValueError as e:
      raise errors.ConfigError(f"protocol {self.name!r}: {e}") from None


PROTOCOLS: registry.Registry[Protocol] = registry.Registry("evaluation protocol")


def protocol(name: str) -> Protocol:
  """The registered protocol `name` (UnknownNameError lists the known ones)."""
  return PROTOCOLS.get(name)


def names() -> list[str]:
  return PROTOCOLS.names()


# --- depth ---------------------------------------------------------------------------------------

DEPTH_REPORTED = depth_lib.DEPTH_KEYS
_DEPTH_OPTIONS = tuple(f.name for f in dataclasses.fields(protocols.DepthProtocol)
                       if f.name not in ("name", "source"))


def _depth(name: str) -> Callable[..., Scorer]:
  def build(task, **overrides):
    del task
    proto = protocols.depth_protocol(name, **overrides)

    def update(acc, pred, truth, mask):
      acc.update(np.asarray(pred, np.float32)[None], np.asarray(truth, np.float32)[None],
                 None if mask is None else np.asarray(mask, bool)[None])
    return Scorer(proto.accumulator, update, DEPTH_REPORTED)
  return build


for _name in protocols.DEPTH_PROTOCOLS.names():
  _p = protocols.depth_protocol(_name)
  PROTOCOLS.register(_name, Protocol(_name, "depth", "abs_rel", False, _depth(_name),
                                     _DEPTH_OPTIONS, _p.source))


# --- normals -------------------------------------------------------------------------------------

NORMALS_REPORTED = normals_lib.NORMAL_KEYS


def _normals(reduction: str) -> Callable[..., Scorer]:
  def build(task):
    del task

    def update(acc, pred, truth, mask):
      acc.update(pred, truth, mask)
    return Scorer(lambda: normals_lib.NormalMetrics(reduction=reduction), update,
                  NORMALS_REPORTED)
  return build


PROTOCOLS.register("normals_pixel", Protocol(
    "normals_pixel", "normals", "mean", False, _normals("pixel"),
    source="DSINE compute_normal_metrics (Lotus, E2E-FT): every statistic over all valid pixels "
           "of the split"))
PROTOCOLS.register("normals_image", Protocol(
    "normals_image", "normals", "mean", False, _normals("image"),
    source="Marigold script/normals/eval.py: every statistic per image, then the mean over "
           "images"))


# --- semantic and panoptic segmentation ---------------------------------------------------------


def _ade20k(task, reduce_zero_label: bool = False):
  classes = int(getattr(task, "num_classes", 150) or 150)
  if classes != 150:
    raise ValueError(f"ADE20K has 150 classes; the model's semantic task has {classes}")

  def update(acc, pred, truth, mask):
    del mask
    acc.update(np.asarray(pred), np.asarray(truth))
  return Scorer(lambda: semantic_lib.SemanticConfusion(150, 255,
                                                       reduce_zero_label=reduce_zero_label),
                update, ("miou", "pixel_accuracy", "mean_accuracy"))


PROTOCOLS.register("ade20k", Protocol(
    "ade20k", "semantic_ade20k", "miou", True, _ade20k, ("reduce_zero_label",),
    source="mmsegmentation IoUMetric on ADE20K val (2,000 images, 150 classes): intersections "
           "and unions summed over the split, mIoU over classes present, aAcc, mAcc; "
           "reduce_zero_label for raw annotation PNGs (the ade20k reader has reduced them)"))


def _coco_panoptic(task):
  categories = getattr(task, "categories", None)
  if not categories:
    raise ValueError("the panoptic task has no categories")

  def update(acc, pred, truth, mask):
    del mask
    acc.update(truth["ids"], truth["segments"], pred["ids"], pred["segments"])

  def summarize(result):
    out = {k: result["All"][k] for k in ("pq", "sq", "rq")}
    for group in ("Things", "Stuff"):
      out.update({f"{k}_{group.lower()}": result[group][k] for k in ("pq", "sq", "rq")})
    return out
  return Scorer(lambda: panoptic_lib.PanopticQuality(categories), update, ("pq", "sq", "rq"),
                summarize)


PROTOCOLS.register("coco_panoptic", Protocol(
    "coco_panoptic", "panoptic", "pq", True, _coco_panoptic,
    source="panopticapi pq_compute on COCO val2017 (5,000 images, 133 categories): TP / FP / FN "
           "and IoU sums per category over the split; PQ, SQ, RQ for all, things and stuff"))


# --- restoration ---------------------------------------------------------------------------------


def _restoration(name: str) -> Callable[..., Scorer]:
  def build(task):
    del task
    proto = protocols.restoration_protocol(name)

    def update(acc, pred, truth, mask):
      del mask
      truth = np.asarray(truth)
      truth = truth.astype(np.float32) / 255.0 if truth.dtype == np.uint8 else truth
      acc.update(np.clip(np.asarray(pred, np.float32), 0.0, 1.0), truth)
    return Scorer(lambda: proto.accumulator(1.0), update, ("psnr", "ssim"))
  return build


for _name, _task in (("rain100", "derain"), ("sidd", "denoise"), ("lol", "lowlight")):
  PROTOCOLS.register(_name, Protocol(
      _name, _task, "psnr", True, _restoration(_name),
      source=protocols.restoration_protocol(_name).source))
