"""Evaluation: sample every (dataset, task) of the config, decode, measure, write and show.

For each evaluation entry the configured sampler (EMA parameters) predicts the RGB answer, the
task object (built from the entry's own `encode_task` op, so encoding and decoding can never
disagree) decodes it, and a task evaluator accumulates metrics over the split together with a
trivial baseline (what a model that learned nothing would score). Results go to
`<workdir>/eval_metrics.json` (per step, per task), TensorBoard scalars, a printed table, and a
picture of inputs / ground truth / predictions per task.

With several processes (multi-host), every process reads the whole evaluation split in the same
order, `eval.batch_size` is the global batch, the sampler runs sharded over all devices, and
its predictions are gathered back to every process. So every process computes the same metrics
from every example (the panoptic merge needs the semantic and instance answers of the same
images), and all processes make the same sequence of sampler calls, which they must: each call
is a collective over all devices. Only process 0 writes files.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Optional

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from dense_diffusion import metrics
from dense_diffusion import sharding
from dense_diffusion import tasks as tasks_lib
from dense_diffusion import workdir as workdir_lib
from dense_diffusion.pp import builder as pp_builder
from dense_diffusion.pp import registry as pp_registry

METRICS_FILE = workdir_lib.METRICS_FILE


def task_from_pp(pp: str) -> tasks_lib.Task:
  """The task object of the (last) `encode_task(...)` op of a pp string."""
  found = None
  for spec in pp_builder.split_ops(pp):
    name, args, kwargs = pp_registry.parse(spec)
    if name == "encode_task":
      options = {k: v for k, v in kwargs.items() if k not in ("key", "outkey")}
      found = tasks_lib.get(args[0] if args else kwargs["task"], **options)
  if found is None:
    raise ValueError(f"pp {pp!r} has no encode_task op, so the evaluator cannot decode its task")
  return found


def _valid(batch: dict, key: str) -> list[np.ndarray]:
  """The unpadded label of every real example of a batch."""
  out = []
  for i in np.flatnonzero(batch["mask"]):
    shape = batch.get(f"{key}_shape")
    x = batch[key][i]
    if shape is not None:
      x = x[tuple(slice(0, int(s)) for s in shape[i])]
    out.append(x)
  return out


def _resize_like(pred: np.ndarray, shape: tuple[int, ...], nearest: bool) -> np.ndarray:
  """Resizes a decoded prediction [h, w, ...] to the label's [H, W] (metrics at full size)."""
  if pred.shape[:2] == tuple(shape[:2]):
    return pred
  method = "nearest" if nearest else "bilinear"
  out = jax.image.resize(jnp.asarray(pred, jnp.float32), tuple(shape[:2]) + pred.shape[2:], method)
  return np.asarray(out).astype(pred.dtype)


class TaskEvaluator:
  """Accumulates one task's metrics and its trivial baseline."""

  label: str = ""

  def __init__(self, task: tasks_lib.Task):
    self.task = task

  def update(self, decoded: np.ndarray, batch: dict) -> None:
    raise NotImplementedError

  def result(self) -> dict:
    raise NotImplementedError


class DepthEvaluator(TaskEvaluator):
  """AbsRel, RMSE, delta1, ... ; baseline: every image predicted as its own mean depth."""
  label = "label/depth"

  def __init__(self, task):
    super().__init__(task)
    max_depth = getattr(task, "max_depth", 10.0)
    self.model = metrics.DepthMetrics(max_depth=max_depth, alignment=task.alignment)
    self.baseline = metrics.DepthMetrics(max_depth=max_depth, alignment=task.alignment)

  def update(self, decoded, batch):
    for pred, gt in zip(decoded, _valid(batch, self.label)):
      pred = _resize_like(pred, gt.shape, nearest=False)
      self.model.update(pred, gt)
      valid = gt > 0
      self.baseline.update(np.full_like(gt, gt[valid].mean() if valid.any() else 1.0), gt)

  def result(self):
    return {**_pick(self.model.result(), ("abs_rel", "rmse", "delta1")),
            "baseline": _pick(self.baseline.result(), ("abs_rel", "rmse", "delta1"))}


class NormalsEvaluator(TaskEvaluator):
  """Mean/median angle, fraction under 11.25 deg; baseline: the image's mean normal everywhere."""
  label = "label/normals"

  def __init__(self, task):
    super().__init__(task)
    self.model, self.baseline = metrics.NormalMetrics(), metrics.NormalMetrics()

  def update(self, decoded, batch):
    for pred, gt in zip(decoded, _valid(batch, self.label)):
      pred = _resize_like(pred, gt.shape, nearest=False)
      self.model.update(pred, gt)
      mean = gt.reshape(-1, 3).mean(0)
      mean = mean / max(np.linalg.norm(mean), 1e-6)
      self.baseline.update(np.broadcast_to(mean, gt.shape).copy(), gt)

  def result(self):
    keys = ("mean", "median", "a11.25")
    return {**_pick(self.model.result(), keys), "baseline": _pick(self.baseline.result(), keys)}


