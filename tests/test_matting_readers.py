"""The P3M-10k, AM-2k and DIS5K folder builders and their reader entries, on tiny trees made
here in the releases' layouts (image JPEGs beside 8-bit label PNGs of the same stems)."""
import os
import pathlib
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dense_diffusion import input_pipeline as ip
from dense_diffusion import tasks
from dense_diffusion.datasets import common
from dense_diffusion.datasets import eval_tfds
from dense_diffusion.datasets import readers
import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def _tree(root, folders, *, label_kind, n=2, rgb_label=False):
  """Writes n pairs into every (image folder, label folder); returns {(label folder, stem):
  label u8[H, W]}."""
  labels = {}
  for k, (images, label_dir) in enumerate(folders):
    for i in range(n):
      stem = f"img{k}{i}"  # folder k, pair i
      h, w = 18 + 2 * i + k, 24 - i
      _save(root / images / f"{stem}.jpg", RNG.integers(0, 256, (h, w, 3), np.uint8))
      if label_kind == "alpha":
        label = RNG.integers(0, 256, (h, w), np.uint8)
        label[:, :4] = 0  # constant edges, which survive resizing
        label[:, -4:] = 255
      else:
        label = np.where(RNG.uniform(size=(h, w)) > 0.6, 255, 0).astype(np.uint8)
      _save(root / label_dir / f"{stem}.png",
            np.repeat(label[..., None], 3, -1) if rgb_label else label)
      labels[(label_dir, stem)] = label
  return labels


def _prepare(name, manual, data_dir, **kwargs):
  builder = tfds.builder(name, data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
  return builder


def _labels_of(name, split, key, data_dir):
  ds, _ = ip.read_split(name, split, data_dir=str(data_dir), process_index=0, process_count=1)
  return {ex["image/filename"].decode()[:-4]: (ex["image"], ex[key][..., 0])
          for ex in tfds.as_numpy(ds)}


P3M_FOLDERS = [("P3M-10k/train/blurred_image", "P3M-10k/train/mask"),
               ("P3M-10k/validation/P3M-500-P/blurred_image", "P3M-10k/validation/P3M-500-P/mask"),
               ("P3M-10k/validation/P3M-500-NP/original_image",
                "P3M-10k/validation/P3M-500-NP/mask")]


def test_p3m10k_splits_labels_and_the_matte_entry(tmp_path):
  labels = _tree(tmp_path / "raw", P3M_FOLDERS, label_kind="alpha")
  builder = _prepare("p3m10k", tmp_path / "raw", tmp_path / "data")
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      "train": 2, "p3m_500_p": 2, "p3m_500_np": 2}
  got = _labels_of("p3m10k", "p3m_500_np", "alpha", tmp_path / "data")
  for (folder, stem), label in labels.items():
    if "P3M-500-NP" in folder:
      image, alpha = got[stem]
      np.testing.assert_array_equal(alpha, label)
      assert image.shape == (*label.shape, 3)
  # Training: the matte resized with the image and read in [0, 1] by the task.
  entry = readers.get("p3m10k", resolution=8)
  batch = next(iter(tfds.as_numpy(ip.get_train_dataset(
      [entry], ["alpha_matte"], 2, data_dir=str(tmp_path / "data"), process_index=0,
      process_count=1, shuffle_buffer=2))))
  assert batch["image"].shape == (2, 8, 8, 3) and batch["target"].shape == (2, 8, 8, 3)
  alpha = tasks.get("alpha_matte").decode(batch["target"])
  # The first 4 columns are 0 and the last 4 are 1 in every matte: the edges of the 8-pixel
  # resize keep them (or swap them, flipped).
  edges = np.stack([alpha[:, :, 0], alpha[:, :, -1]], -1)
  assert np.all(np.isin(np.round(edges, 5), [0.0, 1.0])) and batch["valid"].all()
  # Evaluation: the raw 8-bit matte at full resolution is the ground truth.
  examples = list(eval_tfds.examples(entry, tasks.get("alpha_matte"),
                                     data_dir=str(tmp_path / "data")))
  raw = {l.shape: l for (f, _), l in labels.items() if "P3M-500-NP" in f}
  assert len(examples) == 2
  for ex in examples:
    np.testing.assert_array_equal(ex.truth, raw[ex.truth.shape])
    assert ex.image.shape[:2] == ex.truth.shape


