"""Panoptic segmentation: a composite of the semantic and instance tasks, merged to COCO format.

Answer format (COCO panoptic): `{"ids": i32[H, W] segment ids (0 = void), "segments": [{"id",
"category_id", "iscrowd"}, ...]}`. `categories` is the dataset's list of `{"id", "isthing"}`; its
order defines the contiguous class index used by the semantic output.

Panoptic is not trained as a task of its own: the model is trained on its parts (a semantic task
and instance, two prompts), and the panoptic answer is their merge (`combine`). Evaluation and
prediction offer it wherever both parts are trained and a semantic task (any of the family:
`semantic`, or COCO's own `semantic_coco` beside ADE20K's `semantic_ade20k`) knows its thing /
stuff categories.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from dense_diffusion import metrics
from dense_diffusion.tasks import base
from dense_diffusion.tasks import instance as instance_lib
from dense_diffusion.tasks import outputs
from dense_diffusion.tasks import segmentation

# Label features of the panoptic ground truth in evaluation examples: the segment-id map and,
# per segment, its id, COCO category id and crowd flag.
LABEL_KEYS = ("panoptic_ids", "segment_id", "category_id", "iscrowd")


@base.register("panoptic")
@dataclasses.dataclass(frozen=True)
class PanopticTask(base.Task):
  """Encodes to `{"semantic": rgb, "instance": rgb}`; decodes both back to one COCO panoptic map.

  Crowd segments are ignore (255) in the semantic output and unknown (-1) in the instance output.
  Decoding: every decoded instance takes the majority thing class under it (instances with no
  thing pixel under them are dropped); each stuff class's remaining pixels form one segment;
  thing pixels not covered by an instance, and segments smaller than `min_area`, become void.
  """

  name: str = "panoptic"
  prompt: str = "Perform panoptic segmentation"
  categories: Sequence[dict] = ()
  min_area: int = 1  # pixels; smaller segments become void (panopticapi-style area limits).
  instance_options: dict = dataclasses.field(default_factory=dict)
  # The trained semantic task it merges (a task of the family "semantic") and its options (its
  # classes and palette); empty options: `categories` alone make a plain semantic task.
  semantic_task: str = "semantic"
  semantic_options: dict = dataclasses.field(default_factory=dict)

  parts = ("semantic", "instance")
  label_key = "panoptic_ids"
  interpolation = "nearest"
  headline = "pq"
  higher_is_better = True

  def __post_init__(self):
    if not self.categories:
      raise ValueError("panoptic needs categories=[{'id': ..., 'isthing': ...}, ...]")
    for c in self.categories:
      if "id" not in c or "isthing" not in c:
        raise ValueError(f"panoptic category {c} lacks 'id' or 'isthing'")
    object.__setattr__(self, "categories", tuple(dict(c) for c in self.categories))

  @classmethod
  def from_parts(cls, parts: Mapping[str, base.Task]) -> Optional["PanopticTask"]:
    """From a trained semantic task (its `categories`, with thing / stuff) and the instance
    task (its options); None when the semantic task has no such categories (ADE20K's)."""
    semantic, instance = parts["semantic"], parts["instance"]
    categories = getattr(semantic, "categories", ())
    if not categories or not all("isthing" in c for c in categories):
      return None
    return cls(categories=categories, instance_options=instance.options(),
               semantic_task=semantic.name, semantic_options=semantic.options())

  def part_names(self) -> dict[str, str]:
    return {"semantic": self.semantic_task, "instance": "instance"}

  @property
  def semantic(self) -> segmentation.SemanticTask:
    if self.semantic_options:
      return base.get(self.semantic_task, **self.semantic_options)
    return base.get(self.semantic_task, num_classes=len(self.categories))

  @property
  def instance(self) -> instance_lib.InstanceTask:
    return instance_lib.InstanceTask(**self.instance_options)

  @property
  def class_of_category(self) -> dict[int, int]:
    return {int(c["id"]): i for i, c in enumerate(self.categories)}

  @property
  def is_thing_class(self) -> np.ndarray:
    return np.array([bool(c["isthing"]) for c in self.categories])

  def split(self, ids: np.ndarray, segments: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """COCO panoptic -> (semantic i32[H, W] with 255 = ignore, instance ids i32[H, W]).

    Things are numbered 1..n in the order of `segments`; stuff is instance 0; void and crowd
    are unknown (semantic 255, instance -1).
    """
    ids = base.check_map(ids, self.name, "a segment-id map (H, W)").astype(np.int64)
    lookup = self.class_of_category
    seg_ids = [int(s["id"]) for s in segments]
    present = np.unique(ids)
    missing = sorted(set(present.tolist()) - set(seg_ids) - {0})
    if missing:
      raise ValueError(f"panoptic segment ids {missing[:10]} are in the map but not in segments")
    size = int(max(present.max(), max(seg_ids, default=0))) + 1
    semantic_lut = np.full(size, segmentation.IGNORE_LABEL, np.int32)
    instance_lut = np.full(size, instance_lib.UNKNOWN_INSTANCE, np.int32)
    next_instance = 1
    for s in segments:
      if int(s["category_id"]) not in lookup:
        raise ValueError(f"panoptic segment {s['id']} has unknown category_id {s['category_id']}")
      if s.get("iscrowd", 0):
        continue
      cls = lookup[int(s["category_id"])]
      semantic_lut[int(s["id"])] = cls
      if self.is_thing_class[cls]:
        instance_lut[int(s["id"])] = next_instance
        next_instance += 1
      else:
        instance_lut[int(s["id"])] = 0
    return semantic_lut[ids], instance_lut[ids]

  def encode(self, answer: dict) -> dict[str, np.ndarray]:
    """{"ids", "segments"} -> {"semantic": f32[H, W, 3], "instance": f32[H, W, 3]}."""
    semantic, instance = self.split(answer["ids"], answer["segments"])
    return {"semantic": self.semantic.encode(semantic), "instance": self.instance.encode(instance)}

  def valid_mask(self, answer: dict) -> np.ndarray:
    return np.asarray(answer["ids"]) > 0

  def decode(self, rgb: Any) -> Any:
    """{"semantic", "instance"} RGB (each (H,W,3) or (N,H,W,3)), or one (..., 6) array -> COCO."""
    if isinstance(rgb, dict):
      semantic_rgb, instance_rgb = rgb["semantic"], rgb["instance"]
    else:
      rgb = np.asarray(rgb)
      if rgb.shape[-1] != 6:
        raise ValueError(
            "panoptic.decode expects {'semantic', 'instance'} or an array with 6 channels "
            f"(semantic RGB then instance RGB), got shape {rgb.shape}")
      semantic_rgb, instance_rgb = rgb[..., :3], rgb[..., 3:]
    semantic = self.semantic.decode(semantic_rgb)
    instance = self.instance.decode(instance_rgb)
    if semantic.shape != instance.shape:
      raise ValueError(f"semantic {semantic.shape} and instance {instance.shape} sizes differ")
    if semantic.ndim == 2:
      return self.merge(semantic, instance)
    return [self.merge(s, i) for s, i in zip(semantic, instance)]

  def combine(self, part_answers: Mapping[str, Any]) -> dict:
    return self.merge(part_answers["semantic"], part_answers["instance"])

  def merge(self, semantic: np.ndarray, instance: np.ndarray) -> dict:
    """Decoded class map i32[H, W] + instance ids i32[H, W] -> {"ids", "segments"}."""
    is_thing = self.is_thing_class
    k = len(self.categories)
    valid = (semantic >= 0) & (semantic < k)
    thing_pixel = np.zeros(semantic.shape, bool)
    thing_pixel[valid] = is_thing[semantic[valid]]
    ids = np.zeros(semantic.shape, np.int32)
    segments = []

    def add(mask, cls):
      if mask.sum() < self.min_area:
        return
      seg_id = len(segments) + 1
      ids[mask] = seg_id
      segments.append({"id": seg_id, "category_id": int(self.categories[cls]["id"]),
                       "iscrowd": 0, "isthing": bool(is_thing[cls]), "area": int(mask.sum())})

    num_instances = int(instance.max(initial=0))
    if num_instances:
      # Votes of thing classes under every instance: one bincount over (instance, class) pairs.
      sel = (instance > 0) & thing_pixel
      votes = np.bincount(instance[sel].astype(np.int64) * k + semantic[sel],
                          minlength=(num_instances + 1) * k).reshape(num_instances + 1, k)
      for inst in range(1, num_instances + 1):
        if votes[inst].sum() == 0:
          continue
        add(instance == inst, int(np.argmax(votes[inst])))
    covered = ids > 0
    for cls in np.flatnonzero(~is_thing):
      add(valid & (semantic == cls) & ~covered, int(cls))
    return {"ids": ids, "segments": segments}

  def answer(self, example: Mapping[str, Any], prefix: str = base.LABEL_PREFIX) -> dict:
    """{"ids", "segments"} from the label features `LABEL_KEYS` of an evaluation example."""
    ids, seg, cat, crowd = (np.asarray(example[prefix + k]) for k in LABEL_KEYS)
    return {"ids": ids, "segments": [
        {"id": int(a), "category_id": int(b), "iscrowd": int(d)}
        for a, b, d in zip(seg, cat, crowd) if a > 0]}

  def answer_size(self, answer: dict) -> tuple[int, int]:
    h, w = np.shape(answer["ids"])[:2]
    return int(h), int(w)

  def evaluator(self):
    return PanopticEvaluator(self)

  def write(self, out, stem, image, answer):
    """COCO panoptic: `X_panoptic.png` (id = R + 256 G + 256^2 B), `X_panoptic.json` (its
    segments_info and the categories) and `X_panoptic_overlay.png`."""
    ids = np.asarray(answer["ids"])
    png = outputs.save_png(out / f"{stem}_panoptic.png", id_rgb(ids))
    names = {int(c["id"]): c.get("name", str(c["id"])) for c in self.categories}
    segments = [{"id": int(s["id"]), "category_id": int(s["category_id"]),
                 "category_name": names[int(s["category_id"])], "iscrowd": 0,
                 "isthing": int(bool(s["isthing"])), "area": int(np.sum(ids == s["id"])),
                 "bbox": _bbox(ids == s["id"])} for s in answer["segments"]]
    record = {"image_id": stem, "file_name": png.name, "height": int(ids.shape[0]),
              "width": int(ids.shape[1]), "segments_info": segments,
              "categories": [dict(c) for c in self.categories]}
    js = out / f"{stem}_panoptic.json"
    js.write_text(json.dumps(record, indent=1))
    overlay = outputs.overlay(image, outputs.id_colours(ids), mask=ids > 0)
    return [png, js, outputs.save_png(out / f"{stem}_panoptic_overlay.png", overlay)]


class PanopticEvaluator(base.Evaluator):
  """PQ / SQ / RQ over all categories, and PQ of things and of stuff; baseline: PQ 0."""

  def __init__(self, task: PanopticTask):
    super().__init__(task)
    self.model = metrics.PanopticQuality(task.categories)

  def update(self, answers, truths, inputs):
    for pred, gt in zip(answers, truths):
      self.model.update(gt["ids"], gt["segments"], pred["ids"], pred["segments"])

  def result(self):
    r = self.model.result()
    return {"pq": r["All"]["pq"], "sq": r["All"]["sq"], "rq": r["All"]["rq"],
            "pq_things": r["Things"]["pq"], "pq_stuff": r["Stuff"]["pq"], "baseline": {"pq": 0.0}}


def id_rgb(ids: np.ndarray) -> np.ndarray:
  """i32[H, W] segment ids -> u8[H, W, 3] with id = R + 256 G + 256^2 B (COCO panoptic PNG)."""
  ids = np.asarray(ids, np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], -1).astype(np.uint8)


def _bbox(mask: np.ndarray) -> list[int]:
  ys, xs = np.nonzero(mask)
  if not len(ys):
    return [0, 0, 0, 0]
  return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]
