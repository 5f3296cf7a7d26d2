"""Evaluation: predict every (dataset, task) entry of the config, decode, measure, write, show.

For each evaluation entry the split is read at full resolution (the entry's `pp_eval` without its
resizing, `datasets.eval_tfds`); each image is fitted into the model's square keeping its aspect
ratio (longer side to the model resolution, the rest padded: `predict.fit_square`), the
paradigm's inference (EMA parameters) predicts the RGB answers, the entry's task object (built
from the entry's `task` and `task_options`, the same object that encoded its training targets)
decodes them, the padding is cropped off and the task brings the answer to the size of the
ground truth (`Task.resize`), which feeds its own evaluator, which also scores a trivial baseline
(what a model that learned nothing would score). Composite tasks (panoptic = semantic + instance) are scored
from their parts' answers on the same images wherever a dataset has entries for all parts and
the parts know what the composite needs. Results go to `<workdir>/eval_metrics.json` (per step,
per task, with the task's headline metric and its direction), TensorBoard scalars, a printed
table and a picture of inputs / ground truth / predictions per task.

One benchmark the way the papers score it (`main eval --protocol NAME`) is
`protocol_eval.py`'s job.

With several processes (multi-host), every process reads the whole evaluation split in the same
order, `eval.batch_size` is the global batch, the inference runs sharded over all devices, and
its predictions are gathered back to every process. So every process computes the same metrics
from every example (a composite needs its parts' answers of the same images), and all
processes make the same sequence of calls, which they must: each is a collective over all
devices. Only process 0 writes files.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

from etils import epath
import jax
import numpy as np

from dense_diffusion import errors
from dense_diffusion import sharding
from dense_diffusion import tasks as tasks_lib
from dense_diffusion import workdir as workdir_lib
from dense_diffusion.datasets import prepare
from dense_diffusion.experiment import config as config_lib

METRICS_FILE = workdir_lib.METRICS_FILE


@dataclasses.dataclass
class _Entry:
  name: str  # the results key: the task name, or "task:dataset" when several entries share it
  entry: dict
  task: tasks_lib.Task


@dataclasses.dataclass
class _Composite:
  name: str  # the results key: the task name, or "task:dataset" when several datasets have it
  dataset: str
  task: tasks_lib.Task
  parts: dict[str, str]  # part task name -> the results key of its entry


def headline(task: tasks_lib.Task) -> dict:
  """What the summary table shows of a task: its headline metric and which way is better."""
  return {"headline": task.headline, "higher_is_better": task.higher_is_better}


class Evaluator:
  """Runs every evaluation entry of a config with an `Experiment`'s model."""

  def __init__(self, config: Any, experiment: Any, workdir: str | os.PathLike):
    self.config = config
    self.experiment = experiment
    self.paths = workdir_lib.WorkdirPaths(workdir)  # local or gs://
    eval_config = config.eval
    entries = [dict(e) for e in (eval_config.get("entries") or config.input.entries)]
    # The built-in synthetic_scenes is prepared if missing (progress shown); a missing real
    # dataset stops here with one line, before any evaluation work.
    prepare.ensure_prepared(entries, config.input.get("data_dir"))
    entry_tasks = config_lib.entry_tasks(entries)
    counts = collections.Counter(t.name for t in entry_tasks)
    self.entries = [
        _Entry(t.name if counts[t.name] == 1 else f"{t.name}:{e['dataset']}", e, t)
        for e, t in zip(entries, entry_tasks)]
    self.composites = self._composites()
    self.batch_size = int(eval_config.batch_size)
    shards = math.prod(experiment.mesh.shape[a] for a in sharding.BATCH_AXES)
    if self.batch_size % shards:
      raise errors.ConfigError(
          f"eval.batch_size {self.batch_size} does not divide over the {shards} data-parallel "
          "shards of the mesh; set it to a multiple of that")
    self.max_examples = eval_config.get("max_examples")
    self.resolution = int(config.model.unet["sample_size"])
    self._predict = experiment.make_predictor()

  def _composites(self) -> list[_Composite]:
    """Every composite task whose parts all have entries of one dataset (and can build it)."""
    by_dataset: dict[str, list[_Entry]] = collections.defaultdict(list)
    for item in self.entries:
      by_dataset[item.entry["dataset"]].append(item)
    found = []
    for name in tasks_lib.composites():
      for dataset, items in by_dataset.items():
        task = tasks_lib.compose(name, [item.task for item in items])
        if task is not None:
          key = {item.task.name: item.name for item in reversed(items)}  # the first entry's
          found.append(_Composite(name, dataset, task, {
              p: key[t] for p, t in task.part_names().items()}))
    counts = collections.Counter(c.name for c in found)
    for c in found:
      if counts[c.name] > 1:
        c.name = f"{c.name}:{c.dataset}"
    return found

  def run(self, state: Any, step: int, writer: Optional[Any] = None) -> dict:
    """Evaluates every entry; returns {task: {metric: value, "baseline": {...}, ...}}."""
    from dense_diffusion import predict  # pylint: disable=g-import-not-at-top
    from dense_diffusion.datasets import eval_tfds  # pylint: disable=g-import-not-at-top

    params = state.ema if self.config.eval.get("use_ema", True) else state.params
    key = jax.random.key(int(self.config.seed) + 1)
    kept_names = {n for c in self.composites for n in c.parts.values()}
    kept: dict[str, dict[str, list]] = {}  # entry name -> decoded answers, labels, inputs
    results, grid = {}, []
    start = time.time()
    shardings = self.experiment.batch_shardings
    task_index = {n: i for i, n in enumerate(self.experiment.task_names)}
    for item in self.entries:
      # The whole split on every process (see the module doc), at full resolution; batches of
      # the global size, each image fitted into the model's square keeping its aspect ratio.
      examples = eval_tfds.examples(item.entry, item.task,
                                    data_dir=self.config.input.get("data_dir"))
      evaluator = item.task.evaluator()
      store = {"answers": [], "labels": [], "inputs": []} if item.name in kept_names else None
      seen = 0
      for chunk in chunks(examples, self.batch_size, self.max_examples):
        fitted = [predict.fit_square(ex.image, self.resolution) for ex in chunk]
        padded = np.zeros((self.batch_size, self.resolution, self.resolution, 3), np.float32)
        padded[:len(chunk)] = [x for x, _ in fitted]
        tasks = np.full((self.batch_size,), task_index[item.entry["task"]], np.int32)
        image = sharding.global_array(padded, shardings["image"])
        task = sharding.global_array(tasks, shardings["task"])
        key, sub = jax.random.split(key)
        pred = sharding.to_host(self._predict(params, self.experiment.frozen, image, task,
                                              sub))[:len(chunk)]
        decoded = item.task.decode(np.clip(pred, -1.0, 1.0))
        answers = [predict.crop_answer(d, content) for d, (_, content) in zip(decoded, fitted)]
        truths = [ex.truth for ex in chunk]
        inputs = [ex.image.astype(np.float32) / 127.5 - 1.0 for ex in chunk]
        evaluator.update([item.task.resize(a, *item.task.answer_size(gt))
                          for a, gt in zip(answers, truths)], truths, inputs)
        if store is not None:
          store["answers"].extend(answers)
          store["labels"].extend(ex.labels for ex in chunk)
          store["inputs"].extend(inputs)
        if seen == 0:
          n = int(self.config.eval.get("num_grid_examples", 4))
          grid.append((item.name, padded[:min(n, len(chunk))],
                       [item.task.encode(gt) for gt in truths[:n]], pred[:n]))
        seen += len(chunk)
      results[item.name] = {**evaluator.result(), "num_examples": seen, **headline(item.task)}
      if store is not None:
        kept[item.name] = store
    for composite in self.composites:
      result = self._composite(composite, kept)
      if result is not None:
        results[composite.name] = result
    elapsed = time.time() - start
    self._write(results, step, writer, grid)
    print(format_table(results, step, elapsed), flush=True)
    return results

  def _composite(self, composite: _Composite, kept: dict) -> Optional[dict]:
    """Scores a composite from its parts' answers on the same images (None: no ground truth)."""
    task = composite.task
    parts = {p: kept[name] for p, name in composite.parts.items()}
    first = next(iter(parts.values()))
    if len({len(p["answers"]) for p in parts.values()}) != 1:
      raise ValueError(f"{composite.name}: its parts were evaluated on different numbers of "
                       "examples")
    evaluator = task.evaluator()
    part_tasks = {p: e.task for p in parts for e in self.entries if e.name == composite.parts[p]}
    for i, example in enumerate(first["labels"]):
      try:
        truth = task.answer(example)
      except KeyError as e:
        print(f"{composite.name} not evaluated: the evaluation examples have no {e} label",
              flush=True)
        return None
      h, w = task.answer_size(truth)
      answers = {p: part_tasks[p].resize(parts[p]["answers"][i], h, w) for p in parts}
      evaluator.update([task.combine(answers)], [truth], [first["inputs"][i]])
    return {**evaluator.result(), "num_examples": len(first["labels"]), **headline(task)}

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
          if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_examples":
            scalars[f"eval/{task}/{k}"] = float(v)
      writer.write_scalars(step, scalars)
      if picture is not None:
        writer.write_images(step, {"eval/predictions": picture[None]})
      writer.flush()


