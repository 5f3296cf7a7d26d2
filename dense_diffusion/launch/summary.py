"""One table of the runs under a folder: overrides and the latest eval_metrics.json of each run.

    python -m dense_diffusion.launch.summary runs/demo_lr [--csv out.csv] [--markdown out.md]
        [--metrics abs_rel,miou,depth/rmse]

A run is a folder listed in a sweep's `sweep.json` (its overrides come from there, and a run that
has not started yet is still listed), or any folder holding `config.json` or `eval_metrics.json`
(overrides read back from a `key=value,...` folder name). Each run gets one row: its path under
the root, one column per override key, its status (evaluated / no metrics yet / not started),
the step of its latest evaluation, and per-task metrics as `task/metric` columns. The markdown
table (printed, and written with --markdown) has the metrics compared against a trivial baseline
in eval_metrics.json, plus a `trivial baseline` row when all runs share it; the CSV has every
number, baselines as `task/baseline/metric`. Paths may be gs:// (read through etils.epath).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import math
import re
import sys
from typing import Any, Sequence

METRICS_FILE = "eval_metrics.json"  # what dense_diffusion.evaluate writes in a workdir
CONFIG_FILE = "config.json"
MANIFEST = "sweep.json"
_SKIP_DIRS = {"checkpoints", "predictions", "plugins"}  # inside a workdir, never runs
_MAX_DEPTH = 4  # how deep under the root run folders are looked for
_NAME_PART = re.compile(r"^([A-Za-z_][\w.]*)=(.*)$")


@dataclasses.dataclass
class RunRow:
  path: str  # relative to the root
  overrides: dict
  status: str = "not started"
  step: int | None = None
  metrics: dict = dataclasses.field(default_factory=dict)  # task -> {metric: value, baseline}


def _path(root: str):
  from etils import epath
  return epath.Path(root)


def _is_dir(path) -> bool:
  try:
    return path.is_dir()
  except OSError:
    return False


def _overrides_from_name(name: str) -> dict:
  """`lr=0.001,batch_size=16` -> {'lr': '0.001', 'batch_size': '16'}; {} for other names."""
  parts = [_NAME_PART.match(p) for p in name.split(",")]
  return {m.group(1): m.group(2) for m in parts} if parts and all(parts) else {}


def find_runs(root: str) -> list[RunRow]:
  """Every run under `root`: those of sweep manifests first (in sweep order), then the others."""
  base = _path(root)
  if not _is_dir(base):
    raise FileNotFoundError(f"{root} is not a folder")
  rows: dict[str, RunRow] = {}
  folders: list[str] = []  # workdirs found by their files, relative to the root ("." for it)

  def visit(directory, rel: str, depth: int) -> None:
    manifest = directory / MANIFEST
    if manifest.exists():
      for run in json.loads(manifest.read_text())["runs"]:
        path = f"{rel}/{run['name']}" if rel else run["name"]
        rows.setdefault(path, RunRow(path, dict(run["overrides"])))
    if (directory / METRICS_FILE).exists() or (directory / CONFIG_FILE).exists():
      folders.append(rel or ".")
      return  # a workdir: its sub-folders are checkpoints and pictures.
    if depth >= _MAX_DEPTH:
      return
    for child in sorted(directory.iterdir(), key=lambda p: p.name):
      if child.name not in _SKIP_DIRS and _is_dir(child):
        visit(child, f"{rel}/{child.name}" if rel else child.name, depth + 1)

  visit(base, "", 0)
  for rel in sorted(folders):
    name = rel.rsplit("/", 1)[-1] if rel != "." else base.name
    rows.setdefault(rel, RunRow(rel, _overrides_from_name(name)))
  for row in rows.values():
    directory = base / row.path if row.path != "." else base
    metrics_file = directory / METRICS_FILE
    if metrics_file.exists():
      history = json.loads(metrics_file.read_text())
      if history:
        row.step = max(int(s) for s in history)
        row.metrics = {t: v for t, v in history[str(row.step)].items() if isinstance(v, dict)}
        row.status = "evaluated"
        continue
    if _is_dir(directory):
      row.status = "no metrics yet"
  return list(rows.values())


def _numbers(values: dict) -> dict:
  return {k: v for k, v in values.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _columns(rows: Sequence[RunRow], selected: Sequence[str] | None, compared_only: bool
             ) -> list[tuple[str, str]]:
  """(task, metric) columns in first-seen order; `selected` entries are `metric` or `task/metric`."""
  out: dict[tuple[str, str], None] = {}
  for row in rows:
    for task, values in row.metrics.items():
      baseline = values.get("baseline", {}) if isinstance(values, dict) else {}
      for metric in _numbers(values):
        if selected is not None:
          if metric not in selected and f"{task}/{metric}" not in selected:
            continue
        elif compared_only and metric not in baseline:
          continue
        out[(task, metric)] = None
  return list(out)


def _override_keys(rows: Sequence[RunRow]) -> list[str]:
  return list(dict.fromkeys(k for row in rows for k in row.overrides))


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return "nan" if math.isnan(value) else f"{value:.4g}"
  if isinstance(value, (list, tuple)):
    return ",".join(_cell(v) for v in value)
  return str(value)


def markdown(rows: Sequence[RunRow], selected: Sequence[str] | None = None) -> str:
  keys = _override_keys(rows)
  columns = _columns(rows, selected, compared_only=True)
  header = ["run", *keys, "status", "step", *(f"{t}/{m}" for t, m in columns)]
  lines = [header, ["---"] * len(header)]
  for row in rows:
    lines.append([row.path, *(_cell(row.overrides.get(k)) for k in keys), row.status,
                  _cell(row.step),
                  *(_cell(row.metrics.get(t, {}).get(m)) for t, m in columns)])
  baseline = _shared_baseline(rows, columns)
  if any(v for v in baseline.values()):
    lines.append(["trivial baseline", *([""] * len(keys)), "", "",
                  *(baseline[c] for c in columns)])
  return "\n".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |"
                   for line in lines) + "\n"


def _shared_baseline(rows: Sequence[RunRow], columns) -> dict:
  """Per column, the baseline value when every run that has it agrees ("differs" otherwise: the
  runs evaluated on different data), "" when no run has one."""
  out = {}
  for task, metric in columns:
    values = {row.metrics[task]["baseline"][metric] for row in rows
              if metric in row.metrics.get(task, {}).get("baseline", {})}
    out[(task, metric)] = _cell(values.pop()) if len(values) == 1 else (
        "differs" if values else "")
  return out


def csv_text(rows: Sequence[RunRow], selected: Sequence[str] | None = None) -> str:
  keys = _override_keys(rows)
  columns = _columns(rows, selected, compared_only=False)
  baseline_columns = list(dict.fromkeys(
      (t, m) for row in rows for t, values in row.metrics.items()
      for m in _numbers(values.get("baseline", {}))
      if (t, m) in columns or selected is None))
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(["run", *keys, "status", "step", *(f"{t}/{m}" for t, m in columns),
                   *(f"{t}/baseline/{m}" for t, m in baseline_columns)])
  for row in rows:
    writer.writerow([row.path, *(_csv_value(row.overrides.get(k)) for k in keys), row.status,
                     "" if row.step is None else row.step,
                     *(_csv_value(row.metrics.get(t, {}).get(m)) for t, m in columns),
                     *(_csv_value(row.metrics.get(t, {}).get("baseline", {}).get(m))
                       for t, m in baseline_columns)])
  return buffer.getvalue()


def _csv_value(value: Any) -> Any:
  if value is None:
    return ""
  if isinstance(value, (list, tuple, dict)):
    return json.dumps(value)
  return value


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dense_diffusion.launch.summary",
      description="One table of the runs under a folder (a sweep's root): overrides and the "
                  "latest evaluation of each.")
  parser.add_argument("root", help="e.g. runs/demo_lr or gs://BUCKET/runs/NAME")
  parser.add_argument("--csv", help="also write the table (every metric) as CSV here")
  parser.add_argument("--markdown", help="also write the markdown table here")
  parser.add_argument("--metrics", help="comma-separated metrics to show, as `metric` or "
                      "`task/metric` (default: markdown the baseline-compared ones, CSV all)")
  args = parser.parse_args(argv)
  selected = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
  rows = find_runs(args.root)
  if not rows:
    print(f"no runs under {args.root} (no sweep.json, config.json or {METRICS_FILE})",
          file=sys.stderr)
    return 1
  table = markdown(rows, selected)
  print(table, end="")
  if args.markdown:
    _path(args.markdown).write_text(table)
  if args.csv:
    _path(args.csv).write_text(csv_text(rows, selected))
  return 0


def run() -> int:
  """main() for the command line: a mistake in the input is one line, not a traceback."""
  try:
    return main()
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run())