def test_am2k_reads_grey_saved_as_rgb(tmp_path):
  folders = [("AM-2k/train/original", "AM-2k/train/mask"),
             ("AM-2k/validation/original", "AM-2k/validation/mask")]
  labels = _tree(tmp_path / "raw", folders, label_kind="alpha", rgb_label=True)
  # The manual directory may also be the dataset's own top folder.
  builder = _prepare("am2k", tmp_path / "raw" / "AM-2k", tmp_path / "data")
  assert builder.info.splits["validation"].num_examples == 2
  got = _labels_of("am2k", "validation", "alpha", tmp_path / "data")
  for (folder, stem), label in labels.items():
    if "validation" in folder:
      np.testing.assert_array_equal(got[stem][1], label)
  assert readers.get("am2k")["task"] == "alpha_matte"


DIS_FOLDERS = [(f"DIS5K/{s}/im", f"DIS5K/{s}/gt")
               for s in ("DIS-TR", "DIS-VD", "DIS-TE1", "DIS-TE2", "DIS-TE3", "DIS-TE4")]


def test_dis5k_prepare_command_splits_and_the_mask_entry(tmp_path):
  labels = _tree(tmp_path / "raw", DIS_FOLDERS, label_kind="mask", n=1)
  # The command of data/README.md.
  cmd = [sys.executable, "data/prepare.py", "dis5k", f"--manual_dir={tmp_path / 'raw'}",
         f"--data_dir={tmp_path / 'data'}"]
  env = dict(os.environ, PYTHONPATH=str(REPO))  # this checkout's package, wherever it is
  proc = subprocess_env.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for split in ("train", "validation", "test1", "test2", "test3", "test4"):
    assert f" {split}: 1 examples" in proc.stdout
  got = _labels_of("dis5k", "test3", "mask", tmp_path / "data")
  ((stem, (image, mask)),) = got.items()
  np.testing.assert_array_equal(mask, labels[("DIS5K/DIS-TE3/gt", stem)])
  # The entry: a nearest-resized mask, foreground above 128; evaluation on any DIS split.
  entry = readers.get("dis5k", resolution=8, eval_split="test3")
  (ex,) = eval_tfds.examples(entry, tasks.get("dichotomous"), data_dir=str(tmp_path / "data"))
  np.testing.assert_array_equal(ex.truth, mask)
  train = next(iter(tfds.as_numpy(ip.get_train_dataset(
      [entry], ["dichotomous"], 1, data_dir=str(tmp_path / "data"), process_index=0,
      process_count=1, shuffle_buffer=1))))
  assert set(np.unique(train["target"])) <= {-1.0, 1.0}


def test_dis5k_unpaired_and_bad_examples(tmp_path):
  labels = _tree(tmp_path / "raw", DIS_FOLDERS[:2], label_kind="mask", n=2)
  (_, stem) = next(k for k in labels if "DIS-VD" in k[0])
  # A label of another size: stops the build, or is skipped.
  _save(tmp_path / "raw" / "DIS5K" / "DIS-VD" / "gt" / f"{stem}.png",
        np.zeros((5, 5), np.uint8))
  with pytest.raises(common.BadExampleError, match=rf"'dis5k' split 'validation' key '{stem}'"):
    _prepare("dis5k", tmp_path / "raw", tmp_path / "data")
  builder = _prepare("dis5k", tmp_path / "raw", tmp_path / "data2", on_bad_example="skip")
  assert builder.info.splits["validation"].num_examples == 1
  # An image without its mask names the file.
  (tmp_path / "raw" / "DIS5K" / "DIS-TR" / "gt" / "img00.png").unlink()
  with pytest.raises(ValueError, match="unpaired files.*img00"):
    _prepare("dis5k", tmp_path / "raw", tmp_path / "data3")
  # A 16-bit label is refused with its name.
  (tmp_path / "raw" / "DIS5K" / "DIS-TR" / "im" / "img00.jpg").unlink()
  Image.fromarray(np.zeros((20, 23), np.uint16)).save(
      tmp_path / "raw" / "DIS5K" / "DIS-TR" / "gt" / "img01.png")
  with pytest.raises(common.BadExampleError, match="img01.*expected an 8-bit label"):
    _prepare("dis5k", tmp_path / "raw", tmp_path / "data4")
