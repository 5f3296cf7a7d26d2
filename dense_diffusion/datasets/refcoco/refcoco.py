"""RefCOCO, RefCOCO+ and RefCOCOg (referring image segmentation) over COCO train2014 and the refer
toolkit's annotation files (Yu et al. 2016, Mao et al. 2016; the files LAVT, CRIS and VPD read).

Manual directory (the refer toolkit's `data/` folder, with the COCO images beside it):

    train2014/COCO_train2014_*.jpg        (or images/train2014, images/mscoco/images/train2014)
    refcoco/instances.json, refcoco/refs(unc).p
    refcoco+/instances.json, refcoco+/refs(unc).p
    refcocog/instances.json, refcocog/refs(umd).p

Configs and their splits:

    refcoco_unc     RefCOCO, UNC split      train, val, testA, testB
    refcoco+_unc    RefCOCO+, UNC split     train, val, testA, testB
    refcocog_umd    RefCOCOg, UMD split     train, val, test

`refs(...).p` is a pickled list of refs, one per referred object: {ref_id, ann_id, image_id,
category_id, split, file_name, sent_ids, sentences: [{sent_id, sent, raw, tokens}]};
`instances.json` is COCO's format restricted to those images: images [{id, file_name, height,
width}], annotations [{id, image_id, category_id, segmentation, bbox, area, iscrowd}],
categories. A ref's `file_name` names the image *and* the annotation (`..._<ann_id>.jpg`); the
image's file is the one `instances.json` gives.

One example per sentence (the papers evaluate every expression): key `<ref_id>_<sent_id>`;
features `image` (the COCO JPEG as it is), `mask` u8[H, W, 1] (255 on the referred object,
rasterised from its COCO segmentation, datasets/refcoco/masks.py), `prompt` (the expression,
`sent`), `ref_id`, `ann_id`, `image_id`, `sent_id`, `category_id`, `image/filename`.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import pickle

import numpy as np
import tensorflow_datasets as tfds

from dense_diffusion.datasets import common
from dense_diffusion.datasets.refcoco import masks

# Where the COCO train2014 images may be, relative to the manual directory (the first found).
IMAGE_FOLDERS = ("train2014", "images/train2014", "images/mscoco/images/train2014",
                 "images/mscoco/train2014")
MASK_VALUE = 255  # the referred object in the stored mask (0 elsewhere).


@dataclasses.dataclass
class RefCocoConfig(tfds.core.BuilderConfig):
  """One dataset and its split scheme: the folder and the refs file the toolkit names."""
  folder: str = ""  # refcoco, refcoco+, refcocog
  split_by: str = ""  # unc, umd
  splits: tuple[str, ...] = ()


class RefCoco(tfds.core.GeneratorBasedBuilder):
  """RefCOCO / RefCOCO+ / RefCOCOg: image, the referred object's mask, one expression."""

  name = "refcoco"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      RefCocoConfig(name="refcoco_unc", description="RefCOCO, UNC split", folder="refcoco",
                    split_by="unc", splits=("train", "val", "testA", "testB")),
      RefCocoConfig(name="refcoco+_unc", description="RefCOCO+, UNC split", folder="refcoco+",
                    split_by="unc", splits=("train", "val", "testA", "testB")),
      RefCocoConfig(name="refcocog_umd", description="RefCOCOg, UMD split", folder="refcocog",
                    split_by="umd", splits=("train", "val", "test")),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put COCO's train2014 images (https://cocodataset.org, train2014.zip) in <manual_dir>/train2014
  and the refer toolkit's annotation folders (https://github.com/lichengunc/refer: refcoco.zip,
  refcoco+.zip, refcocog.zip) beside it: <manual_dir>/refcoco/refs(unc).p and instances.json,
  likewise refcoco+ (refs(unc).p) and refcocog (refs(umd).p).
  """

  def __init__(self, *, on_bad_example: str = "fail", **kwargs):
    self._validator = common.ExampleValidator("refcoco", on_bad_example)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        "prompt": tfds.features.Text(),
        "ref_id": np.int64,
        "ann_id": np.int64,
        "image_id": np.int64,
        "sent_id": np.int64,
        "category_id": np.int64,
        "image/filename": tfds.features.Text(),
    })
    return self.dataset_info_from_configs(
        description=__doc__, features=features, homepage="https://github.com/lichengunc/refer")

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    config = self.builder_config
    images = next((os.path.join(root, f) for f in IMAGE_FOLDERS
                   if os.path.isdir(os.path.join(root, f))), None)
    if images is None:
      raise FileNotFoundError(f"no COCO train2014 image folder ({', '.join(IMAGE_FOLDERS)}) in "
                              f"{root} (see data/README.md)")
    folder = os.path.join(root, config.folder)
    refs_path = os.path.join(folder, f"refs({config.split_by}).p")
    instances_path = os.path.join(folder, "instances.json")
    for path in (refs_path, instances_path):
      if not os.path.exists(path):
        raise FileNotFoundError(f"{config.name}: {path} is missing (the refer toolkit's "
                                f"{config.folder}.zip; see data/README.md)")
    with open(refs_path, "rb") as f:
      refs = pickle.load(f)
    with open(instances_path) as f:
      instances = json.load(f)
    by_split = collections.defaultdict(list)
    for ref in refs:
      by_split[ref["split"]].append(ref)
    unknown = sorted(set(by_split) - set(config.splits))
    if unknown:
      raise ValueError(f"{refs_path}: splits {unknown} are not those of {config.name} "
                       f"({', '.join(config.splits)})")
    index = _Index(instances, images)
    return {split: self._generate_examples(split, by_split[split], index)
            for split in config.splits if by_split[split]}

  def _generate_examples(self, split, refs, index):
    for ref in refs:
      image_info = index.images.get(ref["image_id"])
      ann = index.annotations.get(ref["ann_id"])
      ref_key = f"ref {ref['ref_id']}"
      if image_info is None or ann is None:
        what = "image" if image_info is None else "annotation"
        self._validator.reject(split, ref_key, f"its {what} is not in instances.json")
        continue
      path = os.path.join(index.image_folder, image_info["file_name"])
      if not os.path.exists(path):
        self._validator.reject(split, ref_key, f"{path} is missing")
        continue
      h, w = int(image_info["height"]), int(image_info["width"])
      mask = masks.segmentation_to_mask(ann["segmentation"], h, w)
      mask = (mask * MASK_VALUE).astype(np.uint8)[..., None]
      if not self._validator.ok(split, ref_key, [path, mask]):
        continue
      for sentence in ref["sentences"]:
        yield f"{ref['ref_id']}_{sentence['sent_id']}", {
            "image": path, "mask": mask, "prompt": sentence["sent"],
            "ref_id": ref["ref_id"], "ann_id": ref["ann_id"], "image_id": ref["image_id"],
            "sent_id": sentence["sent_id"], "category_id": ref["category_id"],
            "image/filename": image_info["file_name"]}


class _Index:
  """instances.json's images and annotations by id, and the image folder."""

  def __init__(self, instances: dict, image_folder: str):
    self.images = {im["id"]: im for im in instances["images"]}
    self.annotations = {a["id"]: a for a in instances["annotations"]}
    self.image_folder = image_folder
