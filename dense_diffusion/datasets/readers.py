"""Input-pipeline entries of every dataset: which TFDS dataset and split, which pp, which task.

    from dense_diffusion.datasets import readers
    entries = [readers.get("nyu_depth_v2", resolution=128),
               *readers.get("coco_panoptic", resolution=128)]  # semantic + instance
    ds = input_pipeline.get_train_dataset(entries, task_names, batch_size)

Every function returns plain dicts (`dataset`, `split`, `task`, `task_options`, `pp`,
`pp_eval`, `weight`, `eval_split`, optional `pad_values`) for `input_pipeline`; configs may copy
and edit them. The train `pp` leaves `image` in [-1, 1] and the task's answer under its
`label_key`, which the pipeline encodes with the entry's task (`tasks.from_entry`); `pp_eval`
also keeps the raw labels at full resolution under "label/..." for the metrics. Task options
(the number of classes, the depth range) are data of the entry, never part of a pp string.
"""
from __future__ import annotations

from typing import Any, Callable

from dense_diffusion import errors
from dense_diffusion import registry
from dense_diffusion import tasks as tasks_lib
from dense_diffusion.datasets.synthetic_scenes import renderer

READERS: registry.Registry[Callable[..., Any]] = registry.Registry("reader")


def register(name: str):
  return READERS.register(name)


def get(name: str, **kwargs):
  """The entry (or list of entries) of dataset reader `name`."""
  return registry.call_with_options("reader", name, READERS.get(name), kwargs)


def names() -> list[str]:
  return READERS.names()


def _join(*ops: str) -> str:
  return "|".join(o for o in ops if o)


def _resize(r: int, image_keys=("image",), label_keys=()) -> str:
  ops = [f'resize({r}, key="{k}", method="area")' for k in image_keys]
  ops += [f'resize({r}, key="{k}", method="nearest")' for k in label_keys]
  return _join(*ops)


def _flip(keys, normals_keys=()) -> str:
  return f"random_flip(keys={tuple(keys)!r}, normals_keys={tuple(normals_keys)!r})"


@register("nyu_depth_v2")
def nyu_depth_v2(resolution: int = 128, split: str = "train", weight: float = 1.0,
                 max_depth: float = 10.0, affine_invariant: bool = False) -> dict:
  """NYUv2 depth (TFDS `nyu_depth_v2`): Eigen crop, valid range (1e-3, max_depth) m."""
  rng = f"depth_range(0.001, {max_depth})"
  train = _join(rng, "nyu_eigen_crop", 'random_crop((416, 416), keys=("image", "depth"))',
                _flip(("image", "depth")), _resize(resolution, label_keys=("depth",)),
                "value_range(-1, 1)")
  evalp = _join(rng, 'copy("depth", "label/depth")', 'eigen_mask("label/depth")',
                _resize(resolution, label_keys=("depth",)), "value_range(-1, 1)")
  return {"dataset": "nyu_depth_v2", "split": split, "eval_split": "validation",
          "task": "depth", "task_options": {"min_depth": 0.0, "max_depth": max_depth,
                                            "affine_invariant": affine_invariant},
          "pp": train, "pp_eval": evalp, "weight": weight}


@register("ade20k")
def ade20k(resolution: int = 128, split: str = "train", weight: float = 1.0) -> dict:
  """ADE20K 150 classes (our `ade20k` builder): 0 -> 255 ignore, 1..150 -> 0..149; its own task,
  `semantic_ade20k` (one label space per dataset: its prompt, classes and palette)."""
  train = _join('ade20k_labels("semantic")', _flip(("image", "semantic")),
                _resize(resolution, label_keys=("semantic",)), "value_range(-1, 1)")
  evalp = _join('ade20k_labels("semantic")', 'copy("semantic", "label/semantic")',
                _resize(resolution, label_keys=("semantic",)), "value_range(-1, 1)")
  return {"dataset": "ade20k", "split": split, "eval_split": "validation",
          "task": "semantic_ade20k", "task_options": {"num_classes": 150}, "pp": train,
          "pp_eval": evalp, "weight": weight, "pad_values": {"label/semantic": 255}}


