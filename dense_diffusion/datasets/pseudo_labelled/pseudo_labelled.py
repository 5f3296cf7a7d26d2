"""TFDS builder `pseudo_labelled`: a folder of images with a teacher's answers as labels (DMP).

`python -m dense_diffusion.main pseudo-label` (dense_diffusion/pseudo_label.py) writes one example
per readable image into a staging folder (`write_example`), then builds
`pseudo_labelled/<NAME>` in its data_dir from that folder (`build`). Each set has its own
tasks and teachers, so its config (`PseudoLabelledConfig`) is made by the command, not listed
here; reading a set back needs only its files (`tfds.builder("pseudo_labelled/NAME",
data_dir=...)` loads it from them, as TFDS does for any config its code does not list).

What is stored (every label at its image's own size, in the format the readers of Hypersim
use, so the same reader entry applies):
- `image`: the image as the teacher saw it (any mode converted to RGB, EXIF orientation
  applied), PNG; `key`: its path relative to the images folder.
- `depth`: float16; metres from a metric teacher, or the teacher's relative depth in [0, 1]
  (near = 0) from an affine-invariant one (Marigold); 0 = unknown.
- `normals`: float16 unit vectors in camera coordinates (x right, y down, z forward).
- `semantic`: PNG class ids 0..K-1 of the teacher's K classes, 255 = unknown.
- `albedo`: PNG RGB.
- `shading`: float16 grey shading (an RGB shading answer is reduced to its brightness).

The metadata (`metadata.json` beside the data) records, per task, the task options the labels
are in (`task_options`: depth's range and whether it is relative, the classes, the shading
scale), the teacher of each task (`teachers`) and the images that could not be read
(`skipped`); `readers.pseudo_labelled` builds its entries from it.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import tempfile
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds

from dense_diffusion import errors
from dense_diffusion import registry

NAME = "pseudo_labelled"
EXAMPLES = "examples"  # the staging folder's subfolder of one .npz per labelled image
# Brightness of an RGB shading answer (CCIR601 YIQ luma, the weights of the hypersim builder).
BRIGHTNESS_WEIGHTS = (0.3, 0.59, 0.11)
IGNORE_LABEL = 255
_ZLIB = tfds.features.Encoding.ZLIB


@dataclasses.dataclass(frozen=True)
class LabelFormat:
  """How one task's answers are stored.

  feature: the TFDS feature of the stored label.
  store: (answer at the image's size, the teacher's task object) -> the array stored.
  options: the teacher's task object -> the task options the stored labels are in.
  png: the feature is a PNG image (encoded with PIL when staged: TFDS's own encoder starts a
    TensorFlow graph, seconds for a small set).
  """
  feature: Callable[[], Any]
  store: Callable[[np.ndarray, Any], np.ndarray]
  options: Callable[[Any], dict]
  png: bool = False


LABELS: registry.Registry[LabelFormat] = registry.Registry("pseudo-label task")


def _float_map(answer, channels: int | None = None) -> np.ndarray:
  a = np.nan_to_num(np.asarray(answer, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
  want = 2 if channels is None else 3
  if a.ndim != want or (channels is not None and a.shape[-1] != channels):
    raise ValueError(f"expected an answer of {'(H, W)' if channels is None else '(H, W, 3)'}, "
                     f"got shape {a.shape}")
  return a


def _depth_options(task) -> dict:
  if task.affine_invariant:  # relative depth in [0, 1]: the clipped ends 0 and 1 are unknown.
    return {"min_depth": 0.0, "max_depth": 1.0, "affine_invariant": True}
  return {"min_depth": float(task.min_depth), "max_depth": float(task.max_depth),
          "affine_invariant": False}


def _store_normals(answer, task):
  del task
  n = _float_map(answer, 3)
  norm = np.linalg.norm(n, axis=-1, keepdims=True)
  return np.where(norm > 1e-6, n / np.maximum(norm, 1e-6), 0.0).astype(np.float16)


def _store_semantic(answer, task):
  labels = np.asarray(answer)
  if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"expected integer class ids (H, W), got {labels.dtype} {labels.shape}")
  known = (labels >= 0) & (labels < task.num_classes)
  return np.where(known, labels, IGNORE_LABEL).astype(np.uint8)[..., None]


def _store_albedo(answer, task):
  del task
  return np.round(np.clip(_float_map(answer, 3), 0.0, 1.0) * 255.0).astype(np.uint8)


def _store_shading(answer, task):
  del task
  a = np.asarray(answer, np.float32)
  if a.ndim == 3 and a.shape[-1] == 3:  # an RGB shading (Marigold's lighting decomposition)
    a = a @ np.asarray(BRIGHTNESS_WEIGHTS, np.float32)
  return np.maximum(_float_map(a), 0.0).astype(np.float16)


LABELS.register("depth", LabelFormat(
    feature=lambda: tfds.features.Tensor(shape=(None, None), dtype=np.float16, encoding=_ZLIB),
    store=lambda a, t: np.maximum(_float_map(a), 0.0).astype(np.float16),
    options=_depth_options))
LABELS.register("normals", LabelFormat(
    feature=lambda: tfds.features.Tensor(shape=(None, None, 3), dtype=np.float16,
                                         encoding=_ZLIB),
    store=_store_normals, options=lambda t: {}))
LABELS.register("semantic", LabelFormat(
    feature=lambda: tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
    store=_store_semantic, png=True,
    options=lambda t: {"num_classes": int(t.num_classes),
                       "categories": [dict(c) for c in t.categories]}))
LABELS.register("albedo", LabelFormat(
    feature=lambda: tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
    store=_store_albedo, options=lambda t: {}, png=True))
LABELS.register("shading", LabelFormat(
    feature=lambda: tfds.features.Tensor(shape=(None, None), dtype=np.float16, encoding=_ZLIB),
    store=_store_shading,
    # An image-task answer (an RGB shading in [0, 1]) has no scale of its own: 1.
    options=lambda t: {"max_shading": float(getattr(t, "max_shading", 1.0))}))


def label_format(task: str) -> LabelFormat:
  """The storage of `task`'s labels; a one-line error for a task pseudo-labels do not cover."""
  if task not in LABELS:
    raise errors.ConfigError(f"pseudo-labels cover the tasks {LABELS.names()}, not {task!r}")
  return LABELS.get(task)


