"""Panoptic segmentation as a semantic output plus an instance output, merged to COCO format.

Answer format (COCO panoptic): `{"ids": i32[H, W] segment ids (0 = void), "segments": [{"id",
"category_id", "iscrowd"}, ...]}`. `categories` is the dataset's list of `{"id", "isthing"}`; its
order defines the contiguous class index used by the semantic output.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from dense_diffusion.tasks import base
from dense_diffusion.tasks import segmentation


@base.register("panoptic")
@dataclasses.dataclass(frozen=True)
class PanopticTask(base.Task):
  """Encodes to `{"semantic": rgb, "instance": rgb}`; decodes both back to one COCO panoptic map.

  Crowd segments are ignore (255) in the semantic output and not instances. Decoding: every
  decoded instance takes the majority thing class under it (instances with no thing pixel under
  them are dropped); each stuff class's remaining pixels form one segment; thing pixels not
  covered by an instance, and segments smaller than `min_area`, become void.
  """

  name: str = "panoptic"
  prompt: str = "Perform panoptic segmentation"
  categories: Sequence[dict] = ()
  min_area: int = 1  # pixels; smaller segments become void (panopticapi-style area limits).
  instance_options: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if not self.categories:
      raise ValueError("panoptic needs categories=[{'id': ..., 'isthing': ...}, ...]")
    for c in self.categories:
      if "id" not in c or "isthing" not in c:
        raise ValueError(f"panoptic category {c} lacks 'id' or 'isthing'")
    object.__setattr__(self, "categories", tuple(dict(c) for c in self.categories))

  @property
  def semantic(self) -> segmentation.SemanticTask:
    return segmentation.SemanticTask(num_classes=len(self.categories))

  @property
  def instance(self) -> segmentation.InstanceTask:
    return segmentation.InstanceTask(**self.instance_options)

  @property
  def class_of_category(self) -> dict[int, int]:
    return {int(c["id"]): i for i, c in enumerate(self.categories)}

  @property
  def is_thing_class(self) -> np.ndarray:
    return np.array([bool(c["isthing"]) for c in self.categories])

  def split(self, ids: np.ndarray, segments: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """COCO panoptic -> (semantic i32[H, W] with 255 = ignore, instance ids i32[H, W])."""
    ids = base.check_map(ids, self.name, "a segment-id map (H, W)").astype(np.int64)
    lookup = self.class_of_category
    seg_ids = [int(s["id"]) for s in segments]
    present = np.unique(ids)
    missing = sorted(set(present.tolist()) - set(seg_ids) - {0})
    if missing:
      raise ValueError(f"panoptic segment ids {missing[:10]} are in the map but not in segments")
    size = int(max(present.max(), max(seg_ids, default=0))) + 1
    semantic_lut = np.full(size, segmentation.IGNORE_LABEL, np.int32)
    instance_lut = np.zeros(size, np.int32)
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
    return semantic_lut[ids], instance_lut[ids]

  def encode(self, answer: dict) -> dict[str, np.ndarray]:
    """{"ids", "segments"} -> {"semantic": f32[H, W, 3], "instance": f32[H, W, 3]}."""
    semantic, instance = self.split(answer["ids"], answer["segments"])
    return {"semantic": self.semantic.encode(semantic), "instance": self.instance.encode(instance)}

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
