"""Preprocessing ops: parser, registry errors, joint crops/flips, resizing, label conversions."""
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dense_diffusion import pp
from dense_diffusion import tasks


def _run(spec, data):
  out = pp.get_preprocess_fn(spec)({k: tf.convert_to_tensor(v) for k, v in data.items()})
  return {k: v.numpy() for k, v in out.items()}


def _coords(h=12, w=16):
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  image = np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)
  label = (rows * 100 + cols).astype(np.int32)
  normals = np.stack([np.full((h, w), 0.6), np.full((h, w), 0.0), np.full((h, w), -0.8)],
                     -1).astype(np.float32)
  return {"image": image, "label": label, "normals": normals}


def test_parse_and_split():
  assert pp.parse('resize(128, key="depth", method="nearest")') == (
      "resize", (128,), {"key": "depth", "method": "nearest"})
  assert pp.parse("decode") == ("decode", (), {})
  assert pp.split_ops('a(keys=("x|y", "z"))| b |c(1)') == ['a(keys=("x|y", "z"))', "b", "c(1)"]


def test_unknown_op_lists_known_ones():
  with pytest.raises(KeyError, match="known pp ops: .*random_flip.*value_range"):
    pp.get_preprocess_fn("decode|no_such_op(3)")


def test_bad_syntax_and_arguments_raise():
  with pytest.raises(ValueError, match="cannot parse"):
    pp.get_preprocess_fn("resize(128")
  with pytest.raises(ValueError, match="literals"):
    pp.get_preprocess_fn("resize(size)")
  with pytest.raises(ValueError, match="bad arguments"):
    pp.get_preprocess_fn("resize(128, colour=1)")


def test_joint_random_crop_keeps_labels_aligned_and_is_seeded():
  data = _coords()
  spec = 'random_crop((5, 7), keys=("image", "label", "normals"))'
  offsets = set()
  for seed in range(12):
    out = _run(spec, {**data, "_rng": np.array([7, seed], np.int64)})
    assert out["image"].shape == (5, 7, 3) and out["label"].shape == (5, 7)
    np.testing.assert_array_equal(out["label"], out["image"][..., 0].astype(np.int32) * 100
                                  + out["image"][..., 1])
    again = _run(spec, {**data, "_rng": np.array([7, seed], np.int64)})
    np.testing.assert_array_equal(again["label"], out["label"])
    offsets.add(int(out["label"][0, 0]))
  assert len(offsets) > 3


def test_joint_flip_negates_normal_x_only():
  data = _coords()
  spec = 'random_flip(keys=("image", "label"), normals_keys=("normals",))'
  seen = set()
  for seed in range(16):
    out = _run(spec, {**data, "_rng": np.array([0, seed], np.int64)})
    flipped = bool(out["label"][0, 0] != 0)
    seen.add(flipped)
    ref = data["label"][:, ::-1] if flipped else data["label"]
    np.testing.assert_array_equal(out["label"], ref)
    np.testing.assert_array_equal(out["image"][..., 1], ref % 100)
    expected_x = -0.6 if flipped else 0.6
    np.testing.assert_allclose(out["normals"][..., 0], expected_x)
    np.testing.assert_allclose(out["normals"][..., 2], -0.8)
  assert seen == {True, False}


def test_resize_nearest_keeps_ids_and_bilinear_refuses_int_labels():
  data = _coords()
  out = _run('resize(24, key="label", method="nearest")|resize((6, 8), key="image")', data)
  assert out["label"].shape == (24, 24) and out["label"].dtype == np.int32
  assert set(np.unique(out["label"])) <= set(np.unique(data["label"]))
  assert out["image"].shape == (6, 8, 3) and out["image"].dtype == np.float32
  with pytest.raises(ValueError, match="nearest"):
    _run('resize(24, key="label", method="bilinear")', data)


def test_value_range():
  out = _run("value_range(-1, 1)", {"image": np.array([[[0, 255, 51]]], np.uint8)})
  np.testing.assert_allclose(out["image"], [[[-1.0, 1.0, -0.6]]], atol=1e-6)


def test_nyu_eigen_crop_and_depth_range():
  depth = np.arange(480 * 640, dtype=np.float32).reshape(480, 640) / 30000.0
  image = np.zeros((480, 640, 3), np.uint8)
  out = _run("depth_range(0.001, 10.0)|nyu_eigen_crop", {"image": image, "depth": depth})
  assert out["depth"].shape == (426, 560) and out["image"].shape == (426, 560, 3)
  ref = depth[45:471, 41:601]
  ref = np.where((ref > 0.001) & (ref < 10.0), ref, 0.0)
  np.testing.assert_array_equal(out["depth"], ref)
  masked = _run('eigen_mask("depth")', {"depth": depth})["depth"]
  assert masked[44].max() == 0 and masked[:, 601:].max() == 0
  np.testing.assert_array_equal(masked[45:471, 41:601], depth[45:471, 41:601])
  with pytest.raises(tf.errors.InvalidArgumentError):
    _run("nyu_eigen_crop", {"image": image[:100], "depth": depth[:100]})


