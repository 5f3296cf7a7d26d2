"""Pure-numpy renderer of small synthetic indoor scenes with exact dense labels.

A room (floor, back wall, two side walls, ceiling: stuff) seen by a pinhole camera, with 2-6
objects (spheres, boxes, cylinders, cones: things) of random pose, size and albedo (flat colours
or procedural stripes / checkers), lit by one directional light plus ambient light, Lambertian,
with cast shadows from the objects. Everything is vectorised ray casting over all pixels; the only
Python loops run over the few surfaces of a scene.

Geometry conventions (all exact, see docs/data.md):
- Camera coordinates: x right, y down, z forward (the optical axis). Pixel (row i, column j) has
  its centre at (u, v) = (j + 0.5, i + 0.5); the ray through it is
  d_cam = ((u - cx) / f, (v - cy) / f, 1), so the ray parameter t of a hit IS its z-depth.
- `depth` is z-depth along the optical axis in metres (not the Euclidean distance to the camera).
- `normals` are unit vectors in camera coordinates facing the camera (n . d_cam < 0).
- World coordinates share the camera centre and x axis; the camera is pitched down by `pitch`
  radians: d_world = R_x(pitch) d_cam. World y points down, so the floor is the plane y = +h.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dense_diffusion.datasets.synthetic_scenes import matte

# Stuff first, then things; `semantic` holds the index into this tuple.
CLASS_NAMES = ("floor", "wall", "ceiling", "sphere", "box", "cylinder", "cone")
THING_CLASSES = ("sphere", "box", "cylinder", "cone")
NUM_CLASSES = len(CLASS_NAMES)
# Panoptic categories (COCO panoptic style): category id = class index + 1.
CATEGORIES = tuple(
    {"id": i + 1, "name": n, "isthing": int(n in THING_CLASSES)} for i, n in enumerate(CLASS_NAMES))

_INF = np.float32(np.inf)


@dataclasses.dataclass(frozen=True)
class Camera:
  """Pinhole camera: focal length and principal point in pixels, pitch (down) in radians."""
  focal: float
  cx: float
  cy: float
  pitch: float
  resolution: int

  @property
  def rotation(self) -> np.ndarray:
    """f32[3, 3] camera -> world rotation (about the x axis, looking down for pitch > 0)."""
    c, s = np.cos(self.pitch), np.sin(self.pitch)
    # y down: pitching down turns +z towards +y.
    return np.array([[1, 0, 0], [0, c, s], [0, -s, c]], np.float64)

  def rays(self) -> np.ndarray:
    """f64[R*R, 3] camera-coordinate rays with z = 1, row-major over pixels."""
    r = self.resolution
    v, u = np.meshgrid(np.arange(r) + 0.5, np.arange(r) + 0.5, indexing="ij")
    d = np.stack([(u - self.cx) / self.focal, (v - self.cy) / self.focal, np.ones_like(u)], -1)
    return d.reshape(-1, 3)


# ----------------------------------------------------------------------------------------------
# Ray-surface intersections. Each takes origins o[N, 3] (or [3]) and directions d[N, 3] in world
# coordinates and returns (t[N] with inf where missed, unit normal n[N, 3]); only t > eps counts.
_EPS = 1e-6


def _plane(o, d, normal, offset):
  """Plane {p : normal . p = offset}; the returned normal faces the ray."""
  normal = np.asarray(normal, np.float64)
  denom = d @ normal
  with np.errstate(divide="ignore", invalid="ignore"):
    t = (offset - (o @ normal if np.ndim(o) > 1 else np.dot(o, normal))) / denom
  t = np.where((t > _EPS) & np.isfinite(t), t, np.inf)
  n = np.broadcast_to(normal, d.shape) * np.where(denom > 0, -1.0, 1.0)[:, None]
  return t, n


def _sphere(o, d, center, radius):
  oc = o - center
  a = np.sum(d * d, -1)
  b = np.sum(oc * d, -1)
  c = np.sum(oc * oc, -1) - radius**2
  disc = b * b - a * c
  sq = np.sqrt(np.maximum(disc, 0.0))
  t0, t1 = (-b - sq) / a, (-b + sq) / a
  t = np.where(t0 > _EPS, t0, np.where(t1 > _EPS, t1, np.inf))
  t = np.where(disc >= 0, t, np.inf)
  p = o + np.where(np.isfinite(t), t, 0.0)[:, None] * d
  return t, (p - center) / radius


def _yaw(angle):
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], np.float64)


def _box(o, d, center, half, yaw):
  """Box with half extents `half`, rotated by `yaw` about the vertical (y) axis."""
  rot = _yaw(yaw)  # local -> world
  ol = (o - center) @ rot  # world -> local: x_local = R^T x
  dl = d @ rot
  with np.errstate(divide="ignore", invalid="ignore"):
    inv = 1.0 / dl
    t1 = (-half - ol) * inv
    t2 = (half - ol) * inv
  t1 = np.where(np.isnan(t1), -np.inf, t1)
  t2 = np.where(np.isnan(t2), np.inf, t2)
  tmin, tmax = np.minimum(t1, t2), np.maximum(t1, t2)
  t_near = tmin.max(-1)
  t_far = tmax.min(-1)
  hit = (t_near <= t_far) & (t_far > _EPS)
  t = np.where(hit, np.where(t_near > _EPS, t_near, t_far), np.inf)
  axis = np.where(t_near > _EPS, tmin.argmax(-1), tmax.argmin(-1))
  nl = np.zeros_like(dl)
  idx = np.arange(len(dl))
  nl[idx, axis] = -np.sign(dl[idx, axis])
  return t, nl @ rot.T


def _cylinder(o, d, base, radius, height):
  """Vertical cylinder standing on the floor point `base` (y down: top at base_y - height)."""
  ox, oz = o[..., 0] - base[0], o[..., 2] - base[2]
  dx, dz = d[:, 0], d[:, 2]
  a = dx * dx + dz * dz
  b = ox * dx + oz * dz
  c = ox * ox + oz * oz - radius**2
  disc = b * b - a * c
  sq = np.sqrt(np.maximum(disc, 0.0))
  with np.errstate(divide="ignore", invalid="ignore"):
    roots = [(-b - sq) / a, (-b + sq) / a]
  t_side = np.full(len(d), np.inf)
  oy = o[..., 1] if np.ndim(o) > 1 else o[1]
  for t_r in roots[::-1]:
    y = oy + t_r * d[:, 1]
    ok = (disc >= 0) & (a > 0) & (t_r > _EPS) & (y <= base[1]) & (y >= base[1] - height)
    t_side = np.where(ok, t_r, t_side)
  p = o + np.where(np.isfinite(t_side), t_side, 0.0)[:, None] * d
  n_side = np.stack([p[:, 0] - base[0], np.zeros(len(d)), p[:, 2] - base[2]], -1) / radius
  # Top cap.
  with np.errstate(divide="ignore", invalid="ignore"):
    t_cap = (base[1] - height - oy) / d[:, 1]
  pc = o + np.where(np.isfinite(t_cap), t_cap, 0.0)[:, None] * d
  in_cap = (pc[:, 0] - base[0]) ** 2 + (pc[:, 2] - base[2]) ** 2 <= radius**2
  t_cap = np.where((t_cap > _EPS) & in_cap & np.isfinite(t_cap), t_cap, np.inf)
  n_cap = np.broadcast_to(np.array([0.0, -1.0, 0.0]), d.shape)
  use_cap = t_cap < t_side
  return np.where(use_cap, t_cap, t_side), np.where(use_cap[:, None], n_cap, n_side)


def _cone(o, d, base, radius, height):
  """Vertical cone on the floor point `base`, apex at height `height` above it."""
  k = (radius / height) ** 2
  apex = np.array([base[0], base[1] - height, base[2]])
  q = o - apex  # q_y >= 0 inside the cone's extent (y grows downwards from the apex)
  qx, qy, qz = (q[..., 0], q[..., 1], q[..., 2])
  dx, dy, dz = d[:, 0], d[:, 1], d[:, 2]
  # x^2 + z^2 = k y^2
  a = dx * dx + dz * dz - k * dy * dy
  b = qx * dx + qz * dz - k * qy * dy
  c = qx * qx + qz * qz - k * qy * qy
  disc = b * b - a * c
  sq = np.sqrt(np.maximum(disc, 0.0))
  with np.errstate(divide="ignore", invalid="ignore"):
    roots = [(-b - sq) / a, (-b + sq) / a]
  t = np.full(len(d), np.inf)
  for t_r in roots:
    y = qy + t_r * dy
    ok = (disc >= 0) & (t_r > _EPS) & (y >= 0) & (y <= height) & np.isfinite(t_r)
    t = np.where(ok & (t_r < t), t_r, t)
  p = q + np.where(np.isfinite(t), t, 0.0)[:, None] * d
  n = np.stack([p[:, 0], -k * p[:, 1], p[:, 2]], -1)
  n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
  return t, n


_INTERSECT = {"sphere": _sphere, "box": _box, "cylinder": _cylinder, "cone": _cone}


# ----------------------------------------------------------------------------------------------
# Scene sampling.
def _random_colour(rng):
  return rng.uniform(0.15, 0.95, size=3)


def _texture(rng):
  """A procedural texture: flat, stripes or checkers with two colours and a period in metres."""
  kind = rng.choice(["flat", "stripes", "checkers"], p=[0.4, 0.3, 0.3])
  return {"kind": str(kind), "c0": _random_colour(rng), "c1": _random_colour(rng),
          "period": float(rng.uniform(0.15, 0.5)), "angle": float(rng.uniform(0, np.pi))}


def _apply_texture(tex, p):
  """Albedo f64[N, 3] in [0, 1] of a texture at world points p[N, 3]."""
  if tex["kind"] == "flat":
    return np.broadcast_to(tex["c0"], p.shape)
  ca, sa = np.cos(tex["angle"]), np.sin(tex["angle"])
  s = (ca * p[:, 0] + sa * p[:, 2] + 0.7 * p[:, 1]) / tex["period"]
  if tex["kind"] == "stripes":
    sel = np.floor(s).astype(np.int64) % 2
  else:
    s2 = (-sa * p[:, 0] + ca * p[:, 2] - 0.7 * p[:, 1]) / tex["period"]
    sel = (np.floor(s).astype(np.int64) + np.floor(s2).astype(np.int64)) % 2
  return np.where(sel[:, None] == 0, tex["c0"], tex["c1"])


def sample_scene(rng: np.random.Generator, resolution: int) -> dict[str, Any]:
  """Draws the parameters of a scene (camera, room, objects, light) as plain python/numpy data."""
  fov = rng.uniform(np.deg2rad(50), np.deg2rad(65))
  focal = resolution / (2 * np.tan(fov / 2))
  camera = Camera(focal=float(focal), cx=resolution / 2, cy=resolution / 2,
                  pitch=float(rng.uniform(np.deg2rad(12), np.deg2rad(28))), resolution=resolution)
  cam_height = rng.uniform(1.2, 1.7)
  room = {"floor_y": cam_height, "ceiling_y": cam_height - rng.uniform(2.5, 3.2),
          "back_z": rng.uniform(4.5, 7.0), "left_x": -rng.uniform(2.0, 3.5),
          "right_x": rng.uniform(2.0, 3.5)}
  objects = []
  for _ in range(int(rng.integers(2, 7))):
    kind = str(rng.choice(THING_CLASSES))
    size = rng.uniform(0.3, 0.7)
    z = rng.uniform(2.2, min(room["back_z"] - 0.8, 4.5))
    x_lim = 0.45 * z * resolution / focal  # stay roughly inside the view
    x = rng.uniform(max(room["left_x"] + 0.7, -x_lim), min(room["right_x"] - 0.7, x_lim))
    base = np.array([x, room["floor_y"], z])
    if kind == "sphere":
      params = {"center": base - np.array([0, size, 0]), "radius": size}
    elif kind == "box":
      half = np.array([size * rng.uniform(0.6, 1.2), size * rng.uniform(0.5, 1.3),
                       size * rng.uniform(0.6, 1.2)])
      params = {"center": base - np.array([0, half[1], 0]), "half": half,
                "yaw": rng.uniform(0, np.pi / 2)}
    else:
      params = {"base": base, "radius": size * rng.uniform(0.6, 1.0),
                "height": size * rng.uniform(1.5, 3.0)}
    objects.append({"kind": kind, "params": params, "texture": _texture(rng)})
  light = np.array([rng.uniform(-0.6, 0.6), 1.0, rng.uniform(0.1, 0.8)])  # towards +y (down)
  light /= np.linalg.norm(light)
  return {"camera": camera, "room": room, "objects": objects, "light_dir": light,
          "ambient": float(rng.uniform(0.2, 0.4)),
          "stuff_textures": {"floor": _texture(rng), "wall": _texture(rng),
                             "ceiling": {"kind": "flat", "c0": rng.uniform(0.7, 0.95, 3)}}}


def _room_surfaces(room):
  """(class name, plane normal, offset) of the room's planes."""
  return [("floor", (0, 1, 0), room["floor_y"]), ("ceiling", (0, 1, 0), room["ceiling_y"]),
          ("wall", (0, 0, 1), room["back_z"]), ("wall", (1, 0, 0), room["left_x"]),
          ("wall", (1, 0, 0), room["right_x"])]


