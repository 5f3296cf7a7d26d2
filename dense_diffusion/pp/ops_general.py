"""General ops: keep / drop / copy / rename / cast / squeeze."""
from __future__ import annotations

import tensorflow as tf

from dense_diffusion.pp.registry import register


@register("keep")
def get_keep(*keys: str):
  """Keeps only `keys` (plus the internal `_rng` seed); missing keys raise."""
  def _keep(data):
    missing = [k for k in keys if k not in data]
    if missing:
      raise KeyError(f"keep: keys {missing} not in example (has {sorted(data)})")
    return {k: v for k, v in data.items() if k in keys or k == "_rng"}
  return _keep


@register("drop")
def get_drop(*keys: str):
  """Removes `keys` (absent keys are ignored)."""
  def _drop(data):
    return {k: v for k, v in data.items() if k not in keys}
  return _drop


@register("copy")
def get_copy(inkey: str, outkey: str):
  """data[outkey] = data[inkey]."""
  def _copy(data):
    return {**data, outkey: data[inkey]}
  return _copy


@register("rename")
def get_rename(inkey: str, outkey: str):
  """Moves data[inkey] to data[outkey]."""
  def _rename(data):
    data = dict(data)
    data[outkey] = data.pop(inkey)
    return data
  return _rename


@register("cast")
def get_cast(dtype: str, key: str = "image"):
  """Casts data[key] to `dtype` (a tf dtype name such as "float32")."""
  def _cast(data):
    return {**data, key: tf.cast(data[key], tf.as_dtype(dtype))}
  return _cast


@register("squeeze")
def get_squeeze(key: str, axis: int = -1):
  """Drops a size-1 axis (e.g. the channel of a single-channel PNG label)."""
  def _squeeze(data):
    return {**data, key: tf.squeeze(data[key], axis=axis)}
  return _squeeze