class SemanticEvaluator(TaskEvaluator):
  """mIoU and pixel accuracy; baseline: the image's majority class everywhere."""
  label = "label/semantic"

  def __init__(self, task):
    super().__init__(task)
    k = task.num_classes
    self.model = metrics.SemanticConfusion(k)
    self.baseline = metrics.SemanticConfusion(k)
    self.decoded: list[np.ndarray] = []  # kept for the panoptic merge

  def update(self, decoded, batch):
    for pred, gt in zip(decoded, _valid(batch, self.label)):
      pred = _resize_like(pred, gt.shape, nearest=True)
      self.model.update(pred, gt)
      known = gt[gt != tasks_lib.IGNORE_LABEL]
      majority = np.bincount(known).argmax() if known.size else 0
      self.baseline.update(np.full_like(gt, majority), gt)
      self.decoded.append(pred)

  def result(self):
    keys = ("miou", "pixel_accuracy")
    return {**_pick(self.model.result(), keys), "baseline": _pick(self.baseline.result(), keys)}


class InstanceEvaluator(TaskEvaluator):
  """Class-agnostic PQ of the thing instances; baseline: no instances (PQ 0)."""
  label = "label/instance"
  _CATEGORIES = [{"id": 1, "isthing": 1}]

  def __init__(self, task):
    super().__init__(task)
    self.model = metrics.PanopticQuality(self._CATEGORIES)
    self.decoded: list[np.ndarray] = []

  @staticmethod
  def _as_panoptic(ids: np.ndarray):
    return ids, [{"id": int(i), "category_id": 1, "iscrowd": 0} for i in np.unique(ids) if i > 0]

  def update(self, decoded, batch):
    for pred, gt in zip(decoded, _valid(batch, self.label)):
      pred = _resize_like(pred, gt.shape, nearest=True)
      self.model.update(*self._as_panoptic(gt), *self._as_panoptic(pred))
      self.decoded.append(pred)

  def result(self):
    things = self.model.result()["Things"]
    return {"pq": things["pq"], "sq": things["sq"], "rq": things["rq"], "baseline": {"pq": 0.0}}


class ImageEvaluator(TaskEvaluator):
  """PSNR / SSIM against the clean image; baseline: the (degraded) input image itself."""
  label = "label/clean"

  def __init__(self, task, label: str = "label/clean"):
    super().__init__(task)
    self.label = label
    self.model, self.baseline = metrics.RestorationMetrics(1.0), metrics.RestorationMetrics(1.0)

  def update(self, decoded, batch):
    inputs = (batch["image"][batch["mask"]] + 1.0) * 0.5
    for pred, gt, x in zip(decoded, _valid(batch, self.label), inputs):
      gt = gt.astype(np.float32) / 255.0 if gt.dtype == np.uint8 else gt
      self.model.update(np.clip(_resize_like(pred, gt.shape, False), 0, 1), gt)
      self.baseline.update(np.clip(_resize_like(x, gt.shape, False), 0, 1), gt)

  def result(self):
    keys = ("psnr", "ssim")
    return {**_pick(self.model.result(), keys), "baseline": _pick(self.baseline.result(), keys)}


class ShadingEvaluator(TaskEvaluator):
  """RMSE of the shading; baseline: the image's mean shading everywhere."""
  label = "label/shading"

  def __init__(self, task):
    super().__init__(task)
    self.sq, self.sq_base, self.n = 0.0, 0.0, 0

  def update(self, decoded, batch):
    for pred, gt in zip(decoded, _valid(batch, self.label)):
      pred = _resize_like(pred, gt.shape, nearest=False)
      self.sq += float(np.mean((pred - gt) ** 2))
      self.sq_base += float(np.mean((gt.mean() - gt) ** 2))
      self.n += 1

  def result(self):
    n = max(self.n, 1)
    return {"rmse": math.sqrt(self.sq / n), "baseline": {"rmse": math.sqrt(self.sq_base / n)}}


EVALUATORS: dict[str, Callable[[tasks_lib.Task], TaskEvaluator]] = {
    "depth": DepthEvaluator,
    "normals": NormalsEvaluator,
    "semantic": SemanticEvaluator,
    "instance": InstanceEvaluator,
    "denoise": ImageEvaluator,
    "derain": ImageEvaluator,
    "lowlight": ImageEvaluator,
    "albedo": lambda task: ImageEvaluator(task, label="label/albedo"),
    "shading": ShadingEvaluator,
}

