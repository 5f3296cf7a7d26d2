"""Exact geometric and photometric relations of the synthetic_scenes renderer and builder."""
import numpy as np
import pytest

from dense_diffusion.datasets.synthetic_scenes import renderer

SEEDS = [(0, 0, i) for i in range(12)]
RES = 48


@pytest.fixture(scope="module")
def scenes():
  return [renderer.render_scene(s, RES) for s in SEEDS]


def _cam_to_world(pitch):
  # Written out independently of the renderer: the camera looks down by `pitch` (y down).
  c, s = np.cos(pitch), np.sin(pitch)
  return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])


def _backproject(ex):
  """Camera-coordinate points from depth and intrinsics: X = (u - cx) z / f, Y = (v - cy) z / f."""
  f, cx, cy = ex["intrinsics"].astype(np.float64)
  v, u = np.meshgrid(np.arange(RES) + 0.5, np.arange(RES) + 0.5, indexing="ij")
  z = ex["depth"].astype(np.float64)
  return np.stack([(u - cx) * z / f, (v - cy) * z / f, z], -1)


def test_image_is_albedo_times_shading(scenes):
  for ex in scenes:
    assert ex["image"].dtype == np.uint8 and ex["albedo"].dtype == np.uint8
    recon = ex["albedo"].astype(np.float64) * ex["shading"][..., None]
    assert np.abs(recon - ex["image"]).max() <= 0.5 + 1e-3
    assert ex["shading"].min() >= 0 and ex["shading"].max() <= 1


def test_normals_unit_and_facing_camera(scenes):
  for ex in scenes:
    n = ex["normals"]
    np.testing.assert_allclose(np.linalg.norm(n, axis=-1), 1.0, atol=1e-5)
    p = _backproject(ex)
    assert np.all(np.sum(n * p, -1) < 1e-6), "every visible surface faces the camera"


def test_floor_pixels_backproject_onto_floor_plane(scenes):
  for ex in scenes:
    world = _backproject(ex) @ _cam_to_world(ex["pitch"]).T
    floor = ex["semantic"] == renderer.CLASS_NAMES.index("floor")
    assert floor.sum() > 0
    np.testing.assert_allclose(world[floor][:, 1], ex["room"]["floor_y"], atol=2e-4)
    # The floor normal is world "up" (-y), seen in camera coordinates.
    up_cam = _cam_to_world(ex["pitch"]).T @ np.array([0.0, -1.0, 0.0])
    np.testing.assert_allclose(ex["normals"][floor], np.broadcast_to(up_cam, (floor.sum(), 3)),
                               atol=1e-5)
    back = (ex["semantic"] == renderer.CLASS_NAMES.index("wall")) & np.isclose(
        world[..., 2], ex["room"]["back_z"], atol=2e-4)
    # Every wall pixel lies on one of the three wall planes.
    wall = ex["semantic"] == renderer.CLASS_NAMES.index("wall")
    on_side = (np.isclose(world[..., 0], ex["room"]["left_x"], atol=2e-4)
               | np.isclose(world[..., 0], ex["room"]["right_x"], atol=2e-4))
    assert np.all((back | on_side)[wall])


def test_sphere_pixels_lie_on_their_sphere(scenes):
  found = 0
  for ex in scenes:
    world = _backproject(ex) @ _cam_to_world(ex["pitch"]).T
    sphere_pix = ex["semantic"] == renderer.CLASS_NAMES.index("sphere")
    spheres = [o["params"] for o in ex["objects"] if o["kind"] == "sphere"]
    if not sphere_pix.any():
      continue
    found += 1
    p = world[sphere_pix]
    err = np.stack([np.abs(np.linalg.norm(p - s["center"], axis=-1) - s["radius"])
                    for s in spheres])
    assert err.min(0).max() < 1e-3, "every sphere pixel is on some sphere's surface"
    # Its normal is the radial direction of that sphere.
    own = err.argmin(0)
    centers = np.stack([s["center"] for s in spheres])[own]
    radii = np.array([s["radius"] for s in spheres])[own]
    n_world = ex["normals"][sphere_pix] @ _cam_to_world(ex["pitch"]).T
    np.testing.assert_allclose(n_world, (p - centers) / radii[:, None], atol=2e-3)
  assert found > 0


