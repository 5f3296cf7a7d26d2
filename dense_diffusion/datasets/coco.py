"""COCO panoptic metadata: the 133 official categories shipped as package data.

`coco_panoptic_categories.json` holds the `id`, `name`, `isthing`, `supercategory` and `color` of
the 133 COCO panoptic categories (80 things then 53 stuff, sorted by id), the content of
panopticapi's `panoptic_coco_categories.json` (COCO annotations, CC BY 4.0). TFDS
`coco/2017_panoptic` labels are positions in this list.
"""
from __future__ import annotations

import functools
import json
import os

_PATH = os.path.join(os.path.dirname(__file__), "coco_panoptic_categories.json")


@functools.lru_cache(maxsize=1)
def _load() -> tuple[dict, ...]:
  with open(_PATH, encoding="utf-8") as f:
    return tuple(json.load(f))


def panoptic_categories() -> list[dict]:
  """The 133 categories as dicts {id, name, isthing, supercategory, color}, in label order."""
  return [dict(c) for c in _load()]
