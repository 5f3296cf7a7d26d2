"""Test-time augmentation of dense outputs: sliding windows and horizontal-flip averaging (NHWC).

Both wrap a function `fn(image f32[B, h, w, 3]) -> [f32[B, h, w, C_k], ...]` (one dense output
per head, pixel-aligned with its input) and return outputs of the same shapes for the whole
image. They are what mmseg's test modes do, as VPD's ADE20K evaluation uses them:

- `sliding_window` (mmseg `mode='slide'`): square windows of `crop` pixels every `stride`
  pixels, the last window of a row or column pushed back to end at the border (a window larger
  than the image is the whole image); each pixel's output is the mean of the outputs of the
  windows that cover it (for class heads, the logits).
- `flip_average`: the outputs of the image and of its horizontal mirror (mirrored back),
  combined per output by `combine[k](plain, mirrored)`: for class logits, the mean of the two
  softmax probabilities (`paradigms/backbone.py`, the head kind's `flip_mean`).

Window positions are static (the image's shape is known when tracing), so each window is one
call of `fn` in the traced program.
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Outputs = Sequence[jax.Array]


def window_starts(size: int, crop: int, stride: int) -> list[int]:
  """Start offsets of mmseg's sliding windows along one axis of `size` pixels.

  ceil((size - crop) / stride) + 1 windows at i * stride, each clipped to end inside the image
  (start = min(i * stride, size - crop)); one window at 0 when crop >= size.
  """
  if crop < 1 or stride < 1:
    raise ValueError(f"sliding windows need crop >= 1 and stride >= 1, got {crop}, {stride}")
  crop = min(crop, size)
  count = max(size - crop + stride - 1, 0) // stride + 1
  return [min(i * stride, size - crop) for i in range(count)]


def sliding_window(fn: Callable[[jax.Array], Outputs], image: jax.Array, crop: int,
                   stride: int) -> list[jax.Array]:
  """Per-pixel mean of `fn` over crop x crop windows every `stride` pixels.

  Args:
    fn: image f32[B, h, w, 3] -> outputs [f32[B, h, w, C_k], ...] at the input's size.
    image: f32[B, H, W, 3].
    crop, stride: window side and step in pixels (a window is min(crop, H) x min(crop, W)).
  Returns:
    [f32[B, H, W, C_k], ...].
  """
  _, h, w, _ = image.shape
  ys, xs = window_starts(h, crop, stride), window_starts(w, crop, stride)
  ch, cw = min(crop, h), min(crop, w)
  if len(ys) == 1 and len(xs) == 1:
    return list(fn(image))
  sums = None
  count = np.zeros((h, w), np.float32)
  for y in ys:
    for x in xs:
      outs = fn(image[:, y:y + ch, x:x + cw])
      pads = ((0, 0), (y, h - y - ch), (x, w - x - cw), (0, 0))
      placed = [jnp.pad(o.astype(jnp.float32), pads) for o in outs]
      sums = placed if sums is None else [s + p for s, p in zip(sums, placed)]
      count[y:y + ch, x:x + cw] += 1
  inverse = jnp.asarray(1.0 / count)[None, :, :, None]  # every pixel is covered at least once
  return [s * inverse for s in sums]


def flip_average(fn: Callable[[jax.Array], Outputs], image: jax.Array,
                 combine: Sequence[Callable[[jax.Array, jax.Array], jax.Array]]
                 ) -> list[jax.Array]:
  """combine[k](fn(image)[k], mirror(fn(mirror(image))[k])) for each output k.

  Args:
    fn: image f32[B, H, W, 3] -> outputs [f32[B, H, W, C_k], ...].
    image: f32[B, H, W, 3]; mirror flips the width axis.
    combine: one function per output, (plain, mirrored back) -> the combined output.
  """
  plain = fn(image)
  mirrored = [jnp.flip(o, axis=2) for o in fn(jnp.flip(image, axis=2))]
  if not len(plain) == len(mirrored) == len(combine):
    raise ValueError(f"{len(plain)} outputs but {len(combine)} ways to combine them")
  return [c(a, b) for c, a, b in zip(combine, plain, mirrored)]


def mean_probabilities(logits: jax.Array, mirrored: jax.Array) -> jax.Array:
  """f32[..., K] log of the mean of the two softmax probabilities: logits whose softmax is that
  mean (so their argmax is the averaged prediction's class)."""
  probs = 0.5 * (jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
                 + jax.nn.softmax(mirrored.astype(jnp.float32), axis=-1))
  return jnp.log(probs)
