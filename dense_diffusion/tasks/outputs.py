"""Helpers of the tasks' prediction writers: PNG files (local or gs://), colours, overlays.

Files are written through `epath.Path.open`, so an output folder may be `gs://...` (PIL and
matplotlib themselves open only local paths).
"""
from __future__ import annotations

from typing import Optional

from etils import epath
import numpy as np
from PIL import Image

UINT16_MAX = 65535
OVERLAY_ALPHA = 0.5  # weight of the label colours in the overlays.


def u8(x01: np.ndarray) -> np.ndarray:
  """f32 in [0, 1] -> u8 (rounded, clipped)."""
  return np.round(np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


def overlay(image: np.ndarray, colours: np.ndarray, mask: Optional[np.ndarray] = None
            ) -> np.ndarray:
  """Blends u8 colours over a u8 image where `mask` (everywhere when None)."""
  blend = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colours
  if mask is not None:
    blend = np.where(mask[..., None], blend, image)
  return np.round(blend).clip(0, 255).astype(np.uint8)


def id_colours(ids: np.ndarray) -> np.ndarray:
  """u8[H, W, 3] colours of integer ids (a fixed pseudo-random colour per id; 0 = black)."""
  top = int(ids.max(initial=0))
  table = np.random.default_rng(0).integers(40, 256, (top + 1, 3)).astype(np.uint8)
  table[0] = 0
  return table[np.maximum(ids, 0)]


def save_png(path: epath.Path, array_or_image) -> epath.Path:
  """u8[H, W, 3] -> RGB PNG, u16[H, W] -> 16-bit grey PNG, or a PIL image as it is."""
  img = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(
      array_or_image)
  with epath.Path(path).open("wb") as f:
    img.save(f, format="PNG")
  return path


def save_unit_u16(path: epath.Path, values01: np.ndarray) -> epath.Path:
  """f32[H, W] in [0, 1] -> 16-bit grey PNG of round(v * 65535)."""
  coded = np.round(np.clip(values01, 0.0, 1.0) * UINT16_MAX)
  return save_png(path, coded.astype(np.uint16))