def _intersect_object(obj, o, d):
  return _INTERSECT[obj["kind"]](o, d, **obj["params"])


# ----------------------------------------------------------------------------------------------
# Degradations for the restoration tasks.
def add_noise(rng, image01, peak=None, sigma=None):
  """Poisson (shot) + Gaussian (read) noise on f[H, W, 3] in [0, 1] -> uint8.

  Shot noise uses its Gaussian approximation, variance x / peak (the Poisson-Gaussian model of
  camera noise; `peak` >= 20 photons keeps the approximation close), which is 10x cheaper than
  drawing Poisson samples.
  """
  peak = rng.uniform(20, 100) if peak is None else peak
  sigma = rng.uniform(0.01, 0.05) if sigma is None else sigma
  std = np.sqrt(image01 / peak + sigma**2)
  return to_uint8(image01 + std * rng.standard_normal(image01.shape))


def add_rain(rng, image01):
  """Rendered rain streaks: N straight bright segments of one random slant, alpha-blended."""
  h, w = image01.shape[:2]
  n = int(rng.integers(h * w // 150, h * w // 60 + 1))
  angle = rng.uniform(-0.35, 0.35)  # radians from vertical
  length = rng.uniform(0.06, 0.15) * h
  starts = rng.uniform([-0.2 * h, 0], [h, w], size=(n, 2))
  s = np.linspace(0.0, 1.0, max(int(length) * 2, 2))
  rows = starts[:, None, 0] + s[None] * length * np.cos(angle)
  cols = starts[:, None, 1] + s[None] * length * np.sin(angle)
  rows, cols = np.round(rows).astype(np.int64).ravel(), np.round(cols).astype(np.int64).ravel()
  ok = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
  mask = np.zeros((h, w))
  alpha = np.repeat(rng.uniform(0.3, 0.8, n), len(s))
  np.maximum.at(mask, (rows[ok], cols[ok]), alpha[ok])
  rain = image01 * (1 - mask[..., None]) + mask[..., None] * 0.92
  return to_uint8(rain)


def add_low_light(rng, image01):
  """Low light: scale down, gamma > 1 darkens mid-tones, then shot + read noise (as add_noise)."""
  scale = rng.uniform(0.08, 0.3)
  gamma = rng.uniform(1.2, 2.0)
  dark = scale * image01**gamma
  peak = rng.uniform(150, 400)
  std = np.sqrt(dark / peak + 0.005**2)
  return to_uint8(dark + std * rng.standard_normal(image01.shape))


def to_uint8(x01):
  return np.round(np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
def render_scene(rng_or_seed: np.random.Generator | int | Any, resolution: int) -> dict[str, Any]:
  """Renders one random scene.

  Args:
    rng_or_seed: a numpy Generator, or anything `np.random.default_rng` accepts (an int or a
      sequence of ints such as (seed, split, index)).
    resolution: output height = width R in pixels.

  Returns:
    A dict of numpy arrays:
      image u8[R, R, 3] = round(255 * albedo / 255 * shading); albedo u8[R, R, 3];
      shading f32[R, R] in [0, 1]; depth f32[R, R] metres (z-depth); normals f32[R, R, 3] unit,
      camera coordinates; points f32[R, R, 3] camera-coordinate hit points; semantic i32[R, R]
      (index into CLASS_NAMES); instance i32[R, R] (0 = stuff, 1..n = thing objects in order);
      panoptic_ids i32[R, R] segment ids (stuff segments first, then things);
      segments: list of {id, category_id, isthing, iscrowd}; noisy, rainy, dark u8[R, R, 3];
      composite u8[R, R, 3] (a foreground object over the image), its alpha f32[R, R] in
      [0, 1], mask bool[R, R] (alpha >= 0.5) and foreground colour f32[R, R, 3] (matte.py);
      intrinsics f32[3] (focal, cx, cy) and pitch f32 (for checks).
  """
  rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(
      rng_or_seed)
  scene = sample_scene(rng, resolution)
  cam = scene["camera"]
  rot = cam.rotation
  d_cam = cam.rays()
  d = d_cam @ rot.T  # world directions; t is still z-depth
  o = np.zeros(3)
  n_pix = len(d)

  # Z-buffer over room planes then objects.
  best_t = np.full(n_pix, np.inf)
  best_n = np.zeros((n_pix, 3))
  best_surf = np.full(n_pix, -1, np.int64)
  surfaces = []  # (class name, instance id (0 = stuff), texture)
  for name, normal, offset in _room_surfaces(scene["room"]):
    t, n = _plane(o, d, normal, offset)
    closer = t < best_t
    best_t = np.where(closer, t, best_t)
    best_n = np.where(closer[:, None], n, best_n)
    best_surf = np.where(closer, len(surfaces), best_surf)
    surfaces.append((name, 0, scene["stuff_textures"][name]))
  for inst, obj in enumerate(scene["objects"], start=1):
    t, n = _intersect_object(obj, o, d)
    closer = t < best_t
    best_t = np.where(closer, t, best_t)
    best_n = np.where(closer[:, None], n, best_n)
    best_surf = np.where(closer, len(surfaces), best_surf)
    surfaces.append((obj["kind"], inst, obj["texture"]))
  if not np.all(np.isfinite(best_t)):
    raise RuntimeError("a camera ray escaped the closed room; scene sampling is broken")

  points = o + best_t[:, None] * d
  albedo = np.zeros((n_pix, 3))
  semantic = np.zeros(n_pix, np.int32)
  instance = np.zeros(n_pix, np.int32)
  for s, (name, inst, tex) in enumerate(surfaces):
    sel = best_surf == s
    if not sel.any():
      continue
    albedo[sel] = _apply_texture(tex, points[sel])
    semantic[sel] = CLASS_NAMES.index(name)
    instance[sel] = inst

  # Lambertian shading with cast shadows from the objects (the light is directional).
  to_light = -scene["light_dir"]
  lambert = np.maximum(best_n @ to_light, 0.0)
  lit = lambert > 0
  origins = points[lit] + 1e-4 * best_n[lit]
  shadow = np.zeros(lit.sum(), bool)
  for obj in scene["objects"]:
    t, _ = _intersect_object(obj, origins, np.broadcast_to(to_light, origins.shape))
    shadow |= np.isfinite(t)
  lambert[np.flatnonzero(lit)[shadow]] = 0.0
  ambient = scene["ambient"]
  shading = (ambient + (1.0 - ambient) * lambert).astype(np.float32)

  r = resolution
  albedo_u8 = to_uint8(albedo).reshape(r, r, 3)
  shading = shading.reshape(r, r)
  image01 = albedo_u8.astype(np.float32) / 255.0 * shading[..., None]
  image = to_uint8(image01)
  image01 = image.astype(np.float64) / 255.0
  normals_cam = (best_n @ rot).reshape(r, r, 3)  # world -> camera: R^T n
  normals_cam /= np.linalg.norm(normals_cam, axis=-1, keepdims=True)
  points_cam = (points @ rot).reshape(r, r, 3)

  # Panoptic: one segment per stuff class present, then one per thing instance.
  semantic = semantic.reshape(r, r)
  instance = instance.reshape(r, r)
  panoptic_ids = np.zeros((r, r), np.int32)
  segments = []
  for c, name in enumerate(CLASS_NAMES):
    if name in THING_CLASSES:
      continue
    sel = semantic == c
    if sel.any():
      segments.append({"id": len(segments) + 1, "category_id": c + 1, "isthing": 0,
                       "iscrowd": 0})
      panoptic_ids[sel] = segments[-1]["id"]
  for inst in range(1, len(scene["objects"]) + 1):
    sel = instance == inst
    if sel.any():
      c = int(semantic[sel][0])
      segments.append({"id": len(segments) + 1, "category_id": c + 1, "isthing": 1,
                       "iscrowd": 0})
      panoptic_ids[sel] = segments[-1]["id"]
  # Renumber instances to the visible ones, 1..n in object order.
  visible = [i for i in range(1, len(scene["objects"]) + 1) if (instance == i).any()]
  lut = np.zeros(len(scene["objects"]) + 1, np.int32)
  lut[visible] = np.arange(1, len(visible) + 1)
  instance = lut[instance]

  # The degradations draw from `rng` in this order, then the matting layer (matte.py): adding
  # a later draw leaves every earlier feature of a scene unchanged.
  noisy, rainy, dark = add_noise(rng, image01), add_rain(rng, image01), add_low_light(rng, image01)
  layer = matte.composite_layer(rng, image)
  return {
      "image": image,
      "albedo": albedo_u8,
      "shading": shading,
      "depth": best_t.reshape(r, r).astype(np.float32),
      "normals": normals_cam.astype(np.float32),
      "points": points_cam.astype(np.float32),
      "semantic": semantic,
      "instance": instance,
      "panoptic_ids": panoptic_ids,
      "segments": segments,
      "noisy": noisy,
      "rainy": rainy,
      "dark": dark,
      "composite": layer["composite"],
      "alpha": layer["alpha"],
      "mask": layer["mask"],
      "foreground": layer["foreground"],
      "intrinsics": np.array([cam.focal, cam.cx, cam.cy], np.float32),
      "pitch": np.float32(cam.pitch),
      "room": {k: np.float32(v) for k, v in scene["room"].items()},
      "objects": scene["objects"],
  }


def label_features(scene: dict[str, Any]) -> dict[str, Any]:
  """A rendered scene with its panoptic segments also as arrays, the layout of the label
  features of evaluation examples: `panoptic_ids` and, per segment, `segment_id`,
  `category_id`, `iscrowd` (i32[n])."""
  segments = scene["segments"]
  column = lambda k: np.array([int(s[k]) for s in segments], np.int32)
  return {**scene, "segment_id": column("id"), "category_id": column("category_id"),
          "iscrowd": column("iscrowd")}
