"""Hypersim and Virtual KITTI 2, Marigold's and GenPercept's training sets: our builders read tiny
trees in the released layouts (HDF5 written with h5py, PNG / JPEG with PIL) and the readers'
entries turn them into the tasks' answers. Expected values are computed here independently:
planar depth by back-projecting each pixel with the camera's focal length (or its tilt-shift
matrix), the tone map on hand-made exposures, centimetres / 100, the validity masks."""
import csv
import math

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import marigold, onestep
from dense_diffusion import errors
from dense_diffusion import input_pipeline as ip
from dense_diffusion.datasets import common
from dense_diffusion.datasets import readers

H, W = 12, 16  # Hypersim frames (the real ones are 768 x 1024)
KH, KW = 10, 30  # Virtual KITTI frames (the real ones are 375 x 1242)
SHIFT = 0.1  # the tilt-shift camera's horizontal principal-point offset (uv units)
RNG = np.random.default_rng(0)


# -- Hypersim tree ---------------------------------------------------------------------------------
def _h5(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, "w") as f:
    f.create_dataset("dataset", data=array)


def _hypersim_frame(root, scene, frame, base):
  """Writes one frame; returns what it wrote (as read back, float64)."""
  final = root / scene / "images" / "scene_cam_00_final_hdf5"
  geometry = root / scene / "images" / "scene_cam_00_geometry_hdf5"
  color = np.full((H, W, 3), base)
  color[0:2, 0:4] = 2 * base  # brighter than the 90th percentile: saturates
  color[2:4, 0:4] = base / 2  # half the exposure
  color[10:12, 12:16] = 1000.0  # no object (entity -1): ignored by the exposure
  entity = np.ones((H, W), np.int32)
  entity[10:12, 12:16] = -1
  distance = RNG.uniform(0.5, 20.0, (H, W)).astype(np.float16)
  distance[5, 5] = np.nan
  normal = np.zeros((H, W, 3), np.float16)
  normal[..., 2] = 1.0  # facing the camera (Hypersim: z backward)
  normal[6:8, 0:8] = (0, 1, 0)  # floor below the centre: up, seen from above
  normal[0:2, 8:12] = (0, 0, -1)  # facing away: flipped
  normal[2:4, 8:12] = (0, 0, 2)  # not unit length
  normal[4, 4] = np.nan
  semantic = RNG.integers(1, 41, (H, W)).astype(np.int16)
  semantic[0, :3] = (-1, 0, 40)
  reflectance = RNG.uniform(0.0, 1.2, (H, W, 3)).astype(np.float16)
  illumination = np.full((H, W, 3), 1.5, np.float16)
  stem = f"frame.{frame:04d}"
  _h5(final / f"{stem}.color.hdf5", color.astype(np.float16))
  _h5(final / f"{stem}.diffuse_reflectance.hdf5", reflectance)
  _h5(final / f"{stem}.diffuse_illumination.hdf5", illumination)
  _h5(geometry / f"{stem}.depth_meters.hdf5", distance)
  _h5(geometry / f"{stem}.render_entity_id.hdf5", entity)
  _h5(geometry / f"{stem}.normal_cam.hdf5", normal)
  _h5(geometry / f"{stem}.semantic.hdf5", semantic)
  return {"base": base, "distance": distance.astype(np.float64), "semantic": semantic,
          "reflectance": reflectance.astype(np.float64), "entity": entity}


def _cam_from_uv(scene):
  t = math.tan(math.radians(30))
  m = np.diag([t, t * H / W, -1.0])
  if scene == "ai_002_001":
    m[0, 2] = SHIFT  # a tilt-shift lens: the principal point off the image centre
  return m


def _write_csvs(root):
  with open(root / "metadata_images_split_scene_v1.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["scene_name", "camera_name", "frame_id", "included_in_public_release",
                "exclude_reason", "split_partition_name"])
    w.writerows([["ai_001_001", "cam_00", 0, "True", "", "train"],
                 ["ai_001_001", "cam_00", 1, "True", "", "train"],
                 ["ai_002_001", "cam_00", 0, "True", "", "val"],
                 ["ai_002_001", "cam_00", 1, "False", "bad lighting", "val"],
                 ["ai_003_001", "cam_00", 0, "True", "", "test"]])  # not downloaded
  with open(root / "metadata_camera_parameters.csv", "w", newline="") as f:
    keys = [f"M_cam_from_uv_{i}{j}" for i in range(3) for j in range(3)]
    w = csv.writer(f)
    w.writerow(["scene_name", "settings_output_img_height", "settings_output_img_width",
                "settings_camera_fov"] + keys)
    for scene in ("ai_001_001", "ai_002_001", "ai_003_001"):
      w.writerow([scene, float(H), float(W), math.pi / 3] + _cam_from_uv(scene).ravel().tolist())


