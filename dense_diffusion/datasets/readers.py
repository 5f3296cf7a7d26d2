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


def _foreground(dataset: str, task: str, label: str, method: str, resolution: int, split: str,
                eval_split: str, weight: float, to_unit: bool) -> dict:
  """An image + single-channel label PNG dataset (foreground/folders.py). The label is resized
  with `method` (area for a matte, nearest for a mask); `to_unit` maps an 8-bit matte to
  [0, 1] (a mask stays 0..255: the task reads > 128 as foreground, as DIS5K does)."""
  scale = _join(f'resize({resolution}, key="image", method="area")',
                f'resize({resolution}, key="{label}", method="{method}")', "value_range(-1, 1)",
                f'value_range(0, 1, key="{label}")' if to_unit else "")
  train = _join(f'squeeze("{label}")', _flip(("image", label)), scale)
  evalp = _join(f'squeeze("{label}")', f'copy("{label}", "label/{label}")', scale)
  return {"dataset": dataset, "split": split, "eval_split": eval_split, "task": task,
          "task_options": {}, "pp": train, "pp_eval": evalp, "weight": weight}


@register("p3m10k")
def p3m10k(resolution: int = 128, split: str = "train", weight: float = 1.0,
           eval_split: str = "p3m_500_np") -> dict:
  """P3M-10k portrait matting (our `p3m10k` builder): the alpha matte; evaluation on
  P3M-500-NP (the faces not blurred) or p3m_500_p."""
  return _foreground("p3m10k", "alpha_matte", "alpha", "area", resolution, split, eval_split,
                     weight, to_unit=True)


@register("am2k")
def am2k(resolution: int = 128, split: str = "train", weight: float = 1.0,
         eval_split: str = "validation") -> dict:
  """AM-2k animal matting (our `am2k` builder): the alpha matte."""
  return _foreground("am2k", "alpha_matte", "alpha", "area", resolution, split, eval_split,
                     weight, to_unit=True)


@register("dis5k")
def dis5k(resolution: int = 128, split: str = "train", weight: float = 1.0,
          eval_split: str = "validation") -> dict:
  """DIS5K (our `dis5k` builder): the binary mask; evaluation on DIS-VD (`validation`) or
  DIS-TE1..4 (`test1`..`test4`)."""
  return _foreground("dis5k", "dichotomous", "mask", "nearest", resolution, split, eval_split,
                     weight, to_unit=False)


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


# ------------------------------------------------------------------------------------------------
# The synthetic training sets of Marigold and GenPercept: Hypersim (indoor) and Virtual KITTI 2
# (driving), our `hypersim` and `vkitti2` builders (depth in metres, 0 = unknown).
SYNTHETIC_MIN_DEPTH = 1e-5  # metres: Marigold's lower bound for both sets.
HYPERSIM_MAX_DEPTH = 65.0  # metres: Marigold's range for Hypersim; farther pixels are unknown.
VKITTI_MAX_DEPTH = 80.0  # metres: Marigold's range for Virtual KITTI; farther pixels unknown.
HYPERSIM_CROP = 768  # training crop side: a random square of the full 768 x 1024 render height.
VKITTI_CROP = 375  # training crop side: a random square of the full 375 x 1242 frame height.
HYPERSIM_MAX_SHADING = 2.0  # shading at the image's exposure (hypersim.py); clipped above this.
# Marigold samples Hypersim 9 : Virtual KITTI 1 (its prob_ls [0.9, 0.1]).
MARIGOLD_WEIGHTS = {"hypersim": 0.9, "vkitti2": 0.1}

# task -> (pp turning the stored feature into the task's answer, resize method, pp after resize)
_DENSE_LABELS = {
    "depth": ("", "nearest", ""),  # depth_range is added with the entry's range
    "normals": ('cast("float32", key="normals")', "nearest", ""),
    "semantic": ('squeeze("semantic")|cast("int32", key="semantic")', "nearest", ""),
    "albedo": ("", "area", 'value_range(0, 1, key="albedo", clip=True)'),
    "shading": ('cast("float32", key="shading")', "area", ""),
}


