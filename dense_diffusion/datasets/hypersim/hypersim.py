"""TFDS builder `hypersim`: Hypersim (Roberts et al. 2021), photorealistic synthetic indoor scenes.

Reads the released per-scene folders (the scene zips unpacked as they come) from a manual
directory:

    <manual_dir>/ai_VVV_NNN/images/scene_cam_XX_final_hdf5/frame.IIII.color.hdf5
                                                          frame.IIII.diffuse_reflectance.hdf5
                                                          frame.IIII.diffuse_illumination.hdf5
    <manual_dir>/ai_VVV_NNN/images/scene_cam_XX_geometry_hdf5/frame.IIII.depth_meters.hdf5
                                                             frame.IIII.normal_cam.hdf5
                                                             frame.IIII.semantic.hdf5
                                                             frame.IIII.render_entity_id.hdf5
    <manual_dir>/metadata_images_split_scene_v1.csv   optional: the official split
    <manual_dir>/metadata_camera_parameters.csv       optional: every scene's camera

Configs: `hypersim/depth` (image, depth) needs the color and depth_meters files;
`hypersim/all` adds normals, semantic (NYU40), albedo and shading and needs their files too.
`render_entity_id` is optional: where present, pixels of no object (-1) are invalid as well.

With the split CSV, the frames it marks `included_in_public_release` go to `train`,
`validation` (its "val") and `test`, for the scenes present in the manual directory (the others
are left out, with a count in the log). Without it, every frame found is `train`.

What is stored (all at the render's 768 x 1024):
- `image`: the HDR color tone-mapped as the Hypersim authors do (and Marigold after them): a
  scale that brings the 90th percentile of brightness (0.3 R + 0.59 G + 0.11 B) over the valid
  pixels to 0.8 after gamma 1 / 2.2, then gamma 1 / 2.2, clipped, 8 bits.
- `depth`: planar (z) depth in metres, float16 (as TFDS's NYUv2; relative precision 5e-4);
  0 = invalid (NaN, or no object). Hypersim's `depth_meters` is the distance from the camera
  centre along each pixel's ray; planar depth = distance * |ray_z| / |ray| with the rays of
  the scene's camera (`M_cam_from_uv` of metadata_camera_parameters.csv, which also covers the
  scenes with tilt-shift lenses); without that CSV every scene gets the standard camera, 60
  degrees horizontal field of view (focal 886.81 px at 1024 wide), as Marigold uses.
- `normals`: unit normals in our camera frame (x right, y down, z forward; Hypersim's is x
  right, y up, z backward), flipped where they face away from the camera; float16, 0 = invalid.
- `semantic`: NYU40 class - 1 (0..39), 255 = unlabelled.
- `albedo`: the diffuse reflectance, linear, clipped to [0, 1], 8 bits.
- `shading`: the luminance (the brightness weights above) of the diffuse illumination times
  the image's tone-map scale, i.e. at the image's exposure; float16.
"""
from __future__ import annotations

import collections
import csv
import glob
import math
import os
import re

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from dense_diffusion.datasets import common

SPLIT_CSV = "metadata_images_split_scene_v1.csv"
CAMERA_CSV = "metadata_camera_parameters.csv"
_SPLITS = {"train": "train", "val": "validation", "test": "test"}  # CSV name -> our split
DEFAULT_FOV_X = math.pi / 3  # radians: Hypersim's standard camera (focal 886.81 px at 1024).
# The tone map of the Hypersim authors' scene_generate_images_tonemap.py.
TONEMAP_GAMMA = 1.0 / 2.2
TONEMAP_PERCENTILE = 90.0  # this percentile of brightness ...
TONEMAP_TARGET = 0.8  # ... becomes this bright after the gamma.
TONEMAP_MIN_BRIGHTNESS = 1e-4  # below it the image is black (scale 0).
BRIGHTNESS_WEIGHTS = np.array([0.3, 0.59, 0.11])  # CCIR601 YIQ brightness of RGB.
NYU40_CLASSES = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf",
    "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror",
    "floor mat", "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel",
    "shower curtain", "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp",
    "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop")
NYU40_STUFF = ("wall", "floor", "ceiling", "floor mat", "otherstructure")
IGNORE_LABEL = 255

_SCENE = re.compile(r"ai_\d{3}_\d{3}$")
_FRAME = re.compile(r"frame\.(\d{4})\.color\.hdf5$")
# config -> {feature: (folder kind, file suffix)} of the files each frame needs.
_FILES = {
    "depth": {"color": ("final", "color"), "distance": ("geometry", "depth_meters")},
    "all": {"color": ("final", "color"), "distance": ("geometry", "depth_meters"),
            "normal": ("geometry", "normal_cam"), "semantic": ("geometry", "semantic"),
            "reflectance": ("final", "diffuse_reflectance"),
            "illumination": ("final", "diffuse_illumination")},
}
_ENTITY = ("geometry", "render_entity_id")