def _expected_planar(scene, distance):
  """Planar depth by back-projection: the default camera through its focal length in pixels
  (f = (W / 2) / tan(30 deg), Marigold's formula); the tilt-shift one through the 3-D point."""
  i, j = np.mgrid[:H, :W].astype(np.float64)
  if scene == "ai_001_001":
    f = (W / 2) / math.tan(math.radians(30))
    x, y = j + 0.5 - W / 2, i + 0.5 - H / 2
    return distance * f / np.sqrt(x**2 + y**2 + f**2)
  m = _cam_from_uv(scene)
  uv1 = np.stack([(j + 0.5) / W * 2 - 1, 1 - (i + 0.5) / H * 2, np.ones_like(i)], -1)
  rays = uv1 @ m.T
  points = distance[..., None] * rays / np.linalg.norm(rays, axis=-1, keepdims=True)
  return -points[..., 2]  # the camera looks down -z


@pytest.fixture(scope="module")
def hypersim_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("hypersim_raw")
  frames = {"ai_001_001/cam_00/frame.0000": _hypersim_frame(root, "ai_001_001", 0, 3.7),
            "ai_001_001/cam_00/frame.0001": _hypersim_frame(root, "ai_001_001", 1, 0.02),
            "ai_002_001/cam_00/frame.0000": _hypersim_frame(root, "ai_002_001", 0, 250.0),
            "ai_002_001/cam_00/frame.0001": _hypersim_frame(root, "ai_002_001", 1, 1.0)}
  _write_csvs(root)
  return root, frames


# -- Virtual KITTI 2 tree --------------------------------------------------------------------------
COLORS = {"Terrain": (210, 0, 200), "Sky": (90, 200, 255), "Tree": (0, 199, 0),
          "Vegetation": (90, 240, 0), "Building": (140, 140, 140), "Road": (100, 60, 100),
          "GuardRail": (250, 100, 255), "TrafficSign": (255, 255, 0),
          "TrafficLight": (200, 200, 0), "Pole": (255, 130, 0), "Misc": (80, 80, 80),
          "Truck": (160, 60, 60), "Car": (255, 127, 80), "Van": (0, 139, 139),
          "Undefined": (0, 0, 0)}
VKITTI_FRAMES = [("Scene01", "clone", "Camera_0", 0), ("Scene02", "clone", "Camera_0", 0),
                 ("Scene02", "clone", "Camera_1", 0), ("Scene02", "fog", "Camera_0", 3)]


def _save(path, array):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def vkitti_tree(tmp_path_factory):
  """The three tarballs unpacked each into its own folder, as they come."""
  root = tmp_path_factory.mktemp("vkitti_raw")
  names = list(COLORS)
  out = {}
  for scene, variation, camera, frame in VKITTI_FRAMES:
    cm = RNG.integers(100, 7900, (KH, KW)).astype(np.uint16)
    cm[:2] = 65535  # sky
    cm[2, :5] = 8500  # 85 m: beyond Marigold's 80 m
    cm[3, :5] = 7990  # 79.9 m: inside
    classes = RNG.integers(0, len(names), (KH, KW))
    rgb = np.array([COLORS[names[c]] for c in classes.ravel()], np.uint8).reshape(KH, KW, 3)
    sub = f"{scene}/{variation}/frames"
    _save(root / "vkitti_2.0.3_rgb" / sub / "rgb" / camera / f"rgb_{frame:05d}.jpg",
          np.full((KH, KW, 3), 20, np.uint8))  # dark: tells Virtual KITTI in a mixed batch
    _save(root / "vkitti_2.0.3_depth" / sub / "depth" / camera / f"depth_{frame:05d}.png", cm)
    _save(root / "vkitti_2.0.3_classSegmentation" / sub / "classSegmentation" / camera /
          f"classgt_{frame:05d}.png", rgb)
    colors = root / "vkitti_2.0.3_classSegmentation" / scene / variation / "colors.txt"
    colors.write_text("Category r g b\n" + "".join(f"{n} {r} {g} {b}\n"
                                                   for n, (r, g, b) in COLORS.items()))
    out[f"{scene}/{variation}/{camera}/{frame:05d}"] = (cm, [names[c] for c in classes.ravel()])
  return root, out