def _dense_entry(dataset: str, task: str, resolution: int, crop: int | str | None, split: str,
                 weight: float, task_options: dict, min_depth: float, max_depth: float,
                 eval_split: str) -> dict:
  """The entry of a dense label stored at full resolution under the task's label key.

  Train: random `crop` x `crop` window ("square": a random square of the shorter side; None:
  the whole frame, squashed), flip (normals' x negated), resize to R (area for the image and
  shading / albedo, nearest for the rest).
  Eval: the raw answer at full resolution in "label/<key>", the image resized to R.
  """
  label = tasks_lib.get(task, **task_options).label_key
  prefix, method, post = _DENSE_LABELS[task]
  if task == "depth":
    prefix = f"depth_range({min_depth}, {max_depth})"
  is_normals = task == "normals"
  resize = _join(_resize(resolution),
                 f'resize({resolution}, key="{label}", method="{method}")')
  keys = ("image", label)
  flip = _flip(("image",), (label,)) if is_normals else _flip(keys)
  if crop == "square":
    crop_op = f"random_square_crop(keys={keys!r})"
  else:
    crop_op = f"random_crop(({crop}, {crop}), keys={keys!r})" if crop else ""
  train = _join(prefix, crop_op, flip, resize, post, "value_range(-1, 1)")
  evalp = _join(prefix, f'copy("{label}", "label/{label}")', resize, post, "value_range(-1, 1)")
  entry = {"dataset": dataset, "split": split, "eval_split": eval_split, "task": task,
           "task_options": task_options, "pp": train, "pp_eval": evalp, "weight": weight,
           "features": ["image", label, "key"]}
  if task == "semantic":
    entry["pad_values"] = {"label/semantic": 255}
  return entry


@register("hypersim")
def hypersim(task: str = "depth", resolution: int = 128, split: str = "train",
             weight: float = 1.0, config: str | None = None, crop: int | None = HYPERSIM_CROP,
             max_depth: float = HYPERSIM_MAX_DEPTH, affine_invariant: bool = False) -> dict:
  """Hypersim (our `hypersim` builder): depth, normals, semantic (NYU40), albedo or shading.

  Args:
    config: the builder config, "depth" (image + depth) or "all" (every label); default
      "depth" for the depth task, "all" for the others.
    crop: side of the random square training crop (None: squash the whole frame to R x R).
    max_depth: depth beyond it (metres) is unknown; with `affine_invariant` each image is
      normalised by its own quantiles instead (Marigold).
  """
  # pylint: disable-next=g-import-not-at-top
  from dense_diffusion.datasets.hypersim import hypersim as builder
  if task not in _DENSE_LABELS:
    raise errors.ConfigError(f"hypersim has no {task!r} labels; it has {sorted(_DENSE_LABELS)}")
  config = config or ("depth" if task == "depth" else "all")
  if task != "depth" and config != "all":
    raise errors.ConfigError(f"hypersim/{config} holds no {task} labels; use config='all'")
  options = {
      "depth": {"min_depth": 0.0, "max_depth": max_depth, "affine_invariant": affine_invariant},
      "semantic": {"num_classes": len(builder.NYU40_CLASSES), "categories": builder.categories()},
      "shading": {"max_shading": HYPERSIM_MAX_SHADING},
  }.get(task, {})
  return _dense_entry(f"hypersim/{config}", task, resolution, crop, split, weight, options,
                      SYNTHETIC_MIN_DEPTH, max_depth, "validation")


@register("vkitti2")
def vkitti2(task: str = "depth", resolution: int = 128, split: str = "train",
            weight: float = 1.0, config: str | None = None, crop: int | None = VKITTI_CROP,
            max_depth: float = VKITTI_MAX_DEPTH, affine_invariant: bool = False) -> dict:
  """Virtual KITTI 2 (our `vkitti2` builder): depth (sky and beyond `max_depth` unknown) or
  semantic (its 14 classes).

  Args:
    config: the builder config, "depth" (image + depth) or "all" (also the classes); default
      "depth" for the depth task, "all" for semantic.
    crop: side of the random square training crop (None: squash the whole frame to R x R).
  """
  # pylint: disable-next=g-import-not-at-top
  from dense_diffusion.datasets.vkitti2 import vkitti2 as builder
  if task not in ("depth", "semantic"):
    raise errors.ConfigError(f"vkitti2 has no {task!r} labels; it has depth and semantic")
  config = config or ("depth" if task == "depth" else "all")
  if task == "semantic" and config != "all":
    raise errors.ConfigError(f"vkitti2/{config} holds no semantic labels; use config='all'")
  options = ({"min_depth": 0.0, "max_depth": max_depth, "affine_invariant": affine_invariant}
             if task == "depth" else
             {"num_classes": len(builder.CLASSES), "categories": builder.categories()})
  return _dense_entry(f"vkitti2/{config}", task, resolution, crop, split, weight, options,
                      SYNTHETIC_MIN_DEPTH, max_depth, "validation")


