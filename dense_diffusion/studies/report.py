"""A study's results as files: study.md (arm x task table), study.csv, bars and a prediction grid.

Every number comes from the arms' own `eval_metrics.json` (each task's headline metric, and its
trivial baseline), and from the ceiling rows given (an answer through the arms' space and back).
"""
from __future__ import annotations

import csv
import math
import os
from typing import Mapping, Optional

import numpy as np

TABLE, CSV, BARS, GRID = "study.md", "study.csv", "study.png", "study_predictions.png"
BASELINE = "trivial baseline"


def tasks_of(results: Mapping[str, dict]) -> list:
  """The tasks with a headline metric, in the order of their first appearance."""
  seen = {}
  for metrics in results.values():
    for task, values in metrics.items():
      if isinstance(values, dict) and values.get("headline") in values:
        seen.setdefault(task, (values["headline"], bool(values["higher_is_better"])))
  return list(seen.items())


def rows(results: Mapping[str, dict], ceilings: Optional[Mapping[str, dict]] = None) -> list:
  """(row name, kind, task, metric, value, higher_is_better) for every arm, the baseline and
  every ceiling; a value an arm does not have is NaN."""
  tasks = tasks_of(results)
  out = []
  for arm, metrics in results.items():
    for task, (metric, higher) in tasks:
      value = metrics.get(task, {}).get(metric, math.nan)
      out.append((arm, "arm", task, metric, float(value), higher))
  for task, (metric, higher) in tasks:
    base = next((m[task]["baseline"][metric] for m in results.values()
                 if metric in m.get(task, {}).get("baseline", {})), math.nan)
    out.append((BASELINE, "baseline", task, metric, float(base), higher))
  for name, values in (ceilings or {}).items():
    for task, (metric, higher) in tasks:
      out.append((name, "ceiling", task, metric,
                  float(values.get(task, {}).get(metric, math.nan)), higher))
  return out


def _fmt(value: float) -> str:
  return "-" if math.isnan(value) else f"{value:.4f}"


def markdown(title: str, table_rows: list, notes: str = "") -> str:
  """The arm x task table; the best arm of each task in bold."""
  tasks = list(dict.fromkeys((r[2], r[3], r[5]) for r in table_rows))
  names = list(dict.fromkeys((r[0], r[1]) for r in table_rows))
  value = {(r[0], r[2]): r[4] for r in table_rows}
  best = {}
  for task, _, higher in tasks:
    arm_values = [value[(n, task)] for n, k in names if k == "arm"
                  if not math.isnan(value[(n, task)])]
    if arm_values:
      best[task] = max(arm_values) if higher else min(arm_values)
  header = ["arm"] + [f"{t} {m} ({'higher' if h else 'lower'} is better)" for t, m, h in tasks]
  lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
           "|" + "---|" * len(header)]
  for name, kind in names:
    cells = []
    for task, _, _ in tasks:
      v = value[(name, task)]
      text = _fmt(v)
      cells.append(f"**{text}**" if kind == "arm" and best.get(task) == v else text)
    label = name if kind == "arm" else f"*{name}*"
    lines.append("| " + " | ".join([label] + cells) + " |")
  if notes:
    lines += ["", notes]
  return "\n".join(lines) + "\n"


def write_csv(path: str, table_rows: list) -> None:
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["row", "kind", "task", "metric", "value", "higher_is_better"])
    for r in table_rows:
      writer.writerow([r[0], r[1], r[2], r[3], repr(r[4]), r[5]])


def bars(path: str, table_rows: list, title: str) -> None:
  """One panel per task: a bar per arm, the baseline dashed, each ceiling dotted."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = list(dict.fromkeys((r[2], r[3], r[5]) for r in table_rows))
  fig, axes = plt.subplots(1, len(tasks), figsize=(3.0 * len(tasks), 3.2), squeeze=False)
  for ax, (task, metric, higher) in zip(axes[0], tasks):
    arms = [r for r in table_rows if r[2] == task and r[1] == "arm"]
    ax.bar(range(len(arms)), [0.0 if math.isnan(r[4]) else r[4] for r in arms],
           color=[f"C{i}" for i in range(len(arms))])
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels([r[0] for r in arms], rotation=40, ha="right", fontsize=7)
    shown = [r[4] for r in table_rows if r[2] == task and r[1] != "ceiling"
             and not math.isnan(r[4])]
    top = max(shown, default=0.0)
    for r in table_rows:
      # A ceiling far above the bars (an exact round trip's PSNR) is in the table only.
      if r[1] == "ceiling" and abs(r[4]) > 2.0 * abs(top):
        continue
      if r[2] == task and r[1] != "arm" and not math.isnan(r[4]):
        ax.axhline(r[4], color="k", linestyle="--" if r[1] == "baseline" else ":",
                   linewidth=1, label=r[0])
    ax.set_title(f"{task}: {metric} ({'higher' if higher else 'lower'} is better)", fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
  handles, labels = axes[0][0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=90)
  plt.close(fig)


def prediction_grid(path: str, pictures: Mapping[str, str]) -> bool:
  """The arms' evaluation pictures (same scenes: each evaluation starts at the split's first
  examples) stacked, one row per arm; False when no arm has one."""
  found = {name: p for name, p in pictures.items() if os.path.isfile(p)}
  if not found:
    return False
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  images = {name: plt.imread(p) for name, p in found.items()}
  width = max(im.shape[1] for im in images.values())
  height = sum(im.shape[0] for im in images.values())
  fig, axes = plt.subplots(len(images), 1, squeeze=False,
                           figsize=(width / 80, height / 80 + 0.3 * len(images)))
  for ax, (name, im) in zip(axes[:, 0], images.items()):
    ax.imshow(np.asarray(im))
    ax.set_title(name, fontsize=9, loc="left")
    ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)
  return True


def write(directory: str, title: str, results: Mapping[str, dict],
          ceilings: Optional[Mapping[str, dict]] = None, pictures: Optional[Mapping] = None,
          notes: str = "") -> dict:
  """Writes the table, CSV and pictures into `directory`; returns {kind: path}."""
  os.makedirs(directory, exist_ok=True)
  table_rows = rows(results, ceilings)
  paths = {"table": os.path.join(directory, TABLE), "csv": os.path.join(directory, CSV),
           "bars": os.path.join(directory, BARS)}
  with open(paths["table"], "w", encoding="utf-8") as f:
    f.write(markdown(title, table_rows, notes))
  write_csv(paths["csv"], table_rows)
  bars(paths["bars"], table_rows, title)
  grid = os.path.join(directory, GRID)
  if prediction_grid(grid, pictures or {}):
    paths["grid"] = grid
  return paths
