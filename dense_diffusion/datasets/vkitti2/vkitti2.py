"""TFDS builder `vkitti2`: Virtual KITTI 2 (Cabon et al. 2020), synthetic clones of KITTI drives.

Reads the released tarballs, unpacked into a manual directory either together or each into a
folder of its own (e.g. `vkitti_2.0.3_rgb/`, or `rgb/` and `depth/` as Marigold keeps them):

    <root>/SceneXX/<variation>/frames/rgb/Camera_C/rgb_NNNNN.jpg
    <root>/SceneXX/<variation>/frames/depth/Camera_C/depth_NNNNN.png
    <root>/SceneXX/<variation>/frames/classSegmentation/Camera_C/classgt_NNNNN.png
    <root>/SceneXX/<variation>/colors.txt

where <root> is the manual directory or any folder directly inside it. Scenes 01, 02, 06, 18,
20; variations clone, fog, morning, overcast, rain, sunset, 15/30-deg-left/right; cameras 0
and 1 (the stereo pair), 1242 x 375.

Configs: `vkitti2/depth` (image, depth) and `vkitti2/all` (also the class segmentation).
Splits: Scene01 is `validation`, the other scenes `train` (the release has no split;
Marigold's training list holds Scenes 02, 06, 18 and 20, both cameras, every variation).

What is stored:
- `image`: the JPEG as released.
- `depth`: metres along the optical axis, float16 (as TFDS's NYUv2): the released uint16
  centimetres / 100; the release's sky / far code 65535 becomes 0 (invalid). The readers also
  mark depth beyond their `max_depth` (80 m, as Marigold) invalid (`datasets/readers.py`).
- `semantic`: the class of colors.txt's colour, in `CLASSES` order (0..13); 255 = Undefined.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from dense_diffusion.datasets import common

CLASSES = ("Terrain", "Sky", "Tree", "Vegetation", "Building", "Road", "GuardRail",
           "TrafficSign", "TrafficLight", "Pole", "Misc", "Truck", "Car", "Van")
THINGS = ("Truck", "Car", "Van")
UNDEFINED = "Undefined"  # colors.txt's name of unlabelled pixels (black): our 255.
IGNORE_LABEL = 255
DEPTH_SCALE = 100.0  # released depth units per metre (uint16 centimetres).
SKY_DEPTH = 65535  # the release's code of sky / beyond the far plane.
VALIDATION_SCENES = ("Scene01",)

_PATTERN = re.compile(r"(Scene\d+)[/\\]([^/\\]+)[/\\]frames[/\\]([^/\\]+)[/\\](Camera_\d+)"
                      r"[/\\][a-z]+_(\d+)\.(?:jpg|png)$")
_KINDS = {"rgb": ("rgb", "jpg"), "depth": ("depth", "png"),
          "classSegmentation": ("classgt", "png")}


def categories() -> list[dict]:
  """The 14 classes in label order."""
  return [{"id": i + 1, "name": n, "isthing": n in THINGS} for i, n in enumerate(CLASSES)]


def roots_of(manual_dir: str) -> list[str]:
  """The manual directory and the folders directly inside it."""
  return [manual_dir] + sorted(os.path.join(manual_dir, d) for d in os.listdir(manual_dir)
                               if os.path.isdir(os.path.join(manual_dir, d))
                               and not d.startswith("Scene"))


def index_frames(roots: list[str], kind: str) -> dict[tuple[str, str, str, int], str]:
  """{(scene, variation, camera, frame): path} of one kind of file ("rgb", "depth",
  "classSegmentation") over every root; a frame found in two roots is an error."""
  prefix, ext = _KINDS[kind]
  out: dict[tuple[str, str, str, int], str] = {}
  for root in roots:
    pattern = os.path.join(root, "Scene*", "*", "frames", kind, "Camera_*", f"{prefix}_*.{ext}")
    for path in glob.glob(pattern):
      match = _PATTERN.search(path)
      if not match:
        continue
      scene, variation, _, camera, frame = match.groups()
      key = (scene, variation, camera, int(frame))
      if key in out:
        raise ValueError(f"vkitti2: {path} and {out[key]} are the same frame")
      out[key] = path
  return out


def read_colors(path: str) -> dict[tuple[int, int, int], int]:
  """colors.txt ("Category r g b" lines) -> {(r, g, b): class index, or 255 for Undefined}."""
  out = {}
  with open(path) as f:
    for line in f:
      parts = line.split()
      if not parts or parts[0] == "Category":
        continue
      if len(parts) != 4:
        raise ValueError(f"{path}: expected 'Category r g b' lines, got {line.strip()!r}")
      name, rgb = parts[0], tuple(int(x) for x in parts[1:])
      if name == UNDEFINED:
        out[rgb] = IGNORE_LABEL
      elif name in CLASSES:
        out[rgb] = CLASSES.index(name)
      else:
        raise ValueError(f"{path}: unknown class {name!r} (known: {', '.join(CLASSES)})")
  return out


def class_labels(rgb: np.ndarray, colors: dict[tuple[int, int, int], int]) -> np.ndarray:
  """u8[H, W, 3] class colours -> u8[H, W, 1] class indices; a colour not in `colors` raises."""
  rgb = np.asarray(rgb).astype(np.int64)
  codes = rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2]
  table = {r * 65536 + g * 256 + b: label for (r, g, b), label in colors.items()}
  keys = np.array(sorted(table), np.int64)
  values = np.array([table[k] for k in keys], np.uint8)
  pos = np.clip(np.searchsorted(keys, codes), 0, len(keys) - 1)
  known = keys[pos] == codes
  if not known.all():
    bad = [(c >> 16, (c >> 8) & 255, c & 255) for c in np.unique(codes[~known])[:3].tolist()]
    raise ValueError(f"colours not in colors.txt: {bad}")
  return values[pos][..., None]


def depth_metres(centimetres: np.ndarray) -> np.ndarray:
  """u16[H, W] released depth -> f16[H, W] metres; sky / far (65535) -> 0 (invalid)."""
  cm = np.asarray(centimetres)
  return np.where(cm == SKY_DEPTH, 0.0, cm / DEPTH_SCALE).astype(np.float16)


def read_depth(path: str) -> np.ndarray:
  """A 16-bit depth PNG -> u16[H, W] (centimetres)."""
  with Image.open(path) as im:
    depth = np.asarray(im)
  if depth.ndim != 2:
    raise ValueError(f"{path}: depth has shape {depth.shape}, expected one channel")
  if depth.dtype != np.uint16:
    if depth.dtype.kind not in "iu" or depth.min() < 0 or depth.max() > SKY_DEPTH:
      raise ValueError(f"{path}: depth of type {depth.dtype} is not 16-bit")
    depth = depth.astype(np.uint16)
  return depth


class VirtualKitti2(tfds.core.GeneratorBasedBuilder):
  """Virtual KITTI 2 frames: image and depth (+ class segmentation)."""

  name = "vkitti2"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="depth", description="image and depth"),
      tfds.core.BuilderConfig(name="all", description="image, depth and class segmentation"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  From https://europe.naverlabs.com/research/computer-vision/proxy-virtual-worlds-vkitti-2/
  download vkitti_2.0.3_rgb.tar and vkitti_2.0.3_depth.tar (and, for `vkitti2/all`,
  vkitti_2.0.3_classSegmentation.tar) and unpack them into the manual directory, together or
  each into a folder of its own.
  """

  def __init__(self, *, on_bad_example: str = "fail", **kwargs):
    self._validator = common.ExampleValidator("vkitti2", on_bad_example)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
        "depth": tfds.features.Tensor(shape=(None, None), dtype=np.float16,
                                      encoding=tfds.features.Encoding.ZLIB),
        "key": tfds.features.Text(),
    }
    if self.builder_config.name == "all":
      features["semantic"] = tfds.features.Image(shape=(None, None, 1), encoding_format="png")
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict(features),
        homepage="https://europe.naverlabs.com/research/computer-vision/"
                 "proxy-virtual-worlds-vkitti-2/",
        metadata=tfds.core.MetadataDict(num_classes=len(CLASSES), ignore_label=IGNORE_LABEL),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    roots = roots_of(root)
    kinds = ["rgb", "depth"] + (["classSegmentation"] if self.builder_config.name == "all"
                                else [])
    files = {kind: index_frames(roots, kind) for kind in kinds}
    if not files["rgb"]:
      raise FileNotFoundError(f"no Virtual KITTI 2 frames (SceneXX/<variation>/frames/rgb/"
                              f"Camera_C/rgb_NNNNN.jpg) in {root} or its folders "
                              "(see data/README.md)")
    for kind in kinds[1:]:
      only_rgb = sorted(set(files["rgb"]) - set(files[kind]))
      if only_rgb:
        raise ValueError(f"vkitti2: {len(only_rgb)} rgb frames have no {kind} file, e.g. "
                         f"{['/'.join(map(str, k)) for k in only_rgb[:3]]}")
    colors = {}
    if "classSegmentation" in files:
      for scene, variation in sorted({k[:2] for k in files["rgb"]}):
        paths = [p for r in roots for p in [os.path.join(r, scene, variation, "colors.txt")]
                 if os.path.exists(p)]
        if not paths:
          raise FileNotFoundError(f"vkitti2: no {scene}/{variation}/colors.txt in {root}")
        colors[(scene, variation)] = read_colors(paths[0])
    splits: dict[str, list] = {"train": [], "validation": []}
    for frame_key in sorted(files["rgb"]):
      splits["validation" if frame_key[0] in VALIDATION_SCENES else "train"].append(frame_key)
    return {split: self._generate_examples(split, keys, files, colors)
            for split, keys in splits.items() if keys}

  def _generate_examples(self, split, keys, files, colors):
    for frame_key in keys:
      scene, variation, camera, frame = frame_key
      key = f"{scene}/{variation}/{camera}/{frame:05d}"
      paths = [files[kind][frame_key] for kind in files]
      if not self._validator.ok(split, key, paths):
        continue
      try:
        example = {"image": files["rgb"][frame_key], "key": key,
                   "depth": depth_metres(read_depth(files["depth"][frame_key]))}
        if "classSegmentation" in files:
          with Image.open(files["classSegmentation"][frame_key]) as im:
            rgb = np.asarray(im.convert("RGB"))
          example["semantic"] = class_labels(rgb, colors[(scene, variation)])
      except ValueError as e:
        self._validator.reject(split, key, str(e))
        continue
      yield key, example
