"""The RefCOCO / RefCOCO+ / RefCOCOg builder (datasets/refcoco) on a tiny tree in the refer
toolkit's layout made here (COCO JPEGs, instances.json with polygon and RLE segmentations, a
pickled refs list), and its COCO mask decoding against references written out here."""
import json
import pickle

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import dense_diffusion.datasets  # noqa: F401  (registers the builders)
from dense_diffusion.datasets.refcoco import masks

RNG = np.random.default_rng(0)


def _inside_triangle(px, py, tri):
  """Barycentric point-in-triangle test (a reference independent of the even-odd scan)."""
  (x1, y1), (x2, y2), (x3, y3) = tri
  d = (y2 - y3) * (x1 - x3) + (x3 - x2) * (y1 - y3)
  a = ((y2 - y3) * (px - x3) + (x3 - x2) * (py - y3)) / d
  b = ((y3 - y1) * (px - x3) + (x1 - x3) * (py - y3)) / d
  return a > 0 and b > 0 and 1 - a - b > 0


def _reference_polygon_mask(polys, h, w):
  """Pixel centres inside any rectangle / triangle, tested one by one."""
  out = np.zeros((h, w), bool)
  for poly in polys:
    pts = list(zip(poly[0::2], poly[1::2]))
    for r in range(h):
      for c in range(w):
        x, y = c + 0.5, r + 0.5
        if len(pts) == 3:
          out[r, c] |= _inside_triangle(x, y, pts)
        else:  # axis-aligned rectangle
          xs, ys = [p[0] for p in pts], [p[1] for p in pts]
          out[r, c] |= min(xs) < x < max(xs) and min(ys) < y < max(ys)
  return out


def _compress(counts):
  """COCO's compressed RLE string of run lengths, written from its specification."""
  out = []
  for i, x in enumerate(counts):
    if i > 2:
      x -= counts[i - 2]
    more = True
    while more:
      c = x & 0x1F
      x >>= 5
      more = (x != -1) if c & 0x10 else (x != 0)
      out.append(chr(c + 48 + (0x20 if more else 0)))
  return "".join(out)


def _column_major_counts(mask):
  flat = mask.T.reshape(-1)
  counts, value, run = [], False, 0
  for v in flat:
    if v == value:
      run += 1
    else:
      counts.append(run)
      value, run = v, 1
  counts.append(run)
  return counts


def test_polygons_and_rle_decode_like_the_references():
  tri = [1.2, 0.7, 13.9, 4.1, 3.3, 11.6]
  rect = [2, 3, 8, 3, 8, 7, 2, 7]  # pixels cols 2..7, rows 3..6 (centres inside)
  got = masks.polygons_to_mask([tri, rect], 12, 15)
  np.testing.assert_array_equal(got, _reference_polygon_mask([tri, rect], 12, 15))
  assert masks.polygons_to_mask([rect], 12, 15).sum() == 24
  blob = RNG.uniform(size=(9, 7)) > 0.5
  counts = _column_major_counts(blob)
  for encoded in (counts, _compress(counts)):
    np.testing.assert_array_equal(masks.rle_to_mask({"size": [9, 7], "counts": encoded}), blob)
  with pytest.raises(ValueError, match="counts sum"):
    masks.rle_to_mask({"size": [9, 8], "counts": counts})


# The tiny tree: three images, four annotations (one an RLE), refs over all four UNC splits.
IMAGES = {1: (20, 24), 2: (16, 18), 3: (18, 22)}  # image_id: (h, w)
ANNS = {  # ann_id: (image_id, segmentation)
    10: (1, [[2, 3, 12, 3, 12, 11, 2, 11]]),
    11: (1, [[14.5, 2.2, 22.7, 6.1, 16.3, 17.8]]),
    20: (2, [[1, 1, 5, 1, 5, 6, 1, 6], [9.4, 8.2, 16.8, 9.9, 11.1, 15.3]]),  # two parts
    30: (3, None),  # an RLE, filled in below
}
RLE_MASK = np.zeros((18, 22), bool)
RLE_MASK[4:9, 3:15] = True
REFS = [  # ref_id, ann_id, split, sentences
    (100, 10, "train", ["the box on the left", "left box"]),
    (101, 11, "train", ["triangle"]),
    (102, 20, "val", ["the two things"]),
    (103, 30, "testA", ["a wide band", "the band"]),
    (104, 11, "testB", ["the triangle on the right"]),
]


