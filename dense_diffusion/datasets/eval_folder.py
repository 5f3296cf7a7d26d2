"""Evaluation sets in the layout of Marigold's: RGB files, answer files and a filename list.

    FOLDER/
      filename_list.txt       one example a line: RGB path, answer path[, mask path]
      rgb/scene_0001.png      (any layout: the paths are relative to FOLDER)
      depth/scene_0001.png
      ...

`examples(folder, task)` yields one `Example` per line, with the image and its answer at full
resolution. The list is `filename_list.txt` in FOLDER, the only `*.txt` file in it, or the file
given. Blank lines and lines starting with `#` are skipped. A third column is a validity mask when
its file name contains "mask" (DIODE's `*_depth_mask.npy`) and ignored otherwise (NYUv2's list
names its filled depth there, which evaluation does not use).

How answer files are read depends on the task (`ANSWER_READERS`, by task name):

  depth    .npy: metres (float), 0 / NaN / inf = unknown; 16-bit PNG or TIFF: value / depth_scale
           (1000: millimetres, NYUv2 and ScanNet; 256: KITTI); float TIFF: metres
  normals  .npy: f[H, W, 3] unit vectors; 8-bit RGB PNG: rgb / 127.5 - 1 (0 vectors unknown)

Masks are `.npy` (bool or numbers, non-zero = valid) or images (non-zero = valid).
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Iterator, Optional

import numpy as np
from PIL import Image

from dense_diffusion import errors
from dense_diffusion import registry

LIST_NAME = "filename_list.txt"


@dataclasses.dataclass
class Example:
  """One evaluation image: `name` (its RGB path in the list), `image` u8[H, W, 3], the
  ground-truth answer at full resolution, an optional validity mask bool[H, W] and, from a TFDS
  split, the raw label features it was read from (composites read theirs from them)."""
  name: str
  image: np.ndarray
  truth: Any
  mask: Optional[np.ndarray] = None
  labels: Optional[dict] = None


# task name -> (path, depth_scale) -> the answer array.
ANSWER_READERS: registry.Registry[Callable[[pathlib.Path, float], np.ndarray]] = (
    registry.Registry("answer file reader"))


def _image_array(path: pathlib.Path) -> np.ndarray:
  with Image.open(path) as img:
    img.load()
    return np.asarray(img)


@ANSWER_READERS.register("depth")
def read_depth(path: pathlib.Path, depth_scale: float) -> np.ndarray:
  """f32[H, W] metres; unknown pixels 0."""
  if path.suffix.lower() == ".npy":
    depth = np.load(path).astype(np.float32)
  else:
    raw = _image_array(path)
    depth = raw.astype(np.float32)
    if np.issubdtype(raw.dtype, np.integer):
      depth = depth / np.float32(depth_scale)
  depth = np.squeeze(depth)
  if depth.ndim != 2:
    raise errors.ConfigError(f"{path}: a depth file must hold one channel, got shape "
                             f"{depth.shape}")
  return np.where(np.isfinite(depth) & (depth > 0), depth, 0.0).astype(np.float32)


@ANSWER_READERS.register("normals")
def read_normals(path: pathlib.Path, depth_scale: float) -> np.ndarray:
  """f32[H, W, 3]; unknown pixels 0."""
  del depth_scale
  if path.suffix.lower() == ".npy":
    normals = np.load(path).astype(np.float32)
    if normals.ndim == 3 and normals.shape[0] == 3 and normals.shape[-1] != 3:
      normals = np.moveaxis(normals, 0, -1)  # saved channels-first
  else:
    rgb = _image_array(path)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[-1] < 3:
      raise errors.ConfigError(f"{path}: a normals image must be 8-bit RGB")
    normals = rgb[..., :3].astype(np.float32) / 127.5 - 1.0
    normals = np.where(np.all(rgb[..., :3] == 0, axis=-1, keepdims=True), 0.0, normals)
  if normals.ndim != 3 or normals.shape[-1] != 3:
    raise errors.ConfigError(f"{path}: normals must be (H, W, 3), got {normals.shape}")
  return np.where(np.isfinite(normals), normals, 0.0).astype(np.float32)


def read_mask(path: pathlib.Path) -> np.ndarray:
  mask = np.load(path) if path.suffix.lower() == ".npy" else _image_array(path)
  mask = np.squeeze(np.asarray(mask))
  return mask if mask.dtype == bool else mask != 0


def list_file(folder: pathlib.Path, given: Optional[str] = None) -> pathlib.Path:
  """The filename list: `given`, else FOLDER/filename_list.txt, else FOLDER's only .txt."""
  if given:
    path = pathlib.Path(given)
    if not path.is_file():
      raise errors.MissingError(f"no filename list {path}")
    return path
  if (folder / LIST_NAME).is_file():
    return folder / LIST_NAME
  found = sorted(folder.glob("*.txt"))
  if len(found) == 1:
    return found[0]
  raise errors.MissingError(
      f"{folder} has {'no' if not found else 'several'} .txt filename list"
      f"{'' if not found else 's (' + ', '.join(p.name for p in found) + ')'}; put the list in "
      f"{LIST_NAME} or name it with --filename_list")


def read_list(path: pathlib.Path) -> list[list[str]]:
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    fields = line.split()
    if len(fields) < 2:
      raise errors.ConfigError(f"{path}:{number}: expected 'RGB_PATH ANSWER_PATH [MASK_PATH]', "
                               f"got {line!r}")
    rows.append(fields)
  if not rows:
    raise errors.MissingError(f"{path} lists no examples")
  return rows


def is_folder(dataset: str) -> bool:
  """Whether `--dataset` names a folder (not a TFDS dataset)."""
  return pathlib.Path(dataset).is_dir()


def examples(folder: str | pathlib.Path, task: str, *, filename_list: Optional[str] = None,
             depth_scale: float = 1000.0) -> Iterator[Example]:
  """Every example of the folder's list, in the list's order (`task` picks the answer reader)."""
  folder = pathlib.Path(folder)
  read = ANSWER_READERS.get(task)
  rows = read_list(list_file(folder, filename_list))
  for fields in rows:
    paths = [folder / f for f in fields]
    for p in paths[:2]:
      if not p.is_file():
        raise errors.MissingError(f"{p} (listed in the filename list) does not exist")
    with Image.open(paths[0]) as img:
      image = np.asarray(img.convert("RGB"))
    truth = read(paths[1], depth_scale)
    mask = None
    if len(paths) > 2 and "mask" in paths[2].name:
      mask = read_mask(paths[2])
    for what, x in (("answer", truth), ("mask", mask)):
      if x is not None and tuple(np.shape(x)[:2]) != image.shape[:2]:
        raise errors.ConfigError(f"{fields[0]}: its {what} is {np.shape(x)[1]}x"
                                 f"{np.shape(x)[0]}, the image {image.shape[1]}x"
                                 f"{image.shape[0]}")
    yield Example(fields[0], image, truth, mask)


def count(folder: str | pathlib.Path, filename_list: Optional[str] = None) -> int:
  return len(read_list(list_file(pathlib.Path(folder), filename_list)))
