"""The mixed training stream and the evaluation stream on a tiny synthetic_scenes dataset."""
import hashlib

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from dense_diffusion import input_pipeline as ip
from dense_diffusion import tasks
from dense_diffusion.datasets import readers
from dense_diffusion.datasets import synthetic_scenes

N_TRAIN, N_VAL, RES = 24, 8, 32
CONFIG = synthetic_scenes.SyntheticScenesConfig(
    name="pipeline_test", resolution=RES, num_train=N_TRAIN, num_validation=N_VAL, seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  tfds.builder("synthetic_scenes", config=CONFIG, data_dir=str(path)).download_and_prepare()
  return str(path)


def _entry(task, weight=1.0, flip=True):
  e = readers.synthetic_scenes(task, config="pipeline_test", weight=weight, flip=flip)
  return e


def _train(data_dir, entries, names, batch=16, **kw):
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return ip.get_train_dataset(entries, names, batch, data_dir=data_dir, shuffle_buffer=64, **kw)


def test_mixture_shapes_ranges_and_task_frequencies(data_dir):
  names = ["depth", "semantic", "denoise"]
  weights = np.array([2.0, 1.0, 1.0])
  ds = _train(data_dir, [_entry(t, w) for t, w in zip(names, weights)], names, seed=0)
  counts = np.zeros(3)
  n_batches = 40
  for i, b in enumerate(tfds.as_numpy(ds.take(n_batches))):
    assert b["image"].shape == (16, RES, RES, 3) and b["image"].dtype == np.float32
    assert b["target"].shape == (16, RES, RES, 3) and b["target"].dtype == np.float32
    assert b["task"].shape == (16,) and b["task"].dtype == np.int32
    assert b["image"].min() >= -1 and b["image"].max() <= 1
    assert b["target"].min() >= -1 and b["target"].max() <= 1
    counts += np.bincount(b["task"], minlength=3)
    if i == 0:
      for row in range(16):  # every target decodes as its task's answer
        name = names[b["task"][row]]
        if name == "semantic":
          assert set(np.unique(tasks.get("semantic", num_classes=7).decode(b["target"][row]))) \
              <= set(range(7))
        if name == "depth":
          d = tasks.get("depth", max_depth=readers.SYNTHETIC_MAX_DEPTH).decode(b["target"][row])
          assert 0.5 < d.min() and d.max() < readers.SYNTHETIC_MAX_DEPTH
  n = counts.sum()
  p = weights / weights.sum()
  bound = 4.5 * np.sqrt(n * p * (1 - p))  # binomial, ~1e-5 two-sided per task
  assert np.all(np.abs(counts - n * p) <= bound), (counts, n * p, bound)


def test_deterministic_for_a_seed(data_dir):
  names = ["depth", "normals"]
  entries = [_entry("depth"), _entry("normals")]
  a = [b for b in tfds.as_numpy(_train(data_dir, entries, names, batch=8, seed=5).take(3))]
  b = [b for b in tfds.as_numpy(_train(data_dir, entries, names, batch=8, seed=5).take(3))]
  c = [b for b in tfds.as_numpy(_train(data_dir, entries, names, batch=8, seed=6).take(3))]
  for x, y in zip(a, b):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))


def _hashes(images):
  return {hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images}


def test_two_hosts_read_disjoint_examples(data_dir):
  keys = []
  for host in range(2):
    ds, _ = ip.read_split("synthetic_scenes/pipeline_test", "train", data_dir=data_dir,
                          process_index=host, process_count=2)
    keys.append({ex["key"] for ex in tfds.as_numpy(ds)})
  assert not keys[0] & keys[1]
  assert len(keys[0] | keys[1]) == N_TRAIN and len(keys[0]) == N_TRAIN // 2
  # The training streams (no flip, so an image identifies its example) are disjoint too.
  seen = []
  for host in range(2):
    ds = _train(data_dir, [_entry("depth", flip=False)], ["depth"], batch=4, seed=1,
                process_index=host, process_count=2)
    seen.append(_hashes(np.concatenate([b["image"] for b in tfds.as_numpy(ds.take(6))])))
  assert len(seen[0]) == N_TRAIN // 2 and len(seen[1]) == N_TRAIN // 2  # 24 draws cover 12
  assert not seen[0] & seen[1]


def test_eval_stream_pads_instead_of_dropping(data_dir):
  entry = _entry("semantic")
  ds, n = ip.get_eval_dataset(entry, ["semantic"], 3, data_dir=data_dir, process_index=0,
                              process_count=1)
  batches = list(tfds.as_numpy(ds))
  assert n == 3 and len(batches) == 3
  assert [b["mask"].tolist() for b in batches][-1] == [True, True, False]
  assert sum(int(b["mask"].sum()) for b in batches) == N_VAL
  last = batches[-1]
  assert np.all(last["image"][2] == 0) and last["label/semantic"].shape == (3, RES, RES)
  # Two hosts: same number of batches each, every validation example exactly once.
  images = []
  for host in range(2):
    ds, n = ip.get_eval_dataset(entry, ["semantic"], 3, data_dir=data_dir, process_index=host,
                                process_count=2)
    host_batches = list(tfds.as_numpy(ds))
    assert n == 2 and len(host_batches) == 2
    images.append(np.concatenate([b["image"][b["mask"]] for b in host_batches]))
  assert len(images[0]) + len(images[1]) == N_VAL
  assert not _hashes(images[0]) & _hashes(images[1])