def json_value(value: Any) -> Any:
  """`value` as it reads back from JSON (tuples become lists): what the metadata holds."""
  return json.loads(json.dumps(value))


@dataclasses.dataclass
class PseudoLabelledConfig(tfds.core.BuilderConfig):
  """One pseudo-labelled set: its tasks, the options its labels are in, its teachers."""
  tasks: tuple[str, ...] = ()
  task_options: dict = dataclasses.field(default_factory=dict)  # task -> options
  teachers: dict = dataclasses.field(default_factory=dict)  # task -> teacher (a path)
  skipped: tuple[str, ...] = ()  # images that could not be read, "name: reason"


class PseudoLabelled(tfds.core.GeneratorBasedBuilder):
  """Images and their teachers' answers (made by `main pseudo-label`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Made by `python -m dense_diffusion.main pseudo-label --input IMAGES --teacher TASK=SOURCE
  --output DATA_DIR --dataset NAME` (docs/data.md, "Pseudo-labelled sets").
  """

  def __init__(self, *, config=None, **kwargs):
    if not isinstance(config, PseudoLabelledConfig):
      # tfds.builder("pseudo_labelled/NAME") reads a made set from its files; it comes here
      # only when there are none.
      where = kwargs.get("data_dir") or "the TFDS data_dir"
      raise errors.MissingError(
          f"no pseudo-labelled set {NAME}/{config or ''} in {where}; make it with `python -m "
          "dense_diffusion.main pseudo-label` (docs/data.md) or give the data_dir it is in")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    features = {"image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "key": tfds.features.Text()}
    for task in cfg.tasks:  # each task's label key is its name
      features[task] = label_format(task).feature()
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(
            tasks=list(cfg.tasks), task_options=json_value(cfg.task_options),
            teachers=dict(cfg.teachers), skipped=list(cfg.skipped)),
    )

  def _split_generators(self, dl_manager):
    folder = pathlib.Path(dl_manager.manual_dir) / EXAMPLES
    return {"train": self._generate_examples(sorted(folder.glob("*.npz")))}

  def _generate_examples(self, files):
    png = {"image"} | {t for t in self.builder_config.tasks if LABELS.get(t).png}
    for path in files:
      with np.load(path) as arrays:
        key = str(arrays["key"])
        example = {"key": key}
        for name in ("image", *self.builder_config.tasks):
          example[name] = arrays[name].tobytes() if name in png else arrays[name]
      yield key, example


def write_example(staging: os.PathLike, key: str, image: np.ndarray,
                  labels: dict[str, np.ndarray]) -> pathlib.Path:
  """Stores one labelled image u8[H, W, 3] in the staging folder, atomically (an interrupted
  write leaves no file): `labels` maps task -> the stored array (`LabelFormat.store`)."""
  folder = pathlib.Path(staging) / EXAMPLES
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / example_file(key)
  arrays = {"image": _png(image)}
  for task, label in labels.items():
    arrays[task] = _png(label) if LABELS.get(task).png else label
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, key=np.asarray(key), **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


def _png(array: np.ndarray) -> np.ndarray:
  """u8[H, W, C] (C = 1 or 3) -> its PNG file's bytes, as u8[N]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  array = np.asarray(array, np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
  return np.frombuffer(buffer.getvalue(), np.uint8)


def example_file(key: str) -> str:
  """The staging file name of image `key` (its relative path, made a flat file name)."""
  return key.replace("%", "%25").replace(os.sep, "%2F").replace("/", "%2F") + ".npz"


def build(config: PseudoLabelledConfig, staging: os.PathLike, data_dir: os.PathLike) -> Any:
  """Builds `pseudo_labelled/<config.name>` in `data_dir` from the staging folder; returns the
  builder."""
  builder = PseudoLabelled(config=config, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(staging)))
  return builder