# What "better" means for each headline metric (the demo's learning checks use it).
HIGHER_IS_BETTER = {"abs_rel": False, "rmse": False, "delta1": True, "mean": False,
                    "median": False, "a11.25": True, "miou": True, "pixel_accuracy": True,
                    "pq": True, "sq": True, "rq": True, "psnr": True, "ssim": True}
HEADLINE = {"depth": "abs_rel", "normals": "mean", "semantic": "miou", "instance": "pq",
            "panoptic": "pq", "denoise": "psnr", "derain": "psnr", "lowlight": "psnr",
            "albedo": "psnr", "shading": "rmse"}


def _pick(d: dict, keys) -> dict:
  return {k: float(d[k]) for k in keys if k in d}


def _panoptic_from_labels(batch: dict) -> list[tuple[np.ndarray, list[dict]]]:
  out = []
  ids = _valid(batch, "label/panoptic_ids")
  seg = _valid(batch, "label/segment_id")
  cat = _valid(batch, "label/category_id")
  crowd = _valid(batch, "label/iscrowd")
  for i, s, c, w in zip(ids, seg, cat, crowd):
    out.append((i, [{"id": int(a), "category_id": int(b), "iscrowd": int(d)}
                    for a, b, d in zip(s, c, w) if a > 0]))
  return out


@dataclasses.dataclass
class _Entry:
  name: str  # "<dataset>/<task>"
  entry: dict
  task: tasks_lib.Task


class Evaluator:
  """Runs every evaluation entry of a config with a trained `train.Setup`'s model."""

  def __init__(self, config: Any, setup: Any, workdir: str | os.PathLike):
    self.config = config
    self.setup = setup
    self.paths = workdir_lib.WorkdirPaths(workdir)  # local or gs://
    eval_config = config.eval
    entries = eval_config.get("entries") or config.input.entries
    self.entries = []
    for e in entries:
      e = dict(e)
      task = task_from_pp(e.get("pp_eval") or e["pp"])
      if task.name not in EVALUATORS:
        raise ValueError(f"no evaluator for task {task.name!r}; known: {sorted(EVALUATORS)}")
      self.entries.append(_Entry(f"{e['dataset']}/{task.name}", e, task))
    self.batch_size = int(eval_config.batch_size)
    shards = math.prod(setup.mesh.shape[a] for a in ("data", "fsdp"))
    if self.batch_size % shards:
      raise ValueError(f"eval.batch_size {self.batch_size} does not divide over the {shards} "
                       "data-parallel shards of the mesh; set it to a multiple of that")
    self.max_examples = eval_config.get("max_examples")
    self.categories = eval_config.get("panoptic_categories")
    self._sample = setup.make_sampler()

  def run(self, state: Any, step: int, writer: Optional[Any] = None) -> dict:
    """Evaluates every entry; returns {task or panoptic: {metric: value, baseline: {...}}}."""
    import tensorflow_datasets as tfds
    from dense_diffusion import input_pipeline

    params = state.ema if self.config.eval.get("use_ema", True) else state.params
    key = jax.random.key(int(self.config.seed) + 1)
    results, grid = {}, []
    semantic_eval, instance_eval, panoptic_gt = None, None, []
    start = time.time()
    for item in self.entries:
      # The whole split on every process (see the module doc), batches of the global size.
      ds, _ = input_pipeline.get_eval_dataset(
          item.entry, self.setup.task_names, self.batch_size,
          data_dir=self.config.input.get("data_dir"), process_index=0, process_count=1)
      evaluator = EVALUATORS[item.task.name](item.task)
      seen = 0
      for batch in tfds.as_numpy(ds):
        if not batch["mask"].any():
          continue
        shardings = self.setup.batch_shardings
        image = sharding.global_array(batch["image"], shardings["image"])
        task = sharding.global_array(batch["task"], shardings["task"])
        key, sub = jax.random.split(key)
        pred = sharding.to_host(self._sample(params, self.setup.frozen, image, task, sub))
        real = batch["mask"]
        decoded = item.task.decode(np.clip(pred[real], -1.0, 1.0))
        evaluator.update(decoded, batch)
        if item.task.name == "semantic" and "label/panoptic_ids" in batch:
          panoptic_gt.extend(_panoptic_from_labels(batch))
        if seen == 0:
          n = int(self.config.eval.get("num_grid_examples", 4))
          grid.append((item.task.name, batch["image"][real][:n], batch["target"][real][:n],
                       pred[real][:n]))
        seen += int(real.sum())
        if self.max_examples and seen >= int(self.max_examples):
          break
      results[item.task.name] = evaluator.result()
      results[item.task.name]["num_examples"] = seen
      if item.task.name == "semantic":
        semantic_eval = evaluator
      if item.task.name == "instance":
        instance_eval = evaluator
    if semantic_eval and instance_eval and panoptic_gt and self._categories():
      results["panoptic"] = self._panoptic(semantic_eval, instance_eval, panoptic_gt)
    elapsed = time.time() - start
    self._write(results, step, writer, grid)
    print(format_table(results, step, elapsed), flush=True)
    return results

  def _categories(self):
    if self.categories:
      return [dict(c) for c in self.categories]
    from dense_diffusion.datasets.synthetic_scenes import renderer
    if any(e.entry["dataset"].startswith("synthetic_scenes") for e in self.entries):
      return [dict(c) for c in renderer.CATEGORIES]
    return None

  def _panoptic(self, semantic_eval, instance_eval, panoptic_gt) -> dict:
    """PQ of the semantic and instance predictions of the same images, merged."""
    categories = self._categories()
    merger = tasks_lib.get("panoptic", categories=categories)
    pq = metrics.PanopticQuality(categories)
    for sem, inst, (gt_ids, gt_segments) in zip(semantic_eval.decoded, instance_eval.decoded,
                                                panoptic_gt):
      merged = merger.merge(sem, inst)
      pq.update(gt_ids, gt_segments, merged["ids"], merged["segments"])
    r = pq.result()
    return {"pq": r["All"]["pq"], "sq": r["All"]["sq"], "rq": r["All"]["rq"],
            "pq_things": r["Things"]["pq"], "pq_stuff": r["Stuff"]["pq"],
            "num_examples": len(panoptic_gt), "baseline": {"pq": 0.0}}

  def _write(self, results: dict, step: int, writer, grid) -> None:
    if jax.process_index() != 0:
      return
    path = self.paths.metrics
    history = json.loads(path.read_text()) if path.exists() else {}
    history[str(step)] = results
    path.write_text(json.dumps(history, indent=2, sort_keys=True, default=float))
    picture = save_grid(grid, self.paths.prediction(step))
    if writer is not None:
      scalars = {}
      for task, values in results.items():
        for k, v in values.items():
          if isinstance(v, (int, float)) and k != "num_examples":
            scalars[f"eval/{task}/{k}"] = float(v)
      writer.write_scalars(step, scalars)
      if picture is not None:
        writer.write_images(step, {"eval/predictions": picture[None]})
      writer.flush()


