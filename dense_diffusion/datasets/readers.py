"""Input-pipeline entries of every dataset: which TFDS dataset and split, which pp, which task.

    from dense_diffusion.datasets import readers
    entries = [readers.get("nyu_depth_v2", resolution=128),
               *readers.get("coco_panoptic", resolution=128)]  # semantic + instance
    ds = input_pipeline.get_train_dataset(entries, task_names, batch_size)

Every function returns plain dicts (`dataset`, `split`, `task`, `pp`, `pp_eval`, `weight`,
`eval_split`, optional `pad_values`) for `input_pipeline`; configs may copy and edit them. The
train `pp` ends with `image` in [-1, 1] and `target` = the task's encoding; `pp_eval` also keeps
the raw labels at full resolution under "label/..." for the metrics.
"""
from __future__ import annotations

from typing import Any, Callable

from dense_diffusion.datasets.synthetic_scenes import renderer

_READERS: dict[str, Callable[..., Any]] = {}


def register(name: str):
  def wrap(fn):
    _READERS[name] = fn
    return fn
  return wrap


def get(name: str, **kwargs):
  """The entry (or list of entries) of dataset reader `name`."""
  if name not in _READERS:
    raise KeyError(f"unknown reader {name!r}; known readers: {', '.join(sorted(_READERS))}")
  return _READERS[name](**kwargs)


def names() -> list[str]:
  return sorted(_READERS)


def _join(*ops: str) -> str:
  return "|".join(o for o in ops if o)


def _resize(r: int, image_keys=("image",), label_keys=()) -> str:
  ops = [f'resize({r}, key="{k}", method="area")' for k in image_keys]
  ops += [f'resize({r}, key="{k}", method="nearest")' for k in label_keys]
  return _join(*ops)


def _flip(keys, normals_keys=()) -> str:
  return f"random_flip(keys={tuple(keys)!r}, normals_keys={tuple(normals_keys)!r})"


_ENC = 'encode_task("{task}", key="{key}"{opts})'


def _encode(task: str, key: str, **options) -> str:
  opts = "".join(f", {k}={v!r}" for k, v in options.items())
  return _ENC.format(task=task, key=key, opts=opts)


@register("nyu_depth_v2")
def nyu_depth_v2(resolution: int = 128, split: str = "train", weight: float = 1.0,
                 max_depth: float = 10.0, affine_invariant: bool = False) -> dict:
  """NYUv2 depth (TFDS `nyu_depth_v2`): Eigen crop, valid range (1e-3, max_depth) m."""
  enc = _encode("depth", "depth", min_depth=0.0, max_depth=max_depth,
                affine_invariant=affine_invariant)
  rng = f"depth_range(0.001, {max_depth})"
  train = _join(rng, "nyu_eigen_crop", 'random_crop((416, 416), keys=("image", "depth"))',
                _flip(("image", "depth")), _resize(resolution, label_keys=("depth",)),
                "value_range(-1, 1)", enc)
  evalp = _join(rng, 'copy("depth", "label/depth")', 'eigen_mask("label/depth")',
                _resize(resolution, label_keys=("depth",)), "value_range(-1, 1)", enc)
  return {"dataset": "nyu_depth_v2", "split": split, "eval_split": "validation",
          "task": "depth", "pp": train, "pp_eval": evalp, "weight": weight}


@register("ade20k")
def ade20k(resolution: int = 128, split: str = "train", weight: float = 1.0) -> dict:
  """ADE20K 150 classes (our `ade20k` builder): 0 -> 255 ignore, 1..150 -> 0..149."""
  enc = _encode("semantic", "semantic", num_classes=150)
  train = _join('ade20k_labels("semantic")', _flip(("image", "semantic")),
                _resize(resolution, label_keys=("semantic",)), "value_range(-1, 1)", enc)
  evalp = _join('ade20k_labels("semantic")', 'copy("semantic", "label/semantic")',
                _resize(resolution, label_keys=("semantic",)), "value_range(-1, 1)", enc)
  return {"dataset": "ade20k", "split": split, "eval_split": "validation", "task": "semantic",
          "pp": train, "pp_eval": evalp, "weight": weight,
          "pad_values": {"label/semantic": 255}}


@register("coco_panoptic")
def coco_panoptic(resolution: int = 128, split: str = "train", weight: float = 1.0,
                  tasks: tuple[str, ...] = ("semantic", "instance")) -> list[dict]:
  """COCO panoptic (TFDS `coco/2017_panoptic`) as two entries: semantic (133 classes) + instance.

  Panoptic is trained as two tasks with two prompts; `weight` is split evenly between them. The
  evaluation entry keeps the raw segment-id map and segment lists for PQ.
  """
  keys = ("image", "semantic", "instance")
  out = []
  for task in tasks:
    opts = {"num_classes": 133} if task == "semantic" else {}
    enc = _encode(task, task, **opts)
    train = _join("coco_panoptic", _flip(keys), _resize(resolution, label_keys=keys[1:]),
                  "value_range(-1, 1)", enc)
    evalp = _join("coco_panoptic", 'copy("panoptic_ids", "label/panoptic_ids")',
                  'copy("panoptic_ids/segment_id", "label/segment_id")',
                  'copy("panoptic_ids/category_id", "label/category_id")',
                  'copy("panoptic_ids/iscrowd", "label/iscrowd")',
                  _resize(resolution, label_keys=keys[1:]), "value_range(-1, 1)", enc)
    out.append({"dataset": "coco/2017_panoptic", "split": split, "eval_split": "validation",
                "task": task, "pp": train, "pp_eval": evalp, "weight": weight / len(tasks),
                "check_keys": ["image", "panoptic_image"]})
  return out