def marigold_depth_mixture(resolution: int, affine_invariant: bool = True,
                           weights: dict[str, float] | None = None,
                           crops: dict[str, int | None] | None = None) -> list[dict]:
  """Marigold's (and GenPercept's) depth training mixture: Hypersim and Virtual KITTI 2,
  sampled 9 : 1 (`MARIGOLD_WEIGHTS`), depth affine-invariant by default.

  Args:
    weights, crops: per dataset ("hypersim", "vkitti2"), overriding `MARIGOLD_WEIGHTS` and the
      training crops (`HYPERSIM_CROP`, `VKITTI_CROP`).
  """
  weights = {**MARIGOLD_WEIGHTS, **(weights or {})}
  crops = {"hypersim": HYPERSIM_CROP, "vkitti2": VKITTI_CROP, **(crops or {})}
  return [hypersim("depth", resolution, weight=weights["hypersim"], crop=crops["hypersim"],
                   affine_invariant=affine_invariant),
          vkitti2("depth", resolution, weight=weights["vkitti2"], crop=crops["vkitti2"],
                  affine_invariant=affine_invariant)]


# ------------------------------------------------------------------------------------------------
# Pseudo-labelled sets (`main pseudo-label`: a folder of images with teachers' answers, DMP).
PSEUDO_LABELLED = "pseudo_labelled"  # the TFDS builder; a set is pseudo_labelled/NAME.


def pseudo_labelled_options(path: str) -> dict[str, dict]:
  """{task: the options its labels are in} of the set in folder `path`
  (DATA_DIR/pseudo_labelled/NAME), read from its metadata."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir, name = _pseudo_labelled_location(path)
  builder = tfds.builder(f"{PSEUDO_LABELLED}/{name}", data_dir=data_dir)
  return {task: dict(options) for task, options in builder.info.metadata["task_options"].items()}


def _pseudo_labelled_location(path: str) -> tuple[str, str]:
  """(data_dir, NAME) of a set's folder DATA_DIR/pseudo_labelled/NAME."""
  import os  # pylint: disable=g-import-not-at-top
  folder = os.path.normpath(os.fspath(path))
  parent, name = os.path.split(folder)
  if os.path.basename(parent) != PSEUDO_LABELLED:
    raise errors.ConfigError(f"{path} is not a pseudo-labelled set's folder: give "
                             f"DATA_DIR/{PSEUDO_LABELLED}/NAME (what main pseudo-label printed)")
  if not os.path.isdir(folder):
    raise errors.MissingError(f"no pseudo-labelled set at {path}; make it with `python -m "
                              "dense_diffusion.main pseudo-label` (docs/data.md)")
  return os.path.dirname(parent), name


@register("pseudo_labelled")
def pseudo_labelled(task: str, path: str | None = None, resolution: int = 128,
                    split: str = "train", weight: float = 1.0, name: str | None = None,
                    task_options: dict | None = None) -> dict:
  """One task of a pseudo-labelled set (our `pseudo_labelled` builder, made by `main
  pseudo-label`): depth, normals, semantic, albedo or shading.

  Train: a random square of the shorter side (the images have any size), flip, resize to R;
  evaluation (split "train", the only one: agreement with the teachers): the raw label.

  Args:
    path: the set's folder, DATA_DIR/pseudo_labelled/NAME: the entry reads it from DATA_DIR
      (whatever config.input.data_dir is) with the task options its labels are in, read from
      its metadata (the set must exist when the config is made).
    name, task_options: instead of `path`: the set pseudo_labelled/NAME in config.input.data_dir
      and the options its labels are in, checked against the set's own when it is read.
  """
  if (path is None) == (name is None):
    raise errors.ConfigError("readers.pseudo_labelled needs path= (the set's folder) or "
                             "name= with task_options=, not both")
  data_dir = None
  if path is not None:
    data_dir, name = _pseudo_labelled_location(path)
    recorded = pseudo_labelled_options(path)
    if task not in recorded:
      raise errors.ConfigError(f"the pseudo-labelled set {path} has no {task} labels; it has "
                               f"{sorted(recorded)}")
    task_options = recorded[task]
  elif task_options is None:
    raise errors.ConfigError("readers.pseudo_labelled(name=...) needs the task_options its "
                             "labels are in")
  options = dict(task_options)
  if task not in _DENSE_LABELS:
    raise errors.ConfigError(f"pseudo-labelled sets hold {sorted(_DENSE_LABELS)}, not {task!r}")
  entry = _dense_entry(f"{PSEUDO_LABELLED}/{name}", task, resolution, "square", split, weight,
                       options, float(options.get("min_depth", 0.0)),
                       float(options.get("max_depth", 0.0)), eval_split="train")
  entry["data_dir"] = data_dir
  entry["expect_metadata"] = {"task_options": {task: options}}
  return entry
