"""One benchmark scored the way the papers do (`main eval --protocol NAME`).

`run_protocol` answers a dataset with a trained run (`predict.Predictor`, aspect ratio kept) or a
pretrained Marigold-format pipeline (`predict.PretrainedPredictor`), on a Marigold-layout folder
(`datasets.eval_folder`) or a TFDS split at full resolution (`datasets.eval_tfds`), scores each
image with the protocol's scorer (`metrics.protocol`), and `evaluate_protocol` writes
`per_image.json`, `summary.json`, `summary.md` (a markdown table) and `worst.png` (the worst
cases by the protocol's headline). docs/evaluation.md lists the protocols and their sources.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Optional

from etils import epath
import numpy as np

from dense_diffusion import errors
from dense_diffusion import tasks as tasks_lib
from dense_diffusion.datasets import prepare
from dense_diffusion.evaluate import chunks


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
  for chunk in chunks(examples, batch_size, max_examples):
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
    prepare.ensure_prepared([entry], data_dir)  # synthetic_scenes: made if missing
    examples = eval_tfds.examples(entry, task, split=split, data_dir=data_dir)
  batch = 1  # a pipeline call answers one image (of its own size)
  if pretrained is None:
    answerer.load()  # the run's batch size
    batch = answerer.batch_size
  about = {"model": str(model), "dataset": str(dataset or where)}
  return evaluate_protocol(answerer, task, proto, examples, output, options=options,
                           batch_size=batch, max_examples=max_examples, about=about)