def _restoration(dataset: str, task: str, resolution: int, split: str, eval_split: str,
                 weight: float) -> dict:
  keys = ("image", "clean")
  train = _join(f"random_crop({resolution}, keys={keys!r})", _flip(keys), "value_range(-1, 1)",
                _encode(task, "clean"))
  evalp = _join('copy("clean", "label/clean")', _resize(resolution, image_keys=keys),
                "value_range(-1, 1)", 'value_range(0, 1, key="clean")', _encode(task, "clean"))
  return {"dataset": dataset, "split": split, "eval_split": eval_split, "task": task,
          "pp": train, "pp_eval": evalp, "weight": weight}


@register("sidd")
def sidd(resolution: int = 128, split: str = "train", weight: float = 1.0) -> dict:
  """SIDD sRGB denoising (our `sidd` builder); evaluation on the 256x256 validation blocks."""
  return _restoration("sidd", "denoise", resolution, split, "validation", weight)


@register("rain")
def rain(resolution: int = 128, split: str = "train", weight: float = 1.0,
         eval_split: str = "rain100h") -> dict:
  """Deraining (our `rain` builder): Rain13K train; eval on rain100h / rain100l / test100 ...."""
  return _restoration("rain", "derain", resolution, split, eval_split, weight)


@register("lol")
def lol(resolution: int = 128, split: str = "train", weight: float = 1.0) -> dict:
  """LOL low-light enhancement (our `lol` builder): our485 train, eval15 validation."""
  return _restoration("lol", "lowlight", resolution, split, "validation", weight)


# ------------------------------------------------------------------------------------------------
# Synthetic scenes: every task from one dataset.
SYNTHETIC_MAX_DEPTH = 8.0  # metres; the rooms are at most 7 m deep (renderer.sample_scene).

_SYNTHETIC_TASKS = {
    # task: (pp before the shared part, label keys (nearest), normals keys, encode op)
    "depth": ("", ("depth",), (), _encode("depth", "depth", max_depth=SYNTHETIC_MAX_DEPTH)),
    "normals": ("", (), ("normals",), _encode("normals", "normals")),
    "semantic": ("", ("semantic",), (),
                 _encode("semantic", "semantic", num_classes=renderer.NUM_CLASSES)),
    "instance": ("", ("instance",), (), _encode("instance", "instance")),
    "albedo": ("", ("albedo",), (), _encode("albedo", "albedo")),
    "shading": ("", ("shading",), (), _encode("shading", "shading")),
    "denoise": ('copy("image", "clean")|copy("noisy", "image")', ("clean",), (),
                _encode("denoise", "clean")),
    "derain": ('copy("image", "clean")|copy("rainy", "image")', ("clean",), (),
               _encode("derain", "clean")),
    "lowlight": ('copy("image", "clean")|copy("dark", "image")', ("clean",), (),
                 _encode("lowlight", "clean")),
}
SYNTHETIC_TASKS = tuple(_SYNTHETIC_TASKS)


@register("synthetic_scenes")
def synthetic_scenes(task: str, config: str = "res64", split: str = "train",
                     weight: float = 1.0, flip: bool = True) -> dict:
  """One task of the built-in `synthetic_scenes/<config>` (no resize: already at R x R).

  Panoptic categories are `renderer.CATEGORIES` (category id = class index + 1); the evaluation
  entries of semantic and instance keep `label/panoptic_ids` and the segment lists for PQ.
  """
  if task not in _SYNTHETIC_TASKS:
    raise ValueError(f"synthetic_scenes has no task {task!r}; tasks: {SYNTHETIC_TASKS}")
  prefix, label_keys, normals_keys, enc = _SYNTHETIC_TASKS[task]
  train = _join(prefix, _flip(("image",) + label_keys, normals_keys) if flip else "",
                "value_range(-1, 1)", enc, 'keep("image", "target")')
  raw = (label_keys + normals_keys)[0]
  # Semantic and instance (the two halves of panoptic) also keep the panoptic ground truth.
  panoptic = "panoptic_labels" if task in ("semantic", "instance") else ""
  evalp = _join(prefix, f'copy("{raw}", "label/{raw}")', panoptic, "value_range(-1, 1)", enc)
  source = {"denoise": "noisy", "derain": "rainy", "lowlight": "dark"}.get(task)
  features = ["image", "key"] + ([source] if source else list(label_keys + normals_keys))
  eval_features = features + (["panoptic"] if panoptic else [])
  return {"dataset": f"synthetic_scenes/{config}", "split": split, "eval_split": "validation",
          "task": task, "pp": train, "pp_eval": evalp, "weight": weight,
          "features": features, "eval_features": eval_features}


def synthetic_mixture(tasks: tuple[str, ...] = SYNTHETIC_TASKS, config: str = "res64",
                      weights: dict[str, float] | None = None) -> list[dict]:
  """Entries for several synthetic tasks (equal weights unless given)."""
  weights = weights or {}
  return [synthetic_scenes(t, config=config, weight=weights.get(t, 1.0)) for t in tasks]
