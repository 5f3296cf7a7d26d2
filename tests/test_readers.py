"""Readers of the real datasets on tiny trees / mocked TFDS data, through the input pipeline."""
import json
import os
import pathlib
import sys

import numpy as np
import pytest
import scipy.io
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from dense_diffusion import input_pipeline as ip
from dense_diffusion import tasks
from dense_diffusion.datasets import common
from dense_diffusion.datasets import readers
import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _rgb(h, w):
  return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _prepare(name, manual_dir, data_dir, **kwargs):
  builder = tfds.builder(name, data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _read_all(name, split, data_dir):
  ds, _ = ip.read_split(name, split, data_dir=str(data_dir), process_index=0, process_count=1)
  return {os.path.splitext(ex["image/filename"].decode())[0]: ex for ex in tfds.as_numpy(ds)}


# -- ADE20K --
def _ade_tree(root, n_train=3, n_val=2, bad=None):
  files = {}
  for folder, n in (("training", n_train), ("validation", n_val)):
    for i in range(n):
      stem = f"ADE_{folder[:3]}_{i:08d}"
      h, w = 20 + 2 * i, 24
      label = RNG.integers(0, 151, (h, w), dtype=np.uint8)
      if bad == (folder, i):
        label = label[:-3]
      _save(root / "ADEChallengeData2016" / "images" / folder / f"{stem}.jpg", _rgb(h, w))
      _save(root / "ADEChallengeData2016" / "annotations" / folder / f"{stem}.png", label)
      files[(folder, stem)] = label
  return files


def test_ade20k_prepare_command_and_labels(tmp_path):
  files = _ade_tree(tmp_path / "manual")
  # The exact command of data/README.md.
  cmd = [sys.executable, "data/prepare.py", "ade20k",
         f"--manual_dir={tmp_path / 'manual'}", f"--data_dir={tmp_path / 'data'}"]
  proc = subprocess_env.run(cmd, cwd=REPO, capture_output=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "validation: 2 examples" in proc.stdout
  got = _read_all("ade20k", "validation", tmp_path / "data")
  assert len(got) == 2
  for (folder, stem), label in files.items():
    if folder != "validation":
      continue
    ex = got[stem]
    np.testing.assert_array_equal(ex["semantic"][..., 0], label)
    assert ex["image"].shape[:2] == label.shape
  # The reader's pp: shift to 0..149 / 255 and the semantic encoding.
  entry = readers.get("ade20k", resolution=16)
  assert entry["task"] == "semantic_ade20k"  # ADE20K's own label space.
  ds, n = ip.get_eval_dataset(entry, ["semantic_ade20k"], 4, data_dir=str(tmp_path / "data"),
                              process_index=0, process_count=1)
  batches = list(tfds.as_numpy(ds))
  assert n == 1 and len(batches) == 1
  b = batches[0]
  assert b["mask"].tolist() == [True, True, False, False]
  assert b["image"].shape == (4, 16, 16, 3) and b["target"].shape == (4, 16, 16, 3)
  labels = sorted([lab for (f, _), lab in files.items() if f == "validation"],
                  key=lambda l: l.shape[0])
  for row in range(2):
    h, w = b["label/semantic_shape"][row]
    raw = b["label/semantic"][row, :h, :w]
    src = next(l for l in labels if l.shape == (h, w))
    np.testing.assert_array_equal(raw, np.where(src == 0, 255, src.astype(np.int32) - 1))
    assert np.all(b["label/semantic"][row, h:] == 255)  # padded with ignore
    decoded = tasks.get("semantic_ade20k").decode(b["target"][row])
    assert set(np.unique(decoded)) <= set(np.unique(raw)) | {255}
  # Training targets: ADE20K's "other" (0 -> 255) is unknown, left out of the loss.
  train = next(iter(tfds.as_numpy(ip.get_train_dataset(
      [entry], ["semantic_ade20k"], 2, data_dir=str(tmp_path / "data"), process_index=0,
      process_count=1, shuffle_buffer=4))))
  black = np.all(train["target"] == -1.0, axis=-1)  # the ignore colour
  np.testing.assert_array_equal(train["valid"][..., 0], ~black)
  assert black.any() and (~black).any()


def test_ade20k_bad_label_size_fails_or_skips(tmp_path):
  _ade_tree(tmp_path / "manual", n_train=2, n_val=2, bad=("validation", 1))
  with pytest.raises(common.BadExampleError,
                     match=r"'ade20k' split 'validation' key 'ADE_val_00000001'.*sizes differ"):
    _prepare("ade20k", tmp_path / "manual", tmp_path / "data")
  builder = _prepare("ade20k", tmp_path / "manual", tmp_path / "data2", on_bad_example="skip")
  assert builder.info.splits["validation"].num_examples == 1
  assert builder.info.splits["train"].num_examples == 2


# -- Restoration --
def test_sidd_pairs_and_validation_mat(tmp_path):
  manual = tmp_path / "manual"
  pairs = {}
  for scene in ("0001_001_S6_00100_00060_3200_L", "0002_001_S6_00100_00020_3200_N"):
    for k in ("010", "011"):
      noisy, gt = _rgb(18, 22), _rgb(18, 22)
      d = manual / "SIDD_Medium_Srgb" / "Data" / scene
      _save(d / f"{scene[:4]}_NOISY_SRGB_{k}.PNG", noisy)
      _save(d / f"{scene[:4]}_GT_SRGB_{k}.PNG", gt)
      pairs[f"{scene[:4]}_NOISY_SRGB_{k}"] = (noisy, gt)
  noisy_blocks = RNG.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
  gt_blocks = RNG.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
  scipy.io.savemat(manual / "ValidationNoisyBlocksSrgb.mat",
                   {"ValidationNoisyBlocksSrgb": noisy_blocks})
  scipy.io.savemat(manual / "ValidationGtBlocksSrgb.mat", {"ValidationGtBlocksSrgb": gt_blocks})
  _prepare("sidd", manual, tmp_path / "data")
  train = _read_all("sidd", "train", tmp_path / "data")
  assert set(train) == set(pairs)
  for key, (noisy, gt) in pairs.items():
    np.testing.assert_array_equal(train[key]["image"], noisy)
    np.testing.assert_array_equal(train[key]["clean"], gt)
  val = _read_all("sidd", "validation", tmp_path / "data")
  assert len(val) == 6
  np.testing.assert_array_equal(val["01_02"]["image"], noisy_blocks[1, 2])
  np.testing.assert_array_equal(val["01_02"]["clean"], gt_blocks[1, 2])
  # Train pp: joint random crop, target = denoise encoding of the clean crop.
  entry = readers.get("sidd", resolution=8)
  ds = ip.get_train_dataset([entry], ["denoise"], 2, data_dir=str(tmp_path / "data"),
                            process_index=0, process_count=1, seed=1)
  b = next(iter(tfds.as_numpy(ds)))
  assert b["image"].shape == (2, 8, 8, 3) and b["target"].shape == (2, 8, 8, 3)
  assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["target"].min() >= -1


def test_rain_sets_become_splits(tmp_path):
  manual = tmp_path / "manual"
  for folder, n in (("train", 3), ("test/Rain100H", 2), ("test/Test100", 1)):
    for i in range(n):
      _save(manual / folder / "input" / f"{i}.png", _rgb(10, 12))
      _save(manual / folder / "target" / f"{i}.png", _rgb(10, 12))
  builder = _prepare("rain", manual, tmp_path / "data")
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      "train": 3, "rain100h": 2, "test100": 1}
  # An unpaired file is an error, not a silent drop.
  _save(manual / "test" / "Rain100L" / "input" / "5.png", _rgb(10, 12))
  _save(manual / "test" / "Rain100L" / "target" / "6.png", _rgb(10, 12))
  with pytest.raises(ValueError, match="unpaired"):
    _prepare("rain", manual, tmp_path / "data2")


def test_lol_and_corrupt_image(tmp_path):
  manual = tmp_path / "manual"
  for folder, n in (("our485", 3), ("eval15", 2)):
    for i in range(n):
      _save(manual / folder / "low" / f"{i}.png", _rgb(8, 12) // 8)
      _save(manual / folder / "high" / f"{i}.png", _rgb(8, 12))
  builder = _prepare("lol", manual, tmp_path / "data")
  assert builder.info.splits["train"].num_examples == 3
  assert builder.info.splits["validation"].num_examples == 2
  (manual / "eval15" / "high" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
  with pytest.raises(common.BadExampleError, match=r"'lol' split 'validation' key '1'.*decode"):
    _prepare("lol", manual, tmp_path / "data2")


# -- TFDS datasets through mock_data --
def _encode_png(array):
  return tf.io.encode_png(array).numpy()


def test_nyu_depth_v2_mocked(tmp_path):
  n = 3
  depths = []
  for i in range(n):
    d = np.tile(np.linspace(0.5, 9.0, 640, dtype=np.float32), (480, 1)) + 0.1 * i
    d[:10] = 0.0  # invalid rows
    d[150:350, 200:400] = 0.0  # a hole inside the Eigen crop (no sensor return)
    d[-1, -1] = 12.0  # beyond max depth
    depths.append(d.astype(np.float16))
  images = [_rgb(480, 640) for _ in range(n)]

  def as_dataset_fn(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, kwargs
    skip = decoders and "image" in decoders
    ex = {"image": [_encode_png(im) if skip else im for im in images], "depth": depths}
    ds = tf.data.Dataset.from_tensor_slices(ex)
    if read_config and read_config.add_tfds_id:
      ds = ds.enumerate().map(lambda i, e: {**e, "tfds_id": tf.strings.as_string(i)})
    return ds

  entry = readers.get("nyu_depth_v2", resolution=32)
  with tfds.testing.mock_data(num_examples=n, as_dataset_fn=as_dataset_fn):
    ds, _ = ip.get_eval_dataset(entry, ["depth"], 2, data_dir=str(tmp_path),
                                process_index=0, process_count=1)
    batches = list(tfds.as_numpy(ds))
    train = next(iter(tfds.as_numpy(ip.get_train_dataset(
        [entry], ["depth"], 2, data_dir=str(tmp_path), process_index=0, process_count=1))))
  assert [b["mask"].tolist() for b in batches] == [[True, True], [True, False]]
  raw = np.concatenate([b["label/depth"] for b in batches])[:n]
  for i in range(n):
    ref = depths[i].astype(np.float32)
    ref = np.where((ref > 1e-3) & (ref < 10.0), ref, 0.0)
    inside = np.zeros_like(ref, bool)
    inside[45:471, 41:601] = True
    np.testing.assert_array_equal(raw[i], np.where(inside, ref, 0.0))
  assert train["image"].shape == (2, 32, 32, 3) and train["target"].shape == (2, 32, 32, 3)
  # Depth target decodes to metres inside the ramp's range.
  d = tasks.get("depth", max_depth=10.0).decode(train["target"][0])
  assert 0.4 < np.median(d) < 9.5
  # Holes (0 m, and depth beyond max_depth) are unknown pixels: left out of the loss.
  assert train["valid"].shape == (2, 32, 32, 1) and train["valid"].dtype == bool
  assert 0 < train["valid"].mean() < 1
  np.testing.assert_array_equal(train["valid"][..., 0],
                                np.all(train["target"] > -1.0, axis=-1))  # 0 m encodes as -1


def _coco_examples(shared_fixtures):
  root = shared_fixtures / "coco_panoptic_sample"
  meta = json.loads((root / "sample_data" / "panoptic_examples.json").read_text())
  categories = json.loads((root / "panoptic_coco_categories.json").read_text())
  pos = {c["id"]: i for i, c in enumerate(categories)}
  out = []
  for image_info, ann in zip(meta["images"], meta["annotations"]):
    assert image_info["id"] == ann["image_id"]
    segs = ann["segments_info"]
    out.append({
        "image": (root / "sample_data" / "input_images" / image_info["file_name"]).read_bytes(),
        "image/id": image_info["id"],
        "panoptic_image": (root / "sample_data" / "panoptic_examples" / ann["file_name"])
                          .read_bytes(),
        "panoptic_objects": {
            "id": np.array([s["id"] for s in segs], np.int64),
            "label": np.array([pos[s["category_id"]] for s in segs], np.int64),
            "is_crowd": np.array([bool(s["iscrowd"]) for s in segs]),
            "area": np.array([s["area"] for s in segs], np.int64),
            "bbox": np.zeros((len(segs), 4), np.float32)},
        "segments": segs,
    })
  return out, categories


def test_coco_panoptic_mocked_with_real_sample(tmp_path, shared_fixtures):
  examples, categories = _coco_examples(shared_fixtures)

  def as_dataset_fn(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, kwargs
    assert decoders and "image" in decoders and "panoptic_image" in decoders

    def gen():
      for i, ex in enumerate(examples):
        yield {"image": ex["image"], "panoptic_image": ex["panoptic_image"],
               "image/id": ex["image/id"], "panoptic_objects": ex["panoptic_objects"],
               "tfds_id": f"coco-{i}"}
    sig = {"image": tf.TensorSpec([], tf.string), "panoptic_image": tf.TensorSpec([], tf.string),
           "image/id": tf.TensorSpec([], tf.int64), "tfds_id": tf.TensorSpec([], tf.string),
           "panoptic_objects": {"id": tf.TensorSpec([None], tf.int64),
                                "label": tf.TensorSpec([None], tf.int64),
                                "is_crowd": tf.TensorSpec([None], tf.bool),
                                "area": tf.TensorSpec([None], tf.int64),
                                "bbox": tf.TensorSpec([None, 4], tf.float32)}}
    return tf.data.Dataset.from_generator(gen, output_signature=sig)

  entries = readers.get("coco_panoptic", resolution=32)
  assert [e["task"] for e in entries] == ["semantic_coco", "instance"]
  with tfds.testing.mock_data(num_examples=len(examples), as_dataset_fn=as_dataset_fn):
    ds, _ = ip.get_eval_dataset(entries[0], ["semantic_coco", "instance"], 2,
                                data_dir=str(tmp_path),
                                process_index=0, process_count=1)
    batch = next(iter(tfds.as_numpy(ds)))
    train = next(iter(tfds.as_numpy(ip.get_train_dataset(
        entries, ["semantic_coco", "instance"], 4, data_dir=str(tmp_path), process_index=0,
        process_count=1))))
  assert batch["mask"].all()
  for row, ex in enumerate(examples):
    h, w = batch["label/panoptic_ids_shape"][row]
    rgb = np.asarray(Image.open(__import__("io").BytesIO(ex["panoptic_image"]))).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    np.testing.assert_array_equal(batch["label/panoptic_ids"][row, :h, :w], ids)
    n = len(ex["segments"])
    np.testing.assert_array_equal(batch["label/segment_id"][row, :n],
                                  [s["id"] for s in ex["segments"]])
    np.testing.assert_array_equal(batch["label/category_id"][row, :n],
                                  [s["category_id"] for s in ex["segments"]])
    np.testing.assert_array_equal(batch["label/iscrowd"][row, :n],
                                  [s["iscrowd"] for s in ex["segments"]])
  assert train["image"].shape == (4, 32, 32, 3)
  assert set(train["task"].tolist()) <= {0, 1}
  # Void and crowd pixels are unknown for both parts: never trained on.
  assert not train["valid"].all()
  # The semantic task carries COCO's categories, so panoptic can be built from the two parts.
  semantic, instance = (tasks.from_entry(e) for e in entries)
  panoptic = tasks.base.TASKS.get("panoptic").from_parts(
      {"semantic": semantic, "instance": instance})
  assert panoptic is not None and len(panoptic.categories) == 133


def test_unknown_reader_lists_known():
  with pytest.raises(KeyError, match="known readers: .*ade20k.*nyu_depth_v2"):
    readers.get("imagenet")