def categories() -> list[dict]:
  """The 40 NYU40 classes in label order (id = NYU40 id = label + 1)."""
  return [{"id": i + 1, "name": n, "isthing": n not in NYU40_STUFF}
          for i, n in enumerate(NYU40_CLASSES)]


# -- Geometry and appearance (numpy, arrays in / arrays out) ------------------------------------
def default_cam_from_uv(height: int, width: int, fov_x: float = DEFAULT_FOV_X) -> np.ndarray:
  """f64[3, 3]: Hypersim's `M_cam_from_uv` of a standard pinhole camera (principal point at the
  centre): (u, v, 1) with u, v in [-1, 1] (u right, v up) -> a camera-space ray."""
  t = math.tan(fov_x / 2)
  return np.diag([t, t * height / width, -1.0])


def pixel_rays(cam_from_uv: np.ndarray, height: int, width: int) -> np.ndarray:
  """f64[H, W, 3]: the camera-space ray (Hypersim's frame: x right, y up, z backward) through
  each pixel centre, (j + 0.5, i + 0.5), mapped to uv in [-1, 1]."""
  u = (np.arange(width) + 0.5) / width * 2.0 - 1.0
  v = 1.0 - (np.arange(height) + 0.5) / height * 2.0
  uu, vv = np.meshgrid(u, v)
  uv1 = np.stack([uu, vv, np.ones_like(uu)], axis=-1)
  return uv1 @ np.asarray(cam_from_uv, np.float64).T


def planar_depth(distance: np.ndarray, rays: np.ndarray) -> np.ndarray:
  """f[H, W] distance from the camera centre along each ray -> f64[H, W] depth along the
  optical axis (planar / z depth)."""
  return np.asarray(distance, np.float64) * np.abs(rays[..., 2]) / np.linalg.norm(rays, axis=-1)


