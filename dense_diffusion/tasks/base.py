"""The task interface: a prompt plus an exact encoding of the task's answer as an RGB image.

Every task turns its answer into f32[H, W, 3] in [-1, 1] (`encode`) and back (`decode`). `decode`
accepts any float array of shape (H, W, 3) or (N, H, W, 3); values outside [-1, 1] are clipped
first, because a sampler's output is not guaranteed to stay in range.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Task:
  """Base class. Subclasses set `name` and `prompt` and implement `_encode` / `_decode_batch`."""

  name: str = ""
  prompt: str = ""
  # True where the model's input image is already a rough answer (restoration: the degraded
  # image): a model may then predict a correction to its input (`model.input_residual`).
  input_is_estimate: bool = False

  def encode(self, answer: Any) -> np.ndarray:
    """answer (task-specific, one example) -> f32[H, W, 3] in [-1, 1]."""
    rgb = np.asarray(self._encode(answer), np.float32)
    return np.clip(rgb, -1.0, 1.0)

  def decode(self, rgb: Any) -> Any:
    """f32[H, W, 3] or f32[N, H, W, 3] -> the answer (batched like the input)."""
    rgb, batched = as_rgb_batch(rgb, self.name)
    out = self._decode_batch(rgb)
    return out if batched else _first(out)

  # Subclass hooks.
  def _encode(self, answer: Any) -> np.ndarray:
    raise NotImplementedError

  def _decode_batch(self, rgb: np.ndarray) -> Any:
    """f32[N, H, W, 3] clipped to [-1, 1] -> batched answer."""
    raise NotImplementedError


def _first(out):
  if isinstance(out, np.ndarray):
    return out[0]
  if isinstance(out, list):
    return out[0]
  if isinstance(out, tuple):
    return tuple(_first(o) for o in out)
  if isinstance(out, dict):
    return {k: _first(v) for k, v in out.items()}
  return out


def as_rgb_batch(rgb: Any, task_name: str, channels: int = 3) -> tuple[np.ndarray, bool]:
  """Validates a decoder input and returns (f32[N, H, W, C] clipped to [-1, 1], was_batched)."""
  rgb = np.asarray(rgb)
  if rgb.ndim not in (3, 4) or rgb.shape[-1] != channels:
    raise ValueError(
        f"{task_name}.decode expects an array of shape (H, W, {channels}) or "
        f"(N, H, W, {channels}), got shape {rgb.shape}")
  if not np.issubdtype(rgb.dtype, np.floating):
    raise ValueError(
        f"{task_name}.decode expects floats in [-1, 1], got dtype {rgb.dtype}; convert uint8 "
        "images with x / 127.5 - 1 first")
  nonfinite = int(np.size(rgb) - np.count_nonzero(np.isfinite(rgb)))
  if nonfinite:
    raise ValueError(f"{task_name}.decode got {nonfinite} non-finite values (NaN or inf)")
  batched = rgb.ndim == 4
  rgb = np.clip(rgb.astype(np.float32), -1.0, 1.0)
  return (rgb if batched else rgb[None]), batched


def grey(value01: np.ndarray) -> np.ndarray:
  """f32[..., H, W] in [0, 1] -> f32[..., H, W, 3] grey in [-1, 1]."""
  v = np.clip(np.asarray(value01, np.float32), 0.0, 1.0) * 2.0 - 1.0
  return np.repeat(v[..., None], 3, axis=-1)


def channel_mean01(rgb: np.ndarray) -> np.ndarray:
  """f32[..., 3] in [-1, 1] -> f32[...] in [0, 1]: the inverse of `grey`."""
  return (rgb.mean(axis=-1) + 1.0) * 0.5


def check_map(x: Any, task_name: str, what: str, ndim: int = 2) -> np.ndarray:
  """Checks that an answer map has `ndim` dimensions (a trailing singleton channel is dropped)."""
  x = np.asarray(x)
  if x.ndim == ndim + 1 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != ndim:
    raise ValueError(f"{task_name}.encode expects {what}, got shape {x.shape}")
  return x


_REGISTRY: dict[str, Callable[..., Task]] = {}


def register(name: str):
  """Class decorator: makes `tasks.get(name, **options)` build this task."""
  def wrap(factory):
    if name in _REGISTRY:
      raise ValueError(f"task {name!r} registered twice")
    _REGISTRY[name] = factory
    return factory
  return wrap


def get(name: str, **options) -> Task:
  """Builds the task called `name` with its options (e.g. `get("semantic", num_classes=150)`)."""
  if name not in _REGISTRY:
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}")
  try:
    return _REGISTRY[name](**options)
  except TypeError as e:
    raise ValueError(f"bad options {options} for task {name!r}: {e}") from None


def names() -> list[str]:
  return sorted(_REGISTRY)