def test_ade20k_label_shift():
  label = np.array([[0, 1, 150], [2, 0, 75]], np.uint8)[..., None]
  out = _run('ade20k_labels("semantic")', {"semantic": label})
  np.testing.assert_array_equal(out["semantic"], [[255, 0, 149], [1, 255, 74]])


def test_keep_drop_copy():
  out = _run('copy("a", "b")|drop("a")|keep("b")', {"a": np.ones(2), "c": np.zeros(1)})
  assert sorted(out) == ["b"]
  with pytest.raises(KeyError):
    _run('keep("missing")', {"a": np.ones(2)})


# -- COCO panoptic on the real panopticapi sample --
def _coco_fixture(shared_fixtures):
  root = shared_fixtures / "coco_panoptic_sample"
  meta = json.loads((root / "sample_data" / "panoptic_examples.json").read_text())
  categories = json.loads((root / "panoptic_coco_categories.json").read_text())
  out = []
  for ann in meta["annotations"]:
    rgb = np.asarray(Image.open(root / "sample_data" / "panoptic_examples" / ann["file_name"]))
    out.append((rgb, ann["segments_info"]))
  return categories, out


def _ids(rgb):
  rgb = rgb.astype(np.int64)
  return rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def _tfds_style(rgb, segments, categories):
  """A coco/2017_panoptic-like example: objects carry `label` = position in the category list."""
  pos = {c["id"]: i for i, c in enumerate(categories)}
  return {
      "panoptic_image": rgb,
      "panoptic_objects": {
          "id": np.array([s["id"] for s in segments], np.int64),
          "label": np.array([pos[s["category_id"]] for s in segments], np.int64),
          "is_crowd": np.array([bool(s["iscrowd"]) for s in segments]),
      }}


def test_packaged_categories_match_fixture(shared_fixtures):
  from dense_diffusion.datasets import coco
  categories, _ = _coco_fixture(shared_fixtures)
  packaged = coco.panoptic_categories()
  assert [(c["id"], c["name"], c["isthing"]) for c in packaged] == [
      (c["id"], c["name"], c["isthing"]) for c in categories]


def test_coco_panoptic_real_sample(shared_fixtures):
  categories, samples = _coco_fixture(shared_fixtures)
  fn = pp.get_preprocess_fn("coco_panoptic")
  thing_ids = {c["id"] for c in categories if c["isthing"]}
  index_of = {c["id"]: i for i, c in enumerate(categories)}
  n_crowd = 0
  for rgb, segments in samples:
    ex = _tfds_style(rgb, segments, categories)
    out = fn({"panoptic_image": tf.constant(ex["panoptic_image"]),
              "panoptic_objects": {k: tf.constant(v) for k, v in ex["panoptic_objects"].items()}})
    out = {k: v.numpy() for k, v in out.items() if k != "panoptic_objects"}
    ids = _ids(rgb)
    np.testing.assert_array_equal(out["panoptic_ids"], ids)
    np.testing.assert_array_equal(out["panoptic_ids/category_id"],
                                  [s["category_id"] for s in segments])
    np.testing.assert_array_equal(out["panoptic_ids/iscrowd"], [s["iscrowd"] for s in segments])
    sem, inst = out["semantic"], out["instance"]
    np.testing.assert_array_equal(sem[ids == 0], 255)
    np.testing.assert_array_equal(inst[ids == 0], tasks.UNKNOWN_INSTANCE)  # void: unknown
    inst_ids = set()
    for s in segments:
      m = ids == s["id"]
      assert m.sum() == s["area"]
      if s["iscrowd"]:
        n_crowd += 1
        assert np.all(sem[m] == 255) and np.all(inst[m] == tasks.UNKNOWN_INSTANCE)
        continue
      assert np.all(sem[m] == index_of[s["category_id"]])
      if s["category_id"] in thing_ids:
        assert len(np.unique(inst[m])) == 1 and inst[m][0] > 0
        inst_ids.add(int(inst[m][0]))
      else:
        assert np.all(inst[m] == 0)
    assert len(inst_ids) == sum(1 for s in segments
                                if s["category_id"] in thing_ids and not s["iscrowd"])
  assert n_crowd > 0, "the sample has crowd segments"


def test_coco_panoptic_encode_decode_merge_has_pq_one(shared_fixtures):
  from dense_diffusion.metrics import panoptic as metrics
  categories, samples = _coco_fixture(shared_fixtures)
  fn = pp.get_preprocess_fn("coco_panoptic")
  semantic = tasks.get("semantic", num_classes=133, categories=categories)
  instance = tasks.get("instance")
  task = tasks.get("panoptic", categories=categories)
  pairs = []
  for rgb, segments in samples:
    ex = _tfds_style(rgb, segments, categories)
    out = fn({"panoptic_image": tf.constant(ex["panoptic_image"]),
              "panoptic_objects": {k: tf.constant(v) for k, v in ex["panoptic_objects"].items()}})
    # What the model is trained to paint for the two parts, decoded and merged.
    pred = task.decode({"semantic": semantic.encode(out["semantic"].numpy()),
                        "instance": instance.encode(out["instance"].numpy())})
    ids = _ids(rgb)
    pairs.append((ids, segments, pred["ids"], pred["segments"]))
  result = metrics.panoptic_quality(pairs, categories)
  assert result["All"]["pq"] == pytest.approx(1.0)