@register("coco_panoptic")
def coco_panoptic(resolution: int = 128, split: str = "train", weight: float = 1.0,
                  tasks: tuple[str, ...] = ("semantic_coco", "instance")) -> list[dict]:
  """COCO panoptic (TFDS `coco/2017_panoptic`) as two entries: COCO's own semantic task
  (`semantic_coco`, 133 classes) + instance.

  Panoptic is trained as two tasks with two prompts; `weight` is split evenly between them. The
  evaluation entries keep the raw segment-id map and segment lists for PQ; the semantic task
  carries the 133 categories, so panoptic is evaluated and predicted from the two.
  """
  from dense_diffusion.datasets import coco  # pylint: disable=g-import-not-at-top
  keys = ("image", "semantic", "instance")
  semantic = {"num_classes": 133, "categories": coco.panoptic_categories()}
  options = {"semantic_coco": semantic, "semantic": semantic}
  out = []
  for task in tasks:
    train = _join("coco_panoptic", _flip(keys), _resize(resolution, label_keys=keys[1:]),
                  "value_range(-1, 1)")
    evalp = _join("coco_panoptic", 'copy("panoptic_ids", "label/panoptic_ids")',
                  'copy("panoptic_ids/segment_id", "label/segment_id")',
                  'copy("panoptic_ids/category_id", "label/category_id")',
                  'copy("panoptic_ids/iscrowd", "label/iscrowd")',
                  _resize(resolution, label_keys=keys[1:]), "value_range(-1, 1)")
    out.append({"dataset": "coco/2017_panoptic", "split": split, "eval_split": "validation",
                "task": task, "task_options": options.get(task, {}), "pp": train, "pp_eval": evalp, "weight": weight / len(tasks),
                "check_keys": ["image", "panoptic_image"]})
  return out


def _restoration(dataset: str, task: str, resolution: int, split: str, eval_split: str,
                 weight: float) -> dict:
  keys = ("image", "clean")
  train = _join(f"random_crop({resolution}, keys={keys!r})", _flip(keys), "value_range(-1, 1)")
  evalp = _join('copy("clean", "label/clean")', _resize(resolution, image_keys=keys),
                "value_range(-1, 1)", 'value_range(0, 1, key="clean")')
  return {"dataset": dataset, "split": split, "eval_split": eval_split, "task": task,
          "task_options": {}, "pp": train, "pp_eval": evalp, "weight": weight}


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
# Options of the tasks on synthetic_scenes (others: the task's defaults).
SYNTHETIC_TASK_OPTIONS = {
    "depth": {"max_depth": SYNTHETIC_MAX_DEPTH},
    "semantic": {"num_classes": renderer.NUM_CLASSES,
                 "categories": [dict(c) for c in renderer.CATEGORIES]},
}
SYNTHETIC_TASKS = ("depth", "normals", "semantic", "instance", "albedo", "shading", "denoise",
                   "derain", "lowlight")


@register("synthetic_scenes")
def synthetic_scenes(task: str, config: str = "res64", split: str = "train",
                     weight: float = 1.0, flip: bool = True,
                     task_options: dict[str, Any] | None = None) -> dict:
  """One task of the built-in `synthetic_scenes/<config>` (no resize: already at R x R).

  Any registered task that says how synthetic_scenes provides it (`Task.synthetic_source`: its
  input and answer features, renamed) works, including tasks registered outside the package.
  Every evaluation entry keeps the panoptic ground truth (`label/panoptic_ids` and the segment
  lists), so the panoptic merge of semantic and instance can be scored.

  Args:
    task_options: the task's options (default `SYNTHETIC_TASK_OPTIONS[task]`).
  """
  parts = tasks_lib.base.TASKS.get(task).parts
  if parts:
    raise errors.ConfigError(f"{task} is a composite of {list(parts)}: read those tasks")
  options = dict(SYNTHETIC_TASK_OPTIONS.get(task, {}) if task_options is None else task_options)
  task_obj = tasks_lib.get(task, **options)
  renames = tuple(task_obj.synthetic_source)
  label = task_obj.label_key
  prefix = _join(*(f'copy("{src}", "{dst}")' for src, dst in renames))
  normals_keys = (label,) if task_obj.flip_negates_x else ()
  image_keys = ("image",) + (() if normals_keys else (label,))
  train = _join(prefix, _flip(image_keys, normals_keys) if flip else "", "value_range(-1, 1)",
                f'keep("image", "{label}")')
  evalp = _join(prefix, f'copy("{label}", "label/{label}")', "panoptic_labels",
                "value_range(-1, 1)")
  produced = {dst for _, dst in renames}
  features = ["image", "key"] + sorted({src for src, _ in renames} - {"image"})
  if label not in produced and label not in features:
    features.append(label)
  return {"dataset": f"synthetic_scenes/{config}", "split": split, "eval_split": "validation",
          "task": task, "task_options": options, "pp": train, "pp_eval": evalp,
          "weight": weight, "features": features, "eval_features": features + ["panoptic"]}


def synthetic_mixture(tasks: tuple[str, ...] = SYNTHETIC_TASKS, config: str = "res64",
                      weights: dict[str, float] | None = None) -> list[dict]:
  """Entries for several synthetic tasks (equal weights unless given)."""
  weights = weights or {}
  return [synthetic_scenes(t, config=config, weight=weights.get(t, 1.0)) for t in tasks]
