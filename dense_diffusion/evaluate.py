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

`evaluate_protocol` / `run_protocol` (`main eval --protocol NAME`) score one benchmark the way the
papers do (`metrics.protocol`), for a trained run or a pretrained pipeline, on a Marigold-layout
folder or a TFDS split, and write per-image and summary metrics, a markdown table and the worst
cases.

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
    by_dataset: dict[str, dict[str, _Entry]] = collections.defaultdict(dict)
    for item in self.entries:
      by_dataset[item.entry["dataset"]].setdefault(item.task.name, item)
    found = []
    for name in tasks_lib.composites():
      cls = tasks_lib.base.TASKS.get(name)
      for dataset, items in by_dataset.items():
        if not set(cls.parts) <= set(items):
          continue
        task = cls.from_parts({p: items[p].task for p in cls.parts})
        if task is not None:
          found.append(_Composite(name, dataset, task, {p: items[p].name for p in cls.parts}))
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
      for chunk in _chunks(examples, self.batch_size, self.max_examples):
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


def _chunks(items, size: int, limit: Optional[int] = None):
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


# --- one benchmark, image by image (`main eval --protocol NAME`) ------------------------------


@dataclasses.dataclass
class _Case:
  """One scored image kept for the worst-cases picture."""
  value: float
  name: str
  image: np.ndarray
  truth: Any
  answer: Any


def evaluate_protocol(answerer: Any, task: tasks_lib.Task, protocol: Any,
                      examples: Any, output: str | os.PathLike, *,
                      options: Optional[dict] = None, batch_size: int = 1,
                      max_examples: Optional[int] = None, num_worst: int = 4,
                      about: Optional[dict] = None,
                      log=lambda s: print(s, flush=True)) -> dict:
  """Scores `answerer`'s answers on `examples` under `protocol`; writes the report into `output`.

  Args:
    answerer: `answer(images u8[H, W, 3] list, task name) -> answers at the images' sizes`
      (`predict.Predictor` keeps the aspect ratio: longer side to the model resolution, padded,
      answer cropped and resized back; `predict.PretrainedPredictor` as the pipeline does).
    task: the task object whose answers `protocol` scores (its options: classes, categories).
    protocol: a `metrics.Protocol`.
    examples: iterable of `datasets.eval_folder.Example` (image, truth at full resolution, mask).
    output: folder for `per_image.json`, `summary.json`, `summary.md` and `worst.png`.
    options: the protocol's settings to override (depth: `alignment`, ...).
    batch_size: images answered per call.
    max_examples: stop after this many images.
    num_worst: images in the worst-cases picture (ranked by the protocol's headline).
    about: what the summary records of the model and dataset ({"model": ..., "dataset": ...}).
  Returns:
    The summary dict written to `summary.json`.
  """
  options = dict(options or {})
  scorer = protocol.scorer(task, **options)
  per_image, worst = [], []
  start, seen = time.time(), 0
  for chunk in _chunks(examples, batch_size, max_examples):
    answers = answerer.answer([ex.image for ex in chunk], protocol.task)
    for ex, answer in zip(chunk, answers):
      answer = task.resize(answer, *task.answer_size(ex.truth))
      scores = scorer.add(answer, ex.truth, ex.mask)
      per_image.append({"name": ex.name, **(scores if scores else {"counted": False})})
      if scores and math.isfinite(scores.get(protocol.headline, math.nan)):
        _keep_worst(worst, _Case(scores[protocol.headline], ex.name, ex.image, ex.truth, answer),
                    num_worst, protocol.higher_is_better)
    seen += len(chunk)
    log(f"{protocol.name}: {seen} images ({time.time() - start:.0f}s)")
  if not per_image:
    raise errors.MissingError(f"no images to evaluate for protocol {protocol.name}")
  summary = {
      "protocol": protocol.name, "task": protocol.task, **(about or {}),
      "options": {k: v for k, v in options.items()},
      "headline": protocol.headline, "higher_is_better": protocol.higher_is_better,
      "metrics": scorer.summary(), "num_images": len(per_image),
      "seconds": round(time.time() - start, 1), "source": protocol.source,
  }
  write_report(output, summary, per_image, worst)
  log(format_protocol_table(summary))
  return summary


