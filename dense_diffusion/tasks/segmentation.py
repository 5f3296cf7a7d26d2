"""Semantic segmentation as an RGB image.

Class c is colour c + 1 of a palette of L^3 evenly spaced colours (L levels per channel, the
smallest L with L^3 >= K + 1); colour 0 (black) is ignore/void. Decoding snaps every pixel to the
nearest palette colour of the K classes. `palette_seed` != 0 deals the grid's colours to the
classes in a fixed shuffled order instead, so two label spaces on one grid (ADE20K's 150 classes
and COCO's 133) do not paint their class c alike.

One label space per dataset: `semantic` is the task of a dataset's own classes given as options
(the synthetic scenes' 7); `semantic_ade20k` and `semantic_coco` are its variants for the two
real label spaces, each its own task (name, prompt, classes, palette) of the family "semantic",
so one generalist is told by the prompt which dataset's classes to paint.
"""
from __future__ import annotations

import dataclasses
import functools

from typing import Any, Sequence

import numpy as np
from PIL import Image

from dense_diffusion import metrics
from dense_diffusion.tasks import base
from dense_diffusion.tasks import outputs

IGNORE_LABEL = 255


@functools.lru_cache(maxsize=None)
def palette_cells(num_classes: int, seed: int = 0) -> np.ndarray:
  """i64[K + 1]: the grid cell (r * L^2 + g * L + b) of black (entry 0) and of each class c
  (entry c + 1). Seed 0: cell c + 1; another seed: a fixed shuffle of the L^3 - 1 non-black
  cells (numpy's PCG64 permutation), the first K of it."""
  levels = levels_per_channel(num_classes)
  if seed == 0:
    cells = np.arange(num_classes + 1)
  else:
    shuffled = 1 + np.random.default_rng(seed).permutation(levels**3 - 1)
    cells = np.concatenate([[0], shuffled[:num_classes]])
  cells.setflags(write=False)
  return cells


def palette(num_classes: int, seed: int = 0) -> np.ndarray:
  """f32[K + 1, 3] in [-1, 1]: row 0 is black (ignore), row c + 1 is class c's colour."""
  return _palette(num_classes, seed)


