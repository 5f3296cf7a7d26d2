"""COCO segmentations (polygons, RLE) rasterised to binary masks, without pycocotools.

An annotation's `segmentation` is either a list of polygons [x1, y1, x2, y2, ...] in pixel
coordinates (the objects RefCOCO refers to), or a run-length encoding {"size": [h, w], "counts":
...} (crowd regions): counts a list of ints (uncompressed) or COCO's compressed string. Runs
alternate background / foreground, start with background and go down the columns (column-major
order).

Polygons are filled by their pixel centres: a pixel (row, col) belongs to the object when its centre
(col + 0.5, row + 0.5) is inside the polygon (COCO's coordinates put pixel col over [col, col + 1],
so a box [x0, x1) x [y0, y1) with integer corners covers exactly its (x1 - x0) (y1 - y0) pixels).
pycocotools (not a dependency) scan-converts on a 5x finer grid and may differ from this on
pixels whose centre lies within a fifth of a pixel of the outline.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int
                     ) -> np.ndarray:
  """bool[height, width]: the union of the polygons (each [x1, y1, x2, y2, ...]), a pixel being
  inside where its centre (col + 0.5, row + 0.5) is (even-odd rule)."""
  mask = np.zeros((height, width), bool)
  for poly in polygons:
    xy = np.asarray(poly, np.float64)
    if xy.size < 6 or xy.size % 2:
      raise ValueError(f"a COCO polygon needs >= 3 (x, y) points, got {xy.size} numbers")
    xs, ys = xy[0::2], xy[1::2]
    # Only the pixels of the polygon's bounding box can be inside.
    c0, c1 = max(int(np.floor(xs.min())), 0), min(int(np.ceil(xs.max())) + 1, width)
    r0, r1 = max(int(np.floor(ys.min())), 0), min(int(np.ceil(ys.max())) + 1, height)
    if c0 >= c1 or r0 >= r1:
      continue
    yc = np.arange(r0, r1, dtype=np.float64)[:, None] + 0.5
    xc = np.arange(c0, c1, dtype=np.float64)[None, :] + 0.5
    inside = np.zeros((r1 - r0, c1 - c0), bool)
    for x1, y1, x2, y2 in zip(xs, ys, np.roll(xs, -1), np.roll(ys, -1)):
      if y1 == y2:
        continue  # a horizontal edge crosses no row of centres
      crosses = (y1 > yc) != (y2 > yc)  # [rows, 1]
      x_at = x1 + (yc - y1) * (x2 - x1) / (y2 - y1)  # where the edge meets the row
      inside ^= crosses & (xc < x_at)
    mask[r0:r1, c0:c1] |= inside
  return mask


def compressed_counts(text: str | bytes) -> list[int]:
  """The run lengths of COCO's compressed RLE string: each number in 5-bit groups (chars from
  48, bit 0x20 = more groups follow, the last group's 0x10 = negative), and from the third run
  on stored as the difference to the run two before."""
  data = text.encode("ascii") if isinstance(text, str) else bytes(text)
  counts: list[int] = []
  pos = 0
  while pos < len(data):
    value, shift, more = 0, 0, True
    while more:
      group = data[pos] - 48
      value |= (group & 0x1F) << shift
      more = bool(group & 0x20)
      pos += 1
      shift += 5
      if not more and group & 0x10:
        value -= 1 << shift  # sign-extend
    if len(counts) > 2:
      value += counts[-2]
    counts.append(value)
  return counts


def rle_to_mask(rle: dict) -> np.ndarray:
  """bool[h, w] of a COCO RLE {"size": [h, w], "counts": list of ints or compressed string}."""
  height, width = (int(v) for v in rle["size"])
  counts = rle["counts"]
  if isinstance(counts, (str, bytes)):
    counts = compressed_counts(counts)
  counts = np.asarray(counts, np.int64)
  if counts.sum() != height * width:
    raise ValueError(f"RLE counts sum to {counts.sum()}, not {height} x {width}")
  values = np.arange(len(counts)) % 2 == 1  # background first
  flat = np.repeat(values, counts)
  return flat.reshape(width, height).T  # column-major


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
  """bool[height, width] of a COCO annotation's `segmentation` (polygons or RLE)."""
  if isinstance(segmentation, dict):
    mask = rle_to_mask(segmentation)
    if mask.shape != (height, width):
      raise ValueError(f"RLE of size {mask.shape} on an image of {(height, width)}")
    return mask
  return polygons_to_mask(segmentation, height, width)