def test_instances_semantics_and_panoptic_consistent(scenes):
  thing_ids = [renderer.CLASS_NAMES.index(n) for n in renderer.THING_CLASSES]
  for ex in scenes:
    sem, inst, ids = ex["semantic"], ex["instance"], ex["panoptic_ids"]
    assert sem.min() >= 0 and sem.max() < renderer.NUM_CLASSES
    is_thing = np.isin(sem, thing_ids)
    assert np.array_equal(inst > 0, is_thing)
    for i in np.unique(inst[inst > 0]):
      assert len(np.unique(sem[inst == i])) == 1, "one category per instance"
    assert set(np.unique(inst)) == set(range(int(inst.max()) + 1)), "instances numbered 1..n"
    assert ids.min() >= 1, "no void in a closed room"
    seg_by_id = {s["id"]: s for s in ex["segments"]}
    assert set(np.unique(ids)) == set(seg_by_id)
    for sid, seg in seg_by_id.items():
      m = ids == sid
      cats = np.unique(sem[m]) + 1
      assert list(cats) == [seg["category_id"]]
      assert seg["isthing"] == int(renderer.CATEGORIES[seg["category_id"] - 1]["isthing"])
      assert seg["iscrowd"] == 0
      if seg["isthing"]:
        assert len(np.unique(inst[m])) == 1 and inst[m][0] > 0


def test_degraded_inputs_differ_and_dark_is_dark(scenes):
  for ex in scenes:
    for k in ("noisy", "rainy", "dark"):
      assert ex[k].shape == ex["image"].shape and ex[k].dtype == np.uint8
      assert not np.array_equal(ex[k], ex["image"])
    assert ex["dark"].mean() < 0.5 * ex["image"].mean()
    assert (ex["rainy"].astype(int) >= ex["image"].astype(int) - 255).all()


def test_deterministic_for_a_seed():
  a, b = renderer.render_scene((3, 1, 7), 32), renderer.render_scene((3, 1, 7), 32)
  c = renderer.render_scene((3, 1, 8), 32)
  for k in ("image", "depth", "normals", "semantic", "noisy", "rainy", "dark"):
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])


def test_tfds_builder_matches_renderer(tmp_path):
  import tensorflow_datasets as tfds
  from dense_diffusion.datasets import synthetic_scenes
  cfg = synthetic_scenes.SyntheticScenesConfig(name="t", resolution=32, num_train=4,
                                               num_validation=2, seed=5, num_workers=2)
  builder = tfds.builder("synthetic_scenes", config=cfg, data_dir=str(tmp_path))
  builder.download_and_prepare()
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.splits["validation"].num_examples == 2
  got = {ex["key"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="validation"))}
  for index in range(2):
    ref = renderer.render_scene((5, 1, index), 32)
    ex = got[f"validation_{index:06d}"]
    for k in ("image", "depth", "normals", "semantic", "instance", "noisy", "albedo",
              "composite", "alpha", "mask"):
      np.testing.assert_array_equal(ex[k], ref[k])
    np.testing.assert_array_equal(ex["panoptic"]["ids"], ref["panoptic_ids"])
    np.testing.assert_array_equal(ex["panoptic"]["segments"]["category_id"],
                                  [s["category_id"] for s in ref["segments"]])


def _on_surface(kind, params, p, tol=1e-3):
  """Whether world points p[N, 3] lie on the surface of the object (written from its definition)."""
  if kind == "sphere":
    return np.abs(np.linalg.norm(p - params["center"], axis=-1) - params["radius"]) < tol
  if kind == "box":
    c, s = np.cos(params["yaw"]), np.sin(params["yaw"])
    rot = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    local = (p - params["center"]) @ rot
    excess = np.abs(local) - params["half"]
    return (np.abs(excess.max(-1)) < tol)
  base, r, h = params["base"], params["radius"], params["height"]
  radial = np.hypot(p[:, 0] - base[0], p[:, 2] - base[2])
  above = base[1] - p[:, 1]  # height above the floor (y down)
  inside_h = (above > -tol) & (above < h + tol)
  if kind == "cylinder":
    side = (np.abs(radial - r) < tol) & inside_h
    cap = (np.abs(above - h) < tol) & (radial < r + tol)
    return side | cap
  if kind == "cone":
    return (np.abs(radial - r * (h - above) / h) < tol) & inside_h
  raise ValueError(kind)


def test_every_thing_pixel_lies_on_an_object_of_its_class(scenes):
  for ex in scenes:
    world = _backproject(ex) @ _cam_to_world(ex["pitch"]).T
    for c, name in enumerate(renderer.CLASS_NAMES):
      if name not in renderer.THING_CLASSES:
        continue
      sel = ex["semantic"] == c
      if not sel.any():
        continue
      on_any = np.zeros(sel.sum(), bool)
      for obj in ex["objects"]:
        if obj["kind"] == name:
          on_any |= _on_surface(name, obj["params"], world[sel])
      assert on_any.all(), f"{name}: {np.sum(~on_any)} pixels off every {name}"