def _prepare(name, manual_dir, data_dir, **kwargs):
  builder = tfds.builder(name, data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, hypersim_tree, vkitti_tree):
  out = tmp_path_factory.mktemp("tfds")
  for name in ("hypersim/depth", "hypersim/all"):
    _prepare(name, hypersim_tree[0], out)
  for name in ("vkitti2/depth", "vkitti2/all"):
    _prepare(name, vkitti_tree[0], out)
  return out


def _read(name, split, data_dir):
  ds, builder = ip.read_split(name, split, data_dir=str(data_dir), process_index=0,
                              process_count=1)
  return {ex["key"].decode(): ex for ex in tfds.as_numpy(ds)}, builder


# -- Tests -----------------------------------------------------------------------------------------
def test_hypersim_values_in_the_released_layout(hypersim_tree, data_dir):
  _, frames = hypersim_tree
  train, builder = _read("hypersim/all", "train", data_dir)
  val, _ = _read("hypersim/all", "validation", data_dir)
  # The split CSV: its public frames of the scenes present; the excluded frame and the absent
  # scene are left out.
  assert dict(builder.info.splits) .keys() == {"train", "validation"}
  assert set(train) == {"ai_001_001/cam_00/frame.0000", "ai_001_001/cam_00/frame.0001"}
  assert set(val) == {"ai_002_001/cam_00/frame.0000"}
  for key, ex in {**train, **val}.items():
    src, scene = frames[key], key.split("/")[0]
    valid = (src["entity"] != -1) & np.isfinite(src["distance"])
    # Planar depth (float16 metres), 0 where NaN or no object.
    want = np.where(valid, _expected_planar(scene, np.nan_to_num(src["distance"])), 0.0)
    assert ex["depth"].dtype == np.float16 and ex["depth"].shape == (H, W)
    np.testing.assert_allclose(ex["depth"].astype(np.float64), want, rtol=1e-3, atol=0)
    assert ex["depth"][5, 5] == 0 and np.all(ex["depth"][10:12, 12:16] == 0)
    # The tilt-shift camera differs from the standard one by more than the precision.
    if scene == "ai_002_001":
      assert np.abs(want - _expected_planar("ai_001_001", src["distance"]))[valid].max() > 0.01
    # Tone map, whatever the exposure: the 90th-percentile brightness lands on 0.8 after gamma
    # 1/2.2; twice that saturates, half of it is 0.8 * 0.5^(1/2.2); no-object pixels are ignored.
    image = ex["image"].astype(int)
    assert np.all(image[4:10] == 204) and np.all(image[0:2, 0:4] == 255)
    assert np.all(image[2:4, 0:4] == round(255 * 0.8 * 0.5 ** (1 / 2.2)))
    # Normals in our camera frame (x right, y down, z forward), facing the camera, unit length.
    n = ex["normals"].astype(np.float64)
    np.testing.assert_array_equal(n[9, 9], [0, 0, -1])
    np.testing.assert_array_equal(n[6:8, 0:8].reshape(-1, 3), [[0, -1, 0]] * 16)
    np.testing.assert_array_equal(n[0:2, 8:12].reshape(-1, 3), [[0, 0, -1]] * 8)
    np.testing.assert_array_equal(n[2:4, 8:12].reshape(-1, 3), [[0, 0, -1]] * 8)
    assert not n[4, 4].any() and not n[10:12, 12:16].any()
    # NYU40 1..40 -> 0..39; -1 and 0 unlabelled (255).
    sem = src["semantic"]
    np.testing.assert_array_equal(ex["semantic"][..., 0],
                                  np.where(sem >= 1, sem - 1, 255).astype(np.uint8))
    assert ex["semantic"][0, :3, 0].tolist() == [255, 255, 39]
    # Albedo: linear reflectance clipped to [0, 1], 8 bits. Shading at the image's exposure.
    np.testing.assert_array_equal(ex["albedo"],
                                  np.round(np.clip(src["reflectance"], 0, 1) * 255))
    scale = 0.8 ** 2.2 / src["base"]
    np.testing.assert_allclose(ex["shading"].astype(np.float64), 1.5 * scale, rtol=1e-3)
  # hypersim/depth stores the same image and depth.
  depth_only, _ = _read("hypersim/depth", "train", data_dir)
  for key, ex in depth_only.items():
    assert set(ex) == {"image", "depth", "key", "tfds_id"}
    np.testing.assert_array_equal(ex["depth"], train[key]["depth"])