def encode_depth(depth: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """f[H, W] metres and bool[H, W] -> f16[H, W] metres, 0 where invalid."""
  depth = np.asarray(depth, np.float64)
  known = valid & np.isfinite(depth) & (depth > 0)
  return np.where(known, depth, 0.0).astype(np.float16)


def tone_map(rgb: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, float]:
  """HDR linear f[H, W, 3] and bool[H, W] (pixels that set the exposure) -> (u8[H, W, 3], the
  exposure scale applied before the gamma)."""
  rgb = np.nan_to_num(np.asarray(rgb, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  if not valid.any():
    scale = 1.0
  else:
    current = float(np.percentile((rgb @ BRIGHTNESS_WEIGHTS)[valid], TONEMAP_PERCENTILE))
    scale = (0.0 if current < TONEMAP_MIN_BRIGHTNESS
             else TONEMAP_TARGET ** (1.0 / TONEMAP_GAMMA) / current)
  out = np.clip(np.maximum(scale * rgb, 0.0) ** TONEMAP_GAMMA, 0.0, 1.0)
  return np.round(out * 255.0).astype(np.uint8), scale


def camera_normals(normal_cam: np.ndarray, rays: np.ndarray) -> np.ndarray:
  """Hypersim `normal_cam` f[H, W, 3] (x right, y up, z backward) -> f16[H, W, 3] unit normals
  in our camera frame (x right, y down, z forward) that face the camera; 0 where unknown."""
  n = np.asarray(normal_cam, np.float64)
  length = np.linalg.norm(np.nan_to_num(n, nan=0.0, posinf=0.0, neginf=0.0), axis=-1)
  known = np.all(np.isfinite(n), axis=-1) & (length > 1e-6)
  n = np.where(known[..., None], np.nan_to_num(n) / np.maximum(length, 1e-6)[..., None], 0.0)
  away = np.sum(n * rays, axis=-1) > 0  # the ray runs from the camera into the surface
  n = np.where(away[..., None], -n, n)
  return (n * np.array([1.0, -1.0, -1.0])).astype(np.float16)


def semantic_labels(nyu40: np.ndarray) -> np.ndarray:
  """NYU40 ids int[H, W] (1..40; -1 or 0 = unlabelled) -> u8[H, W, 1]: 0..39, 255 unlabelled."""
  ids = np.asarray(nyu40).astype(np.int64)
  known = (ids >= 1) & (ids <= len(NYU40_CLASSES))
  return np.where(known, ids - 1, IGNORE_LABEL).astype(np.uint8)[..., None]


def albedo_u8(reflectance: np.ndarray) -> np.ndarray:
  """Linear diffuse reflectance f[H, W, 3] -> u8[H, W, 3] (clipped to [0, 1])."""
  r = np.nan_to_num(np.asarray(reflectance, np.float64), nan=0.0, posinf=1.0, neginf=0.0)
  return np.round(np.clip(r, 0.0, 1.0) * 255.0).astype(np.uint8)


def shading_map(illumination: np.ndarray, scale: float) -> np.ndarray:
  """Diffuse illumination f[H, W, 3] and the image's exposure scale -> f16[H, W] grey shading."""
  s = np.nan_to_num(np.asarray(illumination, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
  return np.maximum(scale * (s @ BRIGHTNESS_WEIGHTS), 0.0).astype(np.float16)


# -- Metadata ------------------------------------------------------------------------------------
def read_hdf5(path: str) -> np.ndarray:
  """The `dataset` array of one of Hypersim's HDF5 files."""
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(path, "r") as f:
    if "dataset" not in f:
      raise KeyError(f"{path} has no 'dataset' (has {sorted(f)})")
    return np.asarray(f["dataset"])


def read_cameras(path: str) -> dict[str, tuple[np.ndarray, int, int]]:
  """metadata_camera_parameters.csv -> {scene: (M_cam_from_uv f64[3, 3], height, width)}."""
  out = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      m = np.array([[float(row[f"M_cam_from_uv_{i}{j}"]) for j in range(3)] for i in range(3)])
      out[row["scene_name"]] = (m, int(float(row["settings_output_img_height"])),
                                int(float(row["settings_output_img_width"])))
  return out


def read_split_csv(path: str) -> dict[tuple[str, str, int], str]:
  """metadata_images_split_scene_v1.csv -> {(scene, camera, frame): our split} of the frames
  in the public release."""
  out = {}
  with open(path, newline="") as f:
    for row in csv.DictReader(f):
      if row["included_in_public_release"].strip().lower() != "true":
        continue
      split = _SPLITS.get(row["split_partition_name"].strip())
      if split is None:
        raise ValueError(f"{path}: unknown split_partition_name {row['split_partition_name']!r}")
      out[(row["scene_name"], row["camera_name"], int(row["frame_id"]))] = split
  return out


def frame_path(root: str, scene: str, camera: str, frame: int, kind: str, suffix: str) -> str:
  return os.path.join(root, scene, "images", f"scene_{camera}_{kind}_hdf5",
                      f"frame.{frame:04d}.{suffix}.hdf5")


def find_frames(root: str) -> list[tuple[str, str, int]]:
  """[(scene, camera, frame)] of every color file under `root`, sorted."""
  found = []
  for path in glob.glob(os.path.join(root, "ai_*", "images", "scene_cam_*_final_hdf5",
                                     "frame.*.color.hdf5")):
    folder = os.path.basename(os.path.dirname(path))
    scene = os.path.basename(os.path.dirname(os.path.dirname(os.path.dirname(path))))
    match = _FRAME.search(os.path.basename(path))
    if _SCENE.match(scene) and match:
      camera = folder[len("scene_"):-len("_final_hdf5")]
      found.append((scene, camera, int(match.group(1))))
  return sorted(found)


class Hypersim(tfds.core.GeneratorBasedBuilder):
  """Hypersim frames: tone-mapped image, planar depth (+ normals, NYU40, albedo, shading)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="depth", description="image and planar depth"),
      tfds.core.BuilderConfig(name="all", description="image, planar depth, normals, NYU40 "
                              "semantic, albedo and shading"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download the scene zips of https://github.com/apple/ml-hypersim (its download script) and
  unzip them into the manual directory (so that <manual_dir>/ai_001_001/images exists); put
  metadata_images_split_scene_v1.csv (the split) and contrib/mikeroberts3000/
  metadata_camera_parameters.csv (the cameras) of that repository beside them.
  """

  def __init__(self, *, on_bad_example: str = "fail", **kwargs):
    self._validator = common.ExampleValidator("hypersim", on_bad_example)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    zlib = tfds.features.Encoding.ZLIB
    features = {
        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
        "depth": tfds.features.Tensor(shape=(None, None), dtype=np.float16, encoding=zlib),
        "key": tfds.features.Text(),
    }
    if self.builder_config.name == "all":
      features.update({
          "normals": tfds.features.Tensor(shape=(None, None, 3), dtype=np.float16,
                                          encoding=zlib),
          "semantic": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "albedo": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
          "shading": tfds.features.Tensor(shape=(None, None), dtype=np.float16, encoding=zlib),
      })
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict(features),
        homepage="https://github.com/apple/ml-hypersim",
        metadata=tfds.core.MetadataDict(num_classes=len(NYU40_CLASSES),
                                        ignore_label=IGNORE_LABEL),
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    cameras_path = os.path.join(root, CAMERA_CSV)
    cameras = read_cameras(cameras_path) if os.path.exists(cameras_path) else None
    if cameras is None:
      logging.warning("hypersim: no %s in %s; every scene gets the standard 60-degree camera",
                      CAMERA_CSV, root)
    split_path = os.path.join(root, SPLIT_CSV)
    present = sorted(d for d in os.listdir(root) if _SCENE.match(d)
                     and os.path.isdir(os.path.join(root, d)))
    if not present:
      raise FileNotFoundError(f"no Hypersim scene folders (ai_VVV_NNN) in {root} "
                              "(see data/README.md)")
    frames: dict[str, list] = collections.defaultdict(list)
    if os.path.exists(split_path):
      listed = read_split_csv(split_path)
      scenes = set(present)
      for (scene, camera, frame), split in sorted(listed.items()):
        if scene in scenes:
          frames[split].append((scene, camera, frame))
      absent = {s for s, _, _ in listed} - scenes
      if absent:
        logging.info("hypersim: %d scenes of %s are not in %s; their frames are left out",
                     len(absent), SPLIT_CSV, root)
    else:
      frames["train"] = find_frames(root)
    return {split: self._generate_examples(root, split, items, cameras)
            for split, items in sorted(frames.items()) if items}

  def _generate_examples(self, root, split, items, cameras):
    needed = _FILES[self.builder_config.name]
    rays_for, rays = None, None  # the last camera's rays (items come scene by scene)
    for scene, camera, frame in items:
      key = f"{scene}/{camera}/frame.{frame:04d}"
      paths = {name: frame_path(root, scene, camera, frame, kind, suffix)
               for name, (kind, suffix) in needed.items()}
      missing = [p for p in paths.values() if not os.path.exists(p)]
      if missing:
        self._validator.reject(split, key, f"missing {missing[0]}"
                               + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
        continue
      try:
        arrays = {name: read_hdf5(p) for name, p in paths.items()}
        entity_path = frame_path(root, scene, camera, frame, *_ENTITY)
        entity = read_hdf5(entity_path) if os.path.exists(entity_path) else None
      except (OSError, KeyError) as e:
        self._validator.reject(split, key, f"unreadable HDF5 ({type(e).__name__}: {e})")
        continue
      color, distance = arrays["color"], arrays["distance"]
      sizes = {name: a.shape[:2] for name, a in arrays.items()}
      if entity is not None:
        sizes["render_entity_id"] = entity.shape[:2]
      if (color.ndim != 3 or color.shape[-1] != 3 or distance.ndim != 2
          or len(set(sizes.values())) > 1):
        self._validator.reject(split, key, f"arrays do not match: color {color.shape}, "
                               f"depth {distance.shape}, sizes {sizes}")
        continue
      height, width = distance.shape
      if cameras is None:
        cam_from_uv = default_cam_from_uv(height, width)
      elif scene not in cameras:
        raise ValueError(f"{CAMERA_CSV} has no camera for scene {scene}")
      else:
        cam_from_uv, cam_h, cam_w = cameras[scene]
        if (cam_h, cam_w) != (height, width):
          self._validator.reject(split, key, f"{CAMERA_CSV} says {cam_h}x{cam_w}, the frame "
                                 f"is {height}x{width}")
          continue
      if rays_for != (scene, height, width):
        rays_for, rays = (scene, height, width), pixel_rays(cam_from_uv, height, width)
      valid = np.isfinite(distance)
      if entity is not None:
        valid &= np.asarray(entity) != -1
      image, scale = tone_map(color, valid)
      example = {"image": image, "depth": encode_depth(planar_depth(distance, rays), valid),
                 "key": key}
      if self.builder_config.name == "all":
        example.update({
            "normals": np.where(valid[..., None], camera_normals(arrays["normal"], rays),
                                0).astype(np.float16),
            "semantic": semantic_labels(arrays["semantic"]),
            "albedo": albedo_u8(arrays["reflectance"]),
            "shading": shading_map(arrays["illumination"], scale),
        })
      if not self._validator.ok(split, key, [v for k, v in example.items() if k != "key"]):
        continue
      yield key, example