def _coco_name(image_id):
  return f"COCO_train2014_{image_id:012d}.jpg"


def _write_tree(root, folder="refcoco", split_by="unc", splits=None):
  images = root / "images" / "mscoco" / "images" / "train2014"  # LAVT's layout
  images.mkdir(parents=True, exist_ok=True)
  for image_id, (h, w) in IMAGES.items():
    Image.fromarray(RNG.integers(0, 256, (h, w, 3), np.uint8)).save(images / _coco_name(image_id))
  annotations = []
  for ann_id, (image_id, seg) in ANNS.items():
    if seg is None:
      seg = {"size": list(RLE_MASK.shape), "counts": _column_major_counts(RLE_MASK)}
    annotations.append({"id": ann_id, "image_id": image_id, "category_id": 1,
                        "segmentation": seg, "bbox": [0, 0, 1, 1], "area": 1.0,
                        "iscrowd": int(isinstance(seg, dict))})
  instances = {"images": [{"id": i, "file_name": _coco_name(i), "height": h, "width": w}
                          for i, (h, w) in IMAGES.items()],
               "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}
  refs, sent_id = [], 1000
  for ref_id, ann_id, split, sents in REFS:
    image_id = ANNS[ann_id][0]
    sentences = []
    for s in sents:
      sentences.append({"sent": s, "raw": s.upper(), "tokens": s.split(), "sent_id": sent_id})
      sent_id += 1
    refs.append({"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id,
                 "category_id": 1, "split": (splits or {}).get(split, split),
                 "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg",
                 "sent_ids": [s["sent_id"] for s in sentences], "sentences": sentences})
  (root / folder).mkdir(parents=True, exist_ok=True)
  (root / folder / "instances.json").write_text(json.dumps(instances))
  with open(root / folder / f"refs({split_by}).p", "wb") as f:
    pickle.dump(refs, f, protocol=2)


def _expected_mask(ann_id):
  image_id, seg = ANNS[ann_id]
  h, w = IMAGES[image_id]
  return RLE_MASK if seg is None else _reference_polygon_mask(seg, h, w)


def test_refcoco_unc_examples_masks_and_splits(tmp_path):
  _write_tree(tmp_path / "raw")
  builder = tfds.builder("refcoco/refcoco_unc", data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "raw")))
  # One example per sentence.
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      "train": 3, "val": 1, "testA": 2, "testB": 1}
  by_ref = {r[0]: r for r in REFS}
  seen = set()
  for split in ("train", "val", "testA", "testB"):
    for ex in tfds.as_numpy(builder.as_dataset(split=split)):
      ref_id, ann_id, ref_split, sents = by_ref[int(ex["ref_id"])]
      assert ref_split == split and int(ex["ann_id"]) == ann_id
      image_id = ANNS[ann_id][0]
      assert int(ex["image_id"]) == image_id and int(ex["category_id"]) == 1
      assert ex["image/filename"].decode() == _coco_name(image_id)
      assert ex["image"].shape == (*IMAGES[image_id], 3)
      assert set(np.unique(ex["mask"])) <= {0, 255}
      np.testing.assert_array_equal(ex["mask"][..., 0] == 255, _expected_mask(ann_id))
      prompt = ex["prompt"].decode()
      assert prompt in sents
      seen.add((ref_id, prompt, int(ex["sent_id"])))
  assert len(seen) == 7  # every sentence once, with its own sent_id


def test_refcocog_umd_splits_and_missing_files(tmp_path):
  _write_tree(tmp_path / "raw", folder="refcocog", split_by="umd",
              splits={"testA": "test", "testB": "test"})
  builder = tfds.builder("refcoco/refcocog_umd", data_dir=str(tmp_path / "data"))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "raw")))
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      "train": 3, "val": 1, "test": 3}
  # RefCOCO+ is not in this tree: the error names the missing refs file.
  with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p"):
    tfds.builder("refcoco/refcoco+_unc", data_dir=str(tmp_path / "data")).download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "raw")))