def test_hypersim_reader_entries(hypersim_tree, data_dir):
  _, frames = hypersim_tree
  key = "ai_002_001/cam_00/frame.0000"
  src = frames[key]
  valid = (src["entity"] != -1) & np.isfinite(src["distance"])
  want = np.where(valid, _expected_planar("ai_002_001", np.nan_to_num(src["distance"])), 0.0)
  want = np.where(want < readers.HYPERSIM_MAX_DEPTH, want, 0.0)
  entry = readers.get("hypersim", task="depth", resolution=8, crop=H)
  assert entry["dataset"] == "hypersim/depth"
  ds, n = ip.get_eval_dataset(entry, ["depth"], 2, data_dir=str(data_dir), process_index=0,
                              process_count=1)
  batch = next(iter(tfds.as_numpy(ds)))
  assert n == 1 and batch["mask"].tolist() == [True, False]
  np.testing.assert_allclose(batch["label/depth"][0], want, rtol=1e-3)
  # Semantic and the others come from hypersim/all.
  semantic = readers.get("hypersim", task="semantic", resolution=8, crop=H)
  assert semantic["dataset"] == "hypersim/all"
  assert semantic["task_options"]["num_classes"] == 40
  assert semantic["task_options"]["categories"][0]["name"] == "wall"
  # Training, every task at once: random 12 x 12 crops resized to 8 x 8.
  tasks = ("depth", "semantic", "normals", "albedo", "shading")
  b = next(iter(tfds.as_numpy(ip.get_train_dataset(
      [entry] + [readers.get("hypersim", task=t, resolution=8, crop=H) for t in tasks[1:]],
      tasks, 20, data_dir=str(data_dir), process_index=0, process_count=1,
      shuffle_buffer=2))))
  assert b["image"].shape == (20, 8, 8, 3) and b["target"].shape == (20, 8, 8, 3)
  assert np.all(np.abs(b["target"]) <= 1.0) and set(b["task"].tolist()) == set(range(5))
  # Unknown depth (0) is left out of the loss.
  depth = b["task"] == 0
  np.testing.assert_array_equal(b["valid"][depth][..., 0],
                                np.all(b["target"][depth] > -1, axis=-1))
  normals = b["target"][b["task"] == 2]  # unit normals, or 0 where unknown
  length = np.linalg.norm(normals, axis=-1)
  assert np.all((np.abs(length - 1) < 2e-3) | (length == 0))
  with pytest.raises(errors.ConfigError, match="use config='all'"):
    readers.get("hypersim", task="normals", config="depth")


