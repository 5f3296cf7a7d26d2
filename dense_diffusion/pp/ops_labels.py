"""Label ops: NYUv2 Eigen crop, depth validity range, ADE20K label shift, COCO panoptic decoding."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from dense_diffusion.pp.registry import register
from dense_diffusion.tasks import IGNORE_LABEL  # 255, the semantic ignore label of DESIGN.md
# Eigen et al. crop of 480x640 NYUv2 frames: rows 45:471, columns 41:601.
EIGEN_CROP = (45, 471, 41, 601)


def _keys(keys):
  return (keys,) if isinstance(keys, str) else tuple(keys)


@register("nyu_eigen_crop")
def get_nyu_eigen_crop(keys: Sequence[str] = ("image", "depth")):
  """Crops 480x640 frames to the Eigen crop (426x560) in every key."""
  y0, y1, x0, x1 = EIGEN_CROP

  def _crop(data):
    data = dict(data)
    for k in _keys(keys):
      tf.debugging.assert_equal(tf.shape(data[k])[:2], tf.constant([480, 640]),
                                message=f"nyu_eigen_crop expects 480x640 frames in {k!r}")
      data[k] = data[k][y0:y1, x0:x1]
    return data
  return _crop


@register("eigen_mask")
def get_eigen_mask(key: str = "depth"):
  """Sets depth outside the Eigen crop to 0 (invalid), keeping the 480x640 frame."""
  y0, y1, x0, x1 = EIGEN_CROP

  def _mask(data):
    d = data[key]
    shape = tf.shape(d)
    rows = tf.range(shape[0])[:, None]
    cols = tf.range(shape[1])[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    return {**data, key: tf.where(inside, d, tf.zeros_like(d))}
  return _mask


@register("depth_range")
def get_depth_range(min_depth: float = 1e-3, max_depth: float = 10.0, key: str = "depth"):
  """Casts depth to float32 and marks values outside (min_depth, max_depth) invalid (0)."""
  def _range(data):
    d = tf.cast(data[key], tf.float32)
    valid = (d > min_depth) & (d < max_depth) & tf.math.is_finite(d)
    return {**data, key: tf.where(valid, d, tf.zeros_like(d))}
  return _range


@register("ade20k_labels")
def get_ade20k_labels(key: str = "semantic"):
  """ADEChallengeData2016 labels: 0 (other) -> 255 ignore, 1..150 -> 0..149, as int32 [H, W]."""
  def _shift(data):
    x = tf.cast(data[key], tf.int32)
    if x.shape.rank == 3:
      x = x[..., 0]
    return {**data, key: tf.where(x == 0, IGNORE_LABEL, x - 1)}
  return _shift


def panoptic_rgb_to_ids(rgb: tf.Tensor) -> tf.Tensor:
  """COCO panoptic PNG u8[H, W, 3] -> segment ids i32[H, W] = R + 256 G + 65536 B."""
  rgb = tf.cast(rgb, tf.int32)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


@register("coco_panoptic")
def get_coco_panoptic(categories: Sequence[dict] | None = None,
                      image_key: str = "panoptic_image", objects_key: str = "panoptic_objects",
                      semantic_key: str = "semantic", instance_key: str = "instance",
                      ids_key: str = "panoptic_ids"):
  """TFDS `coco/2017_panoptic` annotation -> semantic, instance and segment-id maps.

  `panoptic_objects/label` is a position in `categories` (default: the 133 official COCO
  panoptic categories shipped with the package); that position is the contiguous class index of
  the semantic map and `categories[label]["id"]` the COCO category id. Crowd segments and void
  (id 0) -> 255 in `semantic` and 0 in `instance`; thing segments get instance ids 1..n in the
  order of the objects list; stuff -> instance 0. The conversion is the `panoptic` task's own
  `split` (one implementation of the rule). Adds:
    semantic i32[H, W], instance i32[H, W], panoptic_ids i32[H, W] (0 = void), and per segment
    `{ids_key}/segment_id`, `/category_id`, `/iscrowd` (i32[n]) for the PQ evaluator.
  """
  from dense_diffusion import tasks  # Late import: tasks only needed when this op is built.
  if categories is None:
    from dense_diffusion.datasets import coco
    categories = coco.panoptic_categories()
  task = tasks.get("panoptic", categories=categories)
  category_ids = np.array([int(c["id"]) for c in categories], np.int32)

  def _split(ids, seg_ids, labels, crowd):
    if labels.size and (labels.min() < 0 or labels.max() >= len(category_ids)):
      raise ValueError(f"coco_panoptic: object label {labels.max()} outside the "
                       f"{len(category_ids)} categories")
    segments = [{"id": int(i), "category_id": int(category_ids[l]), "iscrowd": int(c)}
                for i, l, c in zip(seg_ids, labels, crowd)]
    semantic, instance = task.split(ids, segments)
    return semantic.astype(np.int32), instance.astype(np.int32)

  def _convert(data):
    data = dict(data)
    ids = panoptic_rgb_to_ids(data[image_key])
    objects = data[objects_key]
    seg_ids = tf.cast(objects["id"], tf.int32)
    labels = tf.cast(objects["label"], tf.int32)
    crowd = tf.cast(objects["is_crowd"], tf.int32)
    semantic, instance = tf.numpy_function(_split, [ids, seg_ids, labels, crowd],
                                           [tf.int32, tf.int32], stateful=False)
    semantic.set_shape(ids.shape)
    instance.set_shape(ids.shape)
    data[semantic_key], data[instance_key], data[ids_key] = semantic, instance, ids
    data[f"{ids_key}/segment_id"] = seg_ids
    data[f"{ids_key}/category_id"] = tf.gather(category_ids, labels)
    data[f"{ids_key}/iscrowd"] = crowd
    return data
  return _convert


@register("panoptic_labels")
def get_panoptic_labels(key: str = "panoptic", prefix: str = "label/"):
  """Flattens a nested panoptic feature {ids, segments: {id, category_id, iscrowd, ...}} into
  `{prefix}panoptic_ids` i32[H, W], `{prefix}segment_id`, `{prefix}category_id`,
  `{prefix}iscrowd` (i32[n]) -- the raw labels the PQ evaluator reads (same keys as the COCO
  reader's evaluation entries). Used by synthetic_scenes.
  """
  def _flatten(data):
    data = dict(data)
    pan = data[key]
    segs = pan["segments"]
    data[f"{prefix}panoptic_ids"] = tf.cast(pan["ids"], tf.int32)
    data[f"{prefix}segment_id"] = tf.cast(segs["id"], tf.int32)
    data[f"{prefix}category_id"] = tf.cast(segs["category_id"], tf.int32)
    data[f"{prefix}iscrowd"] = tf.cast(segs["iscrowd"], tf.int32)
    return data
  return _flatten