@functools.lru_cache(maxsize=None)
def _palette(num_classes: int, seed: int) -> np.ndarray:
  levels = levels_per_channel(num_classes)
  index = palette_cells(num_classes, seed)
  digits = np.stack([index // levels**2, (index // levels) % levels, index % levels], axis=-1)
  colours = (-1.0 + 2.0 * digits / (levels - 1)).astype(np.float32)
  colours.setflags(write=False)
  return colours


@functools.lru_cache(maxsize=None)
def _class_of_cell(num_classes: int, seed: int) -> np.ndarray:
  """i64[L^3]: the class painted in each grid cell, -1 for black and unused cells."""
  levels = levels_per_channel(num_classes)
  lut = np.full(levels**3, -1, np.int64)
  lut[palette_cells(num_classes, seed)[1:]] = np.arange(num_classes)
  lut.setflags(write=False)
  return lut


def levels_per_channel(num_classes: int) -> int:
  """Smallest L >= 2 with L^3 >= num_classes + 1."""
  levels = 2
  while levels**3 < num_classes + 1:
    levels += 1
  return levels


def neighbour_votes(labels: np.ndarray, candidate: np.ndarray) -> np.ndarray:
  """Counts, per pixel, the 8-neighbours whose label equals `candidate` (both i32[N, H, W])."""
  padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=-1)
  h, w = labels.shape[1:]
  votes = np.zeros(labels.shape, np.int32)
  for dy in (0, 1, 2):
    for dx in (0, 1, 2):
      if dy == 1 and dx == 1:
        continue
      votes += padded[:, dy:dy + h, dx:dx + w] == candidate
  return votes


@base.register("semantic")
@dataclasses.dataclass(frozen=True)
class SemanticTask(base.Task):
  """Class indices 0..K-1 (255 = ignore) as palette colours."""

  name: str = "semantic"
  prompt: str = "Perform semantic segmentation"
  num_classes: int = 150
  # Pixels closer than this fraction of half the level spacing to a colour-cell boundary are
  # ambiguous and may follow their neighbours (see `_decode_batch`). 0 = plain nearest colour.
  # With noise sigma = 1/4 of half the spacing, 0.3 cut per-pixel errors on blocky label maps from
  # 1.5e-4 (plain nearest: 4-sigma crossings) to 1.5e-6, and left 1-pixel-scattered labels as they
  # were (1.50e-4 -> 1.59e-4); measured over 40 random 128x128 maps with K = 150.
  ambiguity_margin: float = 0.3
  # Optional [{"id", "name", "isthing"}, ...], one per class in class order: the names (prompts
  # of backbones, file outputs) and the thing/stuff split that panoptic merging needs.
  categories: Sequence[dict] = ()
  # 0: class c is grid colour c + 1; another value: the grid's colours dealt in a fixed shuffled
  # order (`palette_cells`), a label space's own palette.
  palette_seed: int = 0

  family = "semantic"
  label_key = "semantic"
  interpolation = "nearest"
  head = "classes"
  headline = "miou"
  higher_is_better = True

  def __post_init__(self):
    if self.num_classes < 1 or self.num_classes >= IGNORE_LABEL:
      raise ValueError(f"semantic num_classes must be in 1..254, got {self.num_classes}")
    categories = tuple(dict(c) for c in self.categories)
    if categories and len(categories) != self.num_classes:
      raise ValueError(f"semantic has {self.num_classes} classes but {len(categories)} "
                       "categories; give one category per class, in class order")
    object.__setattr__(self, "categories", categories)

  @property
  def palette(self) -> np.ndarray:
    return palette(self.num_classes, self.palette_seed)

  @property
  def levels(self) -> int:
    return levels_per_channel(self.num_classes)

  def _encode(self, labels):
    labels = base.check_map(labels, self.name, "a label map (H, W) of class indices")
    if not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"semantic.encode expects integer labels, got {labels.dtype}")
    bad = (labels != IGNORE_LABEL) & ((labels < 0) | (labels >= self.num_classes))
    if bad.any():
      raise ValueError(
          f"semantic.encode got labels {np.unique(labels[bad])[:10].tolist()} outside "
          f"0..{self.num_classes - 1} (and not the ignore label {IGNORE_LABEL})")
    colour = np.where(labels == IGNORE_LABEL, 0, labels.astype(np.int64) + 1)
    return self.palette[colour]

  def valid_mask(self, labels):
    return base.check_map(labels, self.name, "a label map (H, W)") != IGNORE_LABEL

  def evaluator(self):
    return SemanticEvaluator(self)

  def palette_png(self, labels: np.ndarray) -> Image.Image:
    """i32[H, W] class indices (255 = ignore) -> PIL "P" image: index = class, task colours."""
    colours = outputs.u8((np.asarray(self.palette) + 1.0) * 0.5)  # row c + 1 is class c
    table = np.zeros((256, 3), np.uint8)
    table[:self.num_classes] = colours[1:self.num_classes + 1]
    table[IGNORE_LABEL] = colours[0]
    img = Image.fromarray(np.asarray(labels).astype(np.uint8), "L").convert("P")
    img.putpalette(table.reshape(-1).tolist())
    return img

  def write(self, out, stem, image, labels):
    """`X_semantic.png`: palette PNG, pixel = class index (255 = ignore), the task's colours;
    `X_semantic_overlay.png`: the colours blended over the input (a variant writes its own
    name: `X_semantic_coco.png`, ...)."""
    img = self.palette_png(labels)
    path = outputs.save_png(out / f"{stem}_{self.name}.png", img)
    colours = np.asarray(img.convert("RGB"))
    overlay = outputs.overlay(image, colours, mask=labels != IGNORE_LABEL)
    return [path, outputs.save_png(out / f"{stem}_{self.name}_overlay.png", overlay)]

  def _decode_batch(self, rgb):
    """Nearest palette colour, computed on the colour grid instead of against all K colours.

    The palette is a regular grid, so the nearest grid colour is per-channel rounding. Pixels whose
    rounding was close to a cell boundary (within `ambiguity_margin` of half a level spacing) are
    re-decided: when none of their 8 neighbours decoded to the same colour but two or more decoded
    to the colour across the nearest boundary, they take that one. Isolated noise spikes that crossed a
    boundary follow their region; clean input is untouched. Grid colours that are not classes (black, or indices > K)
    fall back to brute-force nearest among the K class colours.
    """
    levels = self.levels
    scaled = (rgb + 1.0) * 0.5 * (levels - 1)  # [N,H,W,3] in [0, L-1]
    digits = np.clip(np.rint(scaled), 0, levels - 1).astype(np.int64)
    residual = scaled - digits  # in [-0.5, 0.5]
    to_boundary = 0.5 - np.abs(residual)
    labels = self._class_of_digits(digits, rgb)

    axis = np.argmin(to_boundary, axis=-1)  # the channel nearest to a boundary
    nearest_gap = np.take_along_axis(to_boundary, axis[..., None], -1)[..., 0]
    ambiguous = nearest_gap < 0.5 * self.ambiguity_margin
    if ambiguous.any():
      step = np.where(np.take_along_axis(residual, axis[..., None], -1)[..., 0] >= 0, 1, -1)
      other = digits.copy()
      np.put_along_axis(other, axis[..., None],
                        np.take_along_axis(digits, axis[..., None], -1) + step[..., None], -1)
      inside = np.all((other >= 0) & (other < levels), axis=-1)
      other_label = np.where(inside, self._class_of_digits(np.clip(other, 0, levels - 1), None),
                             -1)
      # Switch only pixels that no neighbour agrees with, towards a colour at least two neighbours
      # have: a correct pixel at a region's corner keeps its label even when the other side is
      # larger, and a scattered map (no regions) is left alone.
      switch = (ambiguous & (other_label >= 0) & (neighbour_votes(labels, labels) == 0)
                & (neighbour_votes(labels, other_label) >= 2))
      labels = np.where(switch, other_label, labels)
    return labels.astype(np.int32)

  def _class_of_digits(self, digits: np.ndarray, rgb: np.ndarray | None) -> np.ndarray:
    """Grid digits [...,3] -> class index; non-class colours -> nearest class (or -1 if rgb None)."""
    levels = self.levels
    cell = digits[..., 0] * levels**2 + digits[..., 1] * levels + digits[..., 2]
    labels = _class_of_cell(self.num_classes, self.palette_seed)[cell]
    off_palette = labels < 0
    if rgb is None:
      return np.where(off_palette, -1, labels)
    if off_palette.any():
      pixels = rgb[off_palette]  # [M, 3]
      classes = self.palette[1:]
      dist = ((pixels[:, None, :] - classes[None]) ** 2).sum(-1)
      labels = labels.copy()
      labels[off_palette] = np.argmin(dist, axis=-1)
    return labels