def _mock_lol(good_only=False):
  """A mocked `lol` split: one good pair, one with a size mismatch, one corrupt PNG."""
  def png(a):
    return tf.io.encode_png(a).numpy()
  img = np.full((8, 8, 3), 100, np.uint8)
  rows = [("good", png(img), png(img))]
  if not good_only:
    rows += [("mismatch", png(img), png(img[:6])),
             ("corrupt", b"\x89PNG\r\n\x1a\ntruncated", png(img))]

  def as_dataset_fn(self, split, decoders=None, read_config=None, **kwargs):
    del self, split, kwargs, read_config
    assert decoders and "image" in decoders
    return tf.data.Dataset.from_tensor_slices({
        "image": [r[1] for r in rows], "clean": [r[2] for r in rows],
        "image/filename": [r[0] for r in rows],
        "tfds_id": [f"lol-train.tfrecord-00000-of-00001__{i}" for i in range(len(rows))]})
  return tfds.testing.mock_data(num_examples=len(rows), as_dataset_fn=as_dataset_fn)


def test_bad_examples_fail_with_dataset_split_key(tmp_path):
  entry = readers.get("lol", resolution=4)
  with _mock_lol():
    ds = _train(str(tmp_path), [entry], ["lowlight"], batch=1)
    with pytest.raises(tf.errors.OpError, match=r"'lol' split 'train' key mismatch.*sizes differ"):
      list(tfds.as_numpy(ds.take(3)))


def test_bad_examples_skipped_and_counted(tmp_path):
  ip.reset_bad_examples()
  entry = readers.get("lol", resolution=4)
  with _mock_lol():
    ds, _ = ip.read_split("lol", "train", data_dir=str(tmp_path), process_index=0,
                          process_count=1, on_bad_example="skip")
    kept = [ex["image/filename"] for ex in tfds.as_numpy(ds)]
    train = _train(str(tmp_path), [entry], ["lowlight"], batch=2, on_bad_example="skip")
    batch = next(iter(tfds.as_numpy(train)))
  assert kept == [b"good"]
  bad = ip.bad_examples()[("lol", "train")]
  assert any(b.startswith("mismatch") and "sizes differ" in b for b in bad)
  assert any(b.startswith("corrupt") and "does not decode" in b for b in bad)
  assert batch["image"].shape == (2, 4, 4, 3)


def test_config_errors(data_dir):
  with pytest.raises(ValueError, match="not in the task list"):
    _train(data_dir, [_entry("depth")], ["semantic"])
  with pytest.raises(ValueError, match="on_bad_example"):
    _train(data_dir, [_entry("depth")], ["depth"], on_bad_example="ignore")
  with pytest.raises(ValueError, match="weight"):
    _train(data_dir, [_entry("depth", weight=0.0)], ["depth"])
  with pytest.raises(ValueError, match="unknown keys"):
    _train(data_dir, [{**_entry("depth"), "wieght": 2}], ["depth"])


def test_eval_stream_keeps_panoptic_ground_truth(data_dir):
  from dense_diffusion.datasets.synthetic_scenes import renderer
  ds, _ = ip.get_eval_dataset(_entry("instance"), ["instance"], 4, data_dir=data_dir,
                              process_index=0, process_count=1)
  b = next(iter(tfds.as_numpy(ds)))
  task = tasks.get("panoptic", categories=renderer.CATEGORIES)
  for row in range(4):
    n = int(b["label/segment_id_shape"][row, 0])
    segments = [{"id": int(i), "category_id": int(c), "iscrowd": int(z)} for i, c, z in zip(
        b["label/segment_id"][row, :n], b["label/category_id"][row, :n],
        b["label/iscrowd"][row, :n])]
    semantic, instance = task.split(b["label/panoptic_ids"][row], segments)
    np.testing.assert_array_equal(instance, b["label/instance"][row])
    # The target is the instance encoding of that ground truth.
    np.testing.assert_allclose(b["target"][row], tasks.get("instance").encode(instance))
    assert semantic.max() < renderer.NUM_CLASSES


def test_configdict_entries(data_dir):
  import ml_collections
  entries = [ml_collections.ConfigDict(_entry("normals")), ml_collections.ConfigDict(
      _entry("lowlight"))]
  b = next(iter(tfds.as_numpy(_train(data_dir, entries, ["lowlight", "normals"], batch=8))))
  assert b["target"].shape == (8, RES, RES, 3)
  normals_rows = b["task"] == 1
  if normals_rows.any():  # normals targets are unit vectors (flipped ones too)
    np.testing.assert_allclose(np.linalg.norm(b["target"][normals_rows], axis=-1), 1.0, atol=1e-5)