def _keep_worst(worst: list, case: _Case, n: int, higher_is_better: bool) -> None:
  """Keeps the `n` cases with the worst headline value in `worst` (worst first)."""
  worst.append(case)
  worst.sort(key=lambda c: c.value, reverse=not higher_is_better)
  del worst[n:]


def format_protocol_table(summary: dict) -> str:
  """The summary as a markdown table: one row, the protocol's metrics as columns."""
  metrics = {k: v for k, v in summary["metrics"].items() if not k.startswith("num_")}
  head = ["protocol", "dataset", "model", "images", *metrics]
  row = [summary["protocol"], str(summary.get("dataset", "")), str(summary.get("model", "")),
         str(summary["num_images"]), *(f"{v:.4f}" for v in metrics.values())]
  arrow = "higher" if summary["higher_is_better"] else "lower"
  return "\n".join([
      "| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |",
      "", f"Headline: {summary['headline']} ({arrow} is better). Options: "
      f"{json.dumps(summary.get('options', {}))}."])


def write_report(output: str | os.PathLike, summary: dict, per_image: list, worst: list
                 ) -> None:
  """`summary.json`, `summary.md`, `per_image.json` and `worst.png` in `output`."""
  out = epath.Path(output)
  out.mkdir(parents=True, exist_ok=True)
  (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
  (out / "per_image.json").write_text(json.dumps(per_image, indent=2, default=float))
  lines = [f"# {summary['protocol']}", "", format_protocol_table(summary), ""]
  if worst:
    lines += [f"Worst images by {summary['headline']} (worst.png):", ""]
    lines += [f"- {c.name}: {c.value:.4f}" for c in worst]
  (out / "summary.md").write_text("\n".join(lines) + "\n")
  if worst:
    save_worst(worst, out / "worst.png", summary["headline"])


def render(x: Any) -> np.ndarray:
  """u8[H, W, 3] picture of an image, a ground truth or an answer, by what the array holds:
  an id map ({"ids": ...} or integers) in colours per id, one channel (depth, shading) between
  its 2nd and 98th percentiles in grey, three channels with negative values (normals) as
  (n + 1) / 2, other three-channel floats as RGB in [0, 1]."""
  if isinstance(x, dict):
    x = x["ids"]
  x = np.asarray(x)
  if x.ndim == 3 and x.shape[-1] == 1:
    x = x[..., 0]
  if np.issubdtype(x.dtype, np.integer) and x.ndim == 2:
    ids = x.astype(np.int64)
    rgb = np.stack([(ids * 97) % 251, (ids * 57) % 241, (ids * 29) % 239], -1)
    return np.where((ids == 0)[..., None], 0, rgb).astype(np.uint8)
  if x.dtype == np.uint8:
    return x if x.ndim == 3 else np.repeat(x[..., None], 3, -1)
  x = x.astype(np.float32)
  if x.ndim == 2:
    finite = x[np.isfinite(x) & (x != 0)]
    lo, hi = np.percentile(finite, (2, 98)) if finite.size else (0.0, 1.0)
    v = np.clip((np.nan_to_num(x) - lo) / max(hi - lo, 1e-12), 0, 1)
    return np.repeat((v * 255 + 0.5).astype(np.uint8)[..., None], 3, -1)
  if x.min() < 0:
    x = (x + 1.0) * 0.5
  return (np.clip(x, 0, 1) * 255 + 0.5).astype(np.uint8)


def save_worst(cases: list, path: str | os.PathLike, headline: str) -> None:
  """One row per case: input, ground truth, answer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(cases), 3, figsize=(9, 2.6 * len(cases)), squeeze=False)
  for row, case in enumerate(cases):
    for col, (title, x) in enumerate((("input", case.image), ("truth", case.truth),
                                      ("answer", case.answer))):
      ax = axes[row, col]
      ax.imshow(render(x), interpolation="nearest")
      ax.axis("off")
      ax.set_title(f"{case.name}  {headline}={case.value:.4f}" if col == 0 else title,
                   fontsize=7)
  fig.tight_layout()
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=80)
  plt.close(fig)


def run_protocol(protocol: str, *, workdir: Optional[str] = None,
                 pretrained: Optional[str] = None, dataset: Optional[str] = None,
                 output: Optional[str] = None, alignment: Optional[str] = None,
                 split: Optional[str] = None, filename_list: Optional[str] = None,
                 depth_scale: float = 1000.0, batch_size: Optional[int] = None,
                 steps: Optional[int] = None, ensemble_size: int = 1,
                 processing_resolution: Optional[int] = None,
                 max_examples: Optional[int] = None) -> dict:
  """The `eval --protocol` command: a trained run (`workdir`) or a pretrained pipeline folder
  (`pretrained`) on a dataset (a Marigold-layout folder, a dataset reader's name, or by default
  the run's own evaluation entry), scored by the named protocol; returns the summary."""
  from dense_diffusion import metrics  # pylint: disable=g-import-not-at-top
  from dense_diffusion import predict  # pylint: disable=g-import-not-at-top
  from dense_diffusion.datasets import eval_folder  # pylint: disable=g-import-not-at-top
  from dense_diffusion.datasets import eval_tfds  # pylint: disable=g-import-not-at-top
  if (workdir is None) == (pretrained is None):
    raise errors.ConfigError("eval needs either --workdir (a trained run) or --pretrained (a "
                             "diffusers Marigold-format folder), not both")
  proto = metrics.protocol(protocol)
  options = {}
  if alignment is not None:
    options["alignment"] = None if alignment.lower() in ("none", "") else alignment
  if pretrained is not None:
    if output is None:
      raise errors.ConfigError("eval --pretrained needs --output (the folder for the report)")
    if dataset is None:
      raise errors.ConfigError("eval --pretrained needs --dataset (a Marigold-layout folder or "
                               "a dataset reader's name)")
    answerer = predict.PretrainedPredictor(pretrained, steps=steps, ensemble_size=ensemble_size,
                                           batch_size=batch_size,
                                           processing_resolution=processing_resolution)
    task = answerer.task_object(proto.task)
    data_dir, entries, model = None, None, pretrained
  else:
    if ensemble_size != 1 or processing_resolution is not None:
      raise errors.ConfigError("--ensemble_size and --processing_resolution are for --pretrained "
                               "pipelines; a trained run answers at its model resolution")
    answerer = predict.Predictor(workdir, batch_size=batch_size, steps=steps)
    task = answerer.check_task(proto.task)
    config = answerer.config
    data_dir = config.input.get("data_dir")
    entries = [dict(e) for e in (config.eval.get("entries") or config.input.entries)]
    model = workdir
    output = output or str(epath.Path(workdir) / "eval" / proto.name)
  proto.scorer(task, **options)  # wrong settings stop here, before the model is built
  where = f"the run's evaluation entries ({workdir})"
  if dataset is not None and eval_folder.is_folder(dataset):
    eval_folder.count(dataset, filename_list)  # a missing or empty list stops here
    examples = eval_folder.examples(dataset, proto.task, filename_list=filename_list,
                                    depth_scale=depth_scale)
  else:
    if dataset is not None:
      entries, where = eval_tfds.reader_entries(dataset, proto.task), f"dataset {dataset!r}"
    entry = eval_tfds.pick_entry(entries, proto.task, where)
    examples = eval_tfds.examples(entry, task, split=split, data_dir=data_dir)
  batch = 1  # a pipeline call answers one image (of its own size)
  if pretrained is None:
    answerer.load()  # the run's batch size
    batch = answerer.batch_size
  about = {"model": str(model), "dataset": str(dataset or where)}
  return evaluate_protocol(answerer, task, proto, examples, output, options=options,
                           batch_size=batch, max_examples=max_examples, about=about)