def test_vkitti2_values_in_the_released_layout(vkitti_tree, data_dir):
  _, frames = vkitti_tree
  train, builder = _read("vkitti2/all", "train", data_dir)
  val, _ = _read("vkitti2/all", "validation", data_dir)
  assert set(val) == {"Scene01/clone/Camera_0/00000"}  # Scene01 is held out
  assert set(train) == {k for k in frames if not k.startswith("Scene01")}
  assert builder.info.splits["train"].num_examples == 3
  classes = list(COLORS)[:-1]
  for key, ex in {**train, **val}.items():
    cm, names = frames[key]
    assert ex["image"].shape == (KH, KW, 3) and abs(ex["image"].mean() - 20) < 2
    # Centimetres / 100, sky (65535) unknown (0).
    want = np.where(cm == 65535, 0.0, cm / 100.0)
    np.testing.assert_allclose(ex["depth"].astype(np.float64), want, rtol=1e-3)
    assert np.all(ex["depth"][:2] == 0)
    labels = [255 if n == "Undefined" else classes.index(n) for n in names]
    np.testing.assert_array_equal(ex["semantic"].ravel(), labels)
  # The reader: metres in (1e-5, 80) m, the rest unknown.
  entry = readers.get("vkitti2", task="depth", resolution=8, crop=KH)
  ds, _ = ip.get_eval_dataset(entry, ["depth"], 1, data_dir=str(data_dir), process_index=0,
                              process_count=1)
  raw = next(iter(tfds.as_numpy(ds)))["label/depth"][0]
  cm = frames["Scene01/clone/Camera_0/00000"][0]
  want = np.where((cm == 65535) | (cm >= 8000), 0.0, cm / 100.0)
  np.testing.assert_allclose(raw, want, rtol=1e-3)
  assert np.all(raw[2, :5] == 0) and np.all(raw[3, :5] > 79.8)
  train_batch = next(iter(tfds.as_numpy(ip.get_train_dataset(
      [entry], ["depth"], 4, data_dir=str(data_dir), process_index=0, process_count=1,
      shuffle_buffer=2))))
  assert not train_batch["valid"][:, 0].any()  # the sky rows (top of every crop)
  semantic = readers.get("vkitti2", task="semantic", resolution=8, crop=KH)
  assert semantic["dataset"] == "vkitti2/all" and semantic["task_options"]["num_classes"] == 14


def test_marigold_mixture_samples_9_to_1(data_dir):
  entries = readers.marigold_depth_mixture(8, crops={"hypersim": H, "vkitti2": KH})
  assert [(e["dataset"], e["weight"]) for e in entries] == [("hypersim/depth", 0.9),
                                                            ("vkitti2/depth", 0.1)]
  assert all(e["task_options"]["affine_invariant"] for e in entries)
  batch = next(iter(tfds.as_numpy(ip.get_train_dataset(
      entries, ["depth"], 400, data_dir=str(data_dir), process_index=0, process_count=1,
      shuffle_buffer=2))))
  # Hypersim's tone-mapped images are mostly 204 (> 0 in [-1, 1]); our Virtual KITTI's are 20.
  vkitti_share = float(np.mean(batch["image"].mean(axis=(1, 2, 3)) < 0))
  assert 0.05 < vkitti_share < 0.16  # 0.1 +- 4 binomial standard deviations (n = 400)


@pytest.mark.parametrize("module", [marigold, onestep])
def test_real_configs_train_on_the_mixture_and_evaluate_on_nyu(module, data_dir, tmp_path):
  from dense_diffusion import train
  config = module.get_config("real=1")
  assert tuple(config.tasks) == ("depth",)
  assert [(e["dataset"], e["weight"]) for e in config.input.entries] == [
      ("hypersim/depth", 0.9), ("vkitti2/depth", 0.1)]
  assert [e["dataset"] for e in config.eval.entries] == ["nyu_depth_v2"]
  assert config.eval.entries[0]["task_options"]["affine_invariant"]
  # A run whose evaluation set is not prepared stops before training, naming it.
  config.input.data_dir = str(data_dir)
  with pytest.raises(errors.MissingError, match="nyu_depth_v2 is not prepared"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_missing_files_fail_or_skip(tmp_path):
  root = tmp_path / "raw"
  _hypersim_frame(root, "ai_001_001", 0, 1.0)
  _hypersim_frame(root, "ai_001_001", 1, 1.0)
  (root / "ai_001_001" / "images" / "scene_cam_00_geometry_hdf5" /
   "frame.0001.depth_meters.hdf5").unlink()
  # No CSVs: every frame is train, with the standard camera.
  with pytest.raises(common.BadExampleError,
                     match=r"'hypersim' split 'train' key 'ai_001_001/cam_00/frame.0001'.*missing"):
    _prepare("hypersim/depth", root, tmp_path / "data")
  builder = _prepare("hypersim/depth", root, tmp_path / "data2", on_bad_example="skip")
  assert builder.info.splits["train"].num_examples == 1
  # Virtual KITTI: an rgb frame without its depth is an error naming it.
  _save(tmp_path / "vk" / "Scene02/clone/frames/rgb/Camera_0/rgb_00000.jpg",
        np.zeros((KH, KW, 3), np.uint8))
  with pytest.raises(ValueError, match="have no depth file.*Scene02/clone/Camera_0/0"):
    _prepare("vkitti2/depth", tmp_path / "vk", tmp_path / "data3")