def format_table(results: dict, step: int, seconds: float) -> str:
  """A short text table: task, headline metric, model vs trivial baseline."""
  lines = [f"evaluation at step {step} ({seconds:.0f}s):",
           f"  {'task':<10} {'metric':<9} {'model':>9} {'baseline':>9}  better?"]
  for task, values in results.items():
    key = HEADLINE.get(task)
    if key is None or key not in values:
      continue
    model, base = values[key], values.get("baseline", {}).get(key, float("nan"))
    higher = HIGHER_IS_BETTER[key]
    better = (model > base) if higher else (model < base)
    lines.append(f"  {task:<10} {key:<9} {model:>9.4f} {base:>9.4f}  {'yes' if better else 'NO'}")
  return "\n".join(lines)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def save_grid(grid: list, path: str | os.PathLike) -> Optional[np.ndarray]:
  """One row per task: (input, ground truth, prediction) for a few examples. Returns the image."""
  if not grid:
    return None
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  n = max(len(g[1]) for g in grid)
  fig, axes = plt.subplots(len(grid), 3 * n, figsize=(1.2 * 3 * n, 1.35 * len(grid)),
                           squeeze=False)
  for row, (task, images, targets, preds) in enumerate(grid):
    for i in range(n):
      for j, (title, x) in enumerate((("input", images), ("truth", targets), ("pred", preds))):
        ax = axes[row, 3 * i + j]
        ax.axis("off")
        if i < len(x):
          ax.imshow(_to_uint8(x[i]), interpolation="nearest")
        if row == 0:
          ax.set_title(title, fontsize=7)
    axes[row, 0].text(-0.1, 0.5, task, transform=axes[row, 0].transAxes, ha="right",
                      va="center", fontsize=8)
  fig.tight_layout()
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Through epath's file object: matplotlib itself opens only local paths, not gs://.
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=80)
  fig.canvas.draw()
  picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  plt.close(fig)
  return picture
