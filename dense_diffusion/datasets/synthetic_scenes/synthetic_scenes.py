"""TFDS builder `synthetic_scenes`: procedurally rendered rooms with exact dense labels.

Needs no download. Each example is rendered by `renderer.render_scene` from the seed
(config.seed, split id, index), so a dataset is identical wherever and whenever it is built.

    import dense_diffusion.datasets  # registers the builders
    ds = tfds.load("synthetic_scenes/res64", split="train", data_dir=...)
"""
from __future__ import annotations

import dataclasses
import io
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds

from dense_diffusion.datasets.synthetic_scenes import renderer

_SPLIT_IDS = {"train": 0, "validation": 1}
_IMAGE_KEYS = ("image", "albedo", "noisy", "rainy", "dark", "composite")


@dataclasses.dataclass
class SyntheticScenesConfig(tfds.core.BuilderConfig):
  """Resolution R (R x R images), number of train / validation examples and the base seed."""
  resolution: int = 64
  num_train: int = 2000
  num_validation: int = 200
  seed: int = 0
  # Rendering processes: 0 = one per CPU core when generating >= 256 examples, 1 = in-process.
  # Examples are rendered from their own seeds and written in index order, so the dataset is
  # the same for any number of workers.
  num_workers: int = 0


def _config(name, resolution, num_train, num_validation, description):
  return SyntheticScenesConfig(name=name, resolution=resolution, num_train=num_train,
                               num_validation=num_validation, description=description)


class SyntheticScenes(tfds.core.GeneratorBasedBuilder):
  """Synthetic rooms: image, depth, normals, semantic, panoptic, albedo/shading, degraded inputs,
  and a composite with a foreground object's alpha matte and mask."""

  # A new version whenever the features change (TFDS keeps each version in its own folder, so a
  # prepared older version is regenerated, never read with the wrong features).
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "First release.",
      "1.1.0": "composite, alpha, mask: a foreground object with an exact soft alpha over the "
               "scene (matting, dichotomous segmentation); the other features are unchanged.",
  }
  BUILDER_CONFIGS = [
      _config("res32", 32, 512, 64, "32x32 for the offline demo and tests."),
      _config("res64", 64, 2000, 200, "64x64."),
      _config("res128", 128, 2000, 200, "128x128, the generalist's training resolution."),
      _config("res128_large", 128, 20000, 500, "128x128, 20k training examples."),
      _config("tiny32", 32, 16, 8, "16 + 8 examples at 32x32 for unit tests."),
  ]
  DEFAULT_CONFIG_NAME = "res64"

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    zlib = tfds.features.Encoding.ZLIB
    rgb = lambda: tfds.features.Image(shape=(r, r, 3), dtype=np.uint8, encoding_format="png")
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": rgb(),
            "albedo": rgb(),
            "shading": tfds.features.Tensor(shape=(r, r), dtype=np.float32, encoding=zlib),
            "depth": tfds.features.Tensor(shape=(r, r), dtype=np.float32, encoding=zlib),
            "normals": tfds.features.Tensor(shape=(r, r, 3), dtype=np.float32, encoding=zlib),
            "semantic": tfds.features.Tensor(shape=(r, r), dtype=np.int32, encoding=zlib),
            "instance": tfds.features.Tensor(shape=(r, r), dtype=np.int32, encoding=zlib),
            "panoptic": tfds.features.FeaturesDict({
                "ids": tfds.features.Tensor(shape=(r, r), dtype=np.int32, encoding=zlib),
                "segments": tfds.features.Sequence({
                    "id": np.int32, "category_id": np.int32, "isthing": np.bool_,
                    "iscrowd": np.bool_}),
            }),
            "noisy": rgb(),
            "rainy": rgb(),
            "dark": rgb(),
            "composite": rgb(),
            "alpha": tfds.features.Tensor(shape=(r, r), dtype=np.float32, encoding=zlib),
            "mask": tfds.features.Tensor(shape=(r, r), dtype=np.bool_, encoding=zlib),
            "intrinsics": tfds.features.Tensor(shape=(3,), dtype=np.float32),
            "key": tfds.features.Text(),
        }),
        supervised_keys=None,
        homepage="https://github.com/dense-diffusion (built in)",
        metadata=tfds.core.MetadataDict(
            categories=[dict(c) for c in renderer.CATEGORIES],
            class_names=list(renderer.CLASS_NAMES)),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    sizes = {"train": cfg.num_train, "validation": cfg.num_validation}
    return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

  def _generate_examples(self, split, num_examples):
    cfg = self.builder_config
    seeds = [(cfg.seed, _SPLIT_IDS[split], index) for index in range(num_examples)]
    workers = cfg.num_workers or (os.cpu_count() or 1 if num_examples >= 256 else 1)
    render = _Render(cfg.resolution)
    if workers > 1 and "forkserver" in multiprocessing.get_all_start_methods():
      with _worker_context().Pool(workers) as pool:
        for index, ex in enumerate(pool.imap(render, seeds, chunksize=16)):
          yield _key(split, index), _wrap_png(ex)
    else:
      for index, seed in enumerate(seeds):
        yield _key(split, index), _wrap_png(render(seed))


def _worker_context():
  """multiprocessing context of the rendering workers: forkserver, preloaded with this module.

  Not fork: a forked child inherits the parent's locks as its other threads held them, and by
  the time a dataset is prepared the parent may run gRPC threads (`jax.distributed`'s client;
  a forked worker deadlocked in the two-process test) or TensorFlow's. The fork server is a
  fresh interpreter that imports this module once; each worker is a cheap fork of it.
  """
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload([__name__])
  return ctx


def _wrap_png(ex: dict) -> dict:
  """PNG bytes -> file objects, which TFDS stores as they are (no re-encoding)."""
  return {k: io.BytesIO(v) if k in _IMAGE_KEYS else v for k, v in ex.items()}


def _png(array: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()


def _key(split: str, index: int) -> str:
  return f"{split}_{index:06d}"


class _Render:
  """Picklable callable: seed (seed, split id, index) -> builder example."""

  def __init__(self, resolution: int):
    self.resolution = resolution

  def __call__(self, seed):
    """Renders, and PNG-encodes the images here (in the worker, in parallel)."""
    ex = example_from_render(renderer.render_scene(seed, self.resolution),
                             key=_key({v: k for k, v in _SPLIT_IDS.items()}[seed[1]], seed[2]))
    return {k: _png(v) if k in _IMAGE_KEYS else v for k, v in ex.items()}


def example_from_render(ex: dict, key: str) -> dict:
  """Maps a `render_scene` dict to the builder's features."""
  return {
      "image": ex["image"], "albedo": ex["albedo"], "shading": ex["shading"],
      "depth": ex["depth"], "normals": ex["normals"], "semantic": ex["semantic"],
      "instance": ex["instance"],
      "panoptic": {
          "ids": ex["panoptic_ids"],
          "segments": {
              "id": np.array([s["id"] for s in ex["segments"]], np.int32),
              "category_id": np.array([s["category_id"] for s in ex["segments"]], np.int32),
              "isthing": np.array([bool(s["isthing"]) for s in ex["segments"]]),
              "iscrowd": np.array([bool(s["iscrowd"]) for s in ex["segments"]]),
          }},
      "noisy": ex["noisy"], "rainy": ex["rainy"], "dark": ex["dark"],
      "composite": ex["composite"], "alpha": ex["alpha"], "mask": ex["mask"],
      "intrinsics": ex["intrinsics"], "key": key,
  }