def chunks(items, size: int, limit: Optional[int] = None):
  """Lists of `size` consecutive items (the last may be shorter), `limit` items at most."""
  chunk, count = [], 0
  for item in items:
    if limit and count >= int(limit):
      break
    chunk.append(item)
    count += 1
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def is_better(values: dict) -> bool:
  """Whether a task's headline metric beats its trivial baseline (results of `run`)."""
  key = values["headline"]
  model, base = values[key], values.get("baseline", {}).get(key, float("nan"))
  return bool(model > base) if values["higher_is_better"] else bool(model < base)


def format_table(results: dict, step: int, seconds: float) -> str:
  """A short text table: task, headline metric, model vs trivial baseline."""
  lines = [f"evaluation at step {step} ({seconds:.0f}s):",
           f"  {'task':<10} {'metric':<9} {'model':>9} {'baseline':>9}  better?"]
  for task, values in results.items():
    key = values.get("headline")
    if key is None or key not in values:
      continue
    base = values.get("baseline", {}).get(key, float("nan"))
    lines.append(f"  {task:<10} {key:<9} {values[key]:>9.4f} {base:>9.4f}  "
                 f"{'yes' if is_better(values) else 'NO'}")
  return "\n".join(lines)


def evaluate_latest(config: Any, workdir: str) -> dict:
  """Evaluates the latest checkpoint of `workdir` (config: given, or the run's config.json)."""
  from dense_diffusion import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  config = config if config is not None else config_lib.load(workdir)
  # Before the model is built: a dataset that is missing is prepared, or named, first.
  prepare.ensure_prepared(config.eval.get("entries") or config.input.entries,
                          config.input.get("data_dir"))
  exp = experiment_lib.Experiment(config)
  step, state = exp.restore_latest(workdir)
  with jax.set_mesh(exp.mesh):
    return Evaluator(config, exp, workdir).run(state, step)


def _to_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip((np.asarray(x, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def save_grid(grid: list, path: str | os.PathLike) -> Optional[np.ndarray]:
  """One row per task: (input, ground truth, prediction) for a few examples. Returns the image."""
  if not grid:
    return None
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

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
