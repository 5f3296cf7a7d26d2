"""Image ops: decode, resize, value_range and joint (image + labels) crops and flips.

Random ops take their randomness from the example's `_rng` (int64[2], set per example by the
input pipeline from (seed, example index)), so a pipeline is deterministic for a seed; one random
draw is shared by all `keys` of an op, so labels stay aligned with the image.
"""
from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from dense_diffusion.pp.registry import register

_METHODS = ("nearest", "bilinear", "bicubic", "area")


def _keys(key, keys):
  if keys is None:
    return (key,)
  return (keys,) if isinstance(keys, str) else tuple(keys)


def _size(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  if len(size) != 2:
    raise ValueError(f"size must be an int or (height, width), got {size}")
  return int(size[0]), int(size[1])


def op_seed(data: dict, salt: int) -> tf.Tensor:
  """A stateless seed int64[2] for one op: the example's `_rng` folded with the op's salt."""
  if "_rng" in data:
    seed = tf.cast(data["_rng"], tf.int64)
  else:  # Outside the input pipeline: a fresh (non-reproducible) seed.
    seed = tf.random.uniform([2], maxval=2**31 - 1, dtype=tf.int64)
  return tf.random.experimental.stateless_fold_in(seed, salt)


def spatial_shape(x: tf.Tensor) -> tf.Tensor:
  return tf.shape(x)[:2]


def _assert_same_size(data, keys, op):
  ref = spatial_shape(data[keys[0]])
  checks = [tf.debugging.assert_equal(
      spatial_shape(data[k]), ref,
      message=f"{op}: {k} and {keys[0]} have different height/width") for k in keys[1:]]
  return checks


@register("decode")
def get_decode(key: str = "image", channels: int = 3):
  """Decodes PNG/JPEG bytes in data[key] to uint8 [H, W, channels]; decoded tensors pass through."""
  def _decode(data):
    x = data[key]
    if x.dtype == tf.string:
      x = tf.io.decode_image(x, channels=channels, expand_animations=False)
      x.set_shape([None, None, channels])
    return {**data, key: x}
  return _decode


@register("resize")
def get_resize(size, key: str = "image", method: str = "bilinear",
               keys: Sequence[str] | None = None, antialias: bool = False):
  """Resizes [H, W] or [H, W, C] tensors to `size`.

  Use method="nearest" for labels (class ids, instance ids, depth with invalid zeros, normals):
  it keeps the dtype and never mixes values. "bilinear" / "bicubic" / "area" return float32.
  """
  if method not in _METHODS:
    raise ValueError(f"resize method {method!r} not in {_METHODS}")
  hw = _size(size)

  def _resize(data):
    data = dict(data)
    for k in _keys(key, keys):
      x = data[k]
      rank2 = x.shape.rank == 2
      if rank2:
        x = x[..., None]
      if method == "nearest":
        y = tf.image.resize(x, hw, method="nearest")
        y = tf.cast(y, x.dtype)
      else:
        if x.dtype.is_integer and x.dtype != tf.uint8:
          raise ValueError(f"resize({method}) of integer labels {k!r} mixes ids; use nearest")
        y = tf.image.resize(tf.cast(x, tf.float32), hw, method=method, antialias=antialias)
      data[k] = y[..., 0] if rank2 else y
    return data
  return _resize


@register("value_range")
def get_value_range(vmin: float = -1.0, vmax: float = 1.0, in_min: float = 0.0,
                    in_max: float = 255.0, key: str = "image", clip: bool = False):
  """Maps data[key] linearly from [in_min, in_max] to [vmin, vmax] as float32."""
  def _value_range(data):
    x = (tf.cast(data[key], tf.float32) - in_min) / (in_max - in_min)
    x = vmin + x * (vmax - vmin)
    if clip:
      x = tf.clip_by_value(x, min(vmin, vmax), max(vmin, vmax))
    return {**data, key: x}
  return _value_range


@register("random_crop")
def get_random_crop(size, keys: Sequence[str] = ("image",)):
  """Crops the same random `size` window from every key (all must share height/width)."""
  h, w = _size(size)
  keys = _keys(None, keys)

  def _crop(data):
    data = dict(data)
    with tf.control_dependencies(_assert_same_size(data, keys, "random_crop")):
      shape = spatial_shape(data[keys[0]])
    tf.debugging.assert_greater_equal(shape, tf.constant([h, w]),
                                      message=f"random_crop({h}, {w}) is larger than the image")
    seed = op_seed(data, 1)
    y0 = tf.random.stateless_uniform([], seed, 0, shape[0] - h + 1, dtype=tf.int32)
    x0 = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1), 0,
                                     shape[1] - w + 1, dtype=tf.int32)
    for k in keys:
      data[k] = data[k][y0:y0 + h, x0:x0 + w]
    return data
  return _crop


@register("random_square_crop")
def get_random_square_crop(keys: Sequence[str] = ("image",)):
  """Crops the same random square window, as wide as the shorter side, from every key (all must
  share height/width): images of any size and aspect ratio keep as much of themselves as a
  square holds, undistorted (then `resize` brings them to one size)."""
  keys = _keys(None, keys)

  def _crop(data):
    data = dict(data)
    with tf.control_dependencies(_assert_same_size(data, keys, "random_square_crop")):
      shape = spatial_shape(data[keys[0]])
    side = tf.reduce_min(shape)
    seed = op_seed(data, 3)
    y0 = tf.random.stateless_uniform([], seed, 0, shape[0] - side + 1, dtype=tf.int32)
    x0 = tf.random.stateless_uniform([], tf.random.experimental.stateless_fold_in(seed, 1), 0,
                                     shape[1] - side + 1, dtype=tf.int32)
    for k in keys:
      data[k] = data[k][y0:y0 + side, x0:x0 + side]
    return data
  return _crop


@register("central_crop")
def get_central_crop(size, keys: Sequence[str] = ("image",)):
  """Crops the central `size` window of every key."""
  h, w = _size(size)
  keys = _keys(None, keys)

  def _crop(data):
    data = dict(data)
    shape = spatial_shape(data[keys[0]])
    y0, x0 = (shape[0] - h) // 2, (shape[1] - w) // 2
    for k in keys:
      data[k] = data[k][y0:y0 + h, x0:x0 + w]
    return data
  return _crop


@register("random_flip")
def get_random_flip(keys: Sequence[str] = ("image",), normals_keys: Sequence[str] = ()):
  """Flips all `keys` left-right together with probability 1/2.

  `normals_keys` are flipped too and their x component (channel 0, camera x = right) negated,
  so that flipped normals still describe the flipped surface.
  """
  keys, normals_keys = _keys(None, keys), _keys(None, normals_keys) if normals_keys else ()

  def _flip(data):
    data = dict(data)
    flip = tf.random.stateless_uniform([], op_seed(data, 2)) < 0.5
    for k in keys + tuple(normals_keys):
      x = data[k]
      flipped = tf.reverse(x, axis=[1])
      if k in normals_keys:
        flipped = tf.concat([-flipped[..., :1], flipped[..., 1:]], axis=-1)
      data[k] = tf.cond(flip, lambda f=flipped: f, lambda x=x: x)
    return data
  return _flip