@base.register("semantic_ade20k")
@dataclasses.dataclass(frozen=True)
class ADE20KSemanticTask(SemanticTask):
  """ADE20K's 150 classes (SceneParsing), its own task beside COCO's: prompt, classes, palette."""

  name: str = "semantic_ade20k"
  prompt: str = "semantic segmentation, ADE20K classes"
  num_classes: int = 150


@base.register("semantic_coco")
@dataclasses.dataclass(frozen=True)
class COCOSemanticTask(SemanticTask):
  """COCO panoptic's 133 classes (80 things, 53 stuff), its own task beside ADE20K's. The
  categories (ids, names, thing / stuff) come with the reader's task options
  (`readers.coco_panoptic`): with them, panoptic is answered from this task and instance."""

  name: str = "semantic_coco"
  prompt: str = "semantic segmentation, COCO classes"
  num_classes: int = 133
  palette_seed: int = 133  # its own colours: COCO's class c is not painted as ADE20K's.


class SemanticEvaluator(base.Evaluator):
  """mIoU and pixel accuracy; baseline: the image's majority class everywhere."""
  KEYS = ("miou", "pixel_accuracy")

  def __init__(self, task: SemanticTask):
    super().__init__(task)
    self.model = metrics.SemanticConfusion(task.num_classes)
    self.baseline = metrics.SemanticConfusion(task.num_classes)

  def update(self, answers: Sequence[Any], truths: Sequence[Any], inputs) -> None:
    for pred, gt in zip(answers, truths):
      self.model.update(pred, gt)
      known = gt[gt != IGNORE_LABEL]
      majority = np.bincount(known).argmax() if known.size else 0
      self.baseline.update(np.full_like(gt, majority), gt)

  def result(self) -> dict:
    model, baseline = self.model.result(), self.baseline.result()
    return {**{k: float(model[k]) for k in self.KEYS},
            "baseline": {k: float(baseline[k]) for k in self.KEYS}}
