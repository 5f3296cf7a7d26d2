"""`main study` end to end on configs/tiny.py: one arm trained 2 steps, a second evaluating the
same checkpoint with another sampler setting (EVAL_KEYS); the table, CSV and pictures hold the
numbers of each arm's own eval_metrics.json; a second run skips both arms."""
import csv
import json
import os
import pathlib

import pytest

from dense_diffusion import errors
from dense_diffusion import studies
from dense_diffusion.studies import report
from dense_diffusion.studies import spec

STUDY = '''
"""A tiny study for the test."""
CONFIG = "configs/tiny.py"
NAME = "tiny_study"
EVAL_KEYS = ("diffusion.num_inference_steps",)
SCALES = {"cpu": dict(steps=2, overrides={"checkpoint_every": 2, "log_every": 1})}


def get_sweep():
  return [{"name": "one_step", "diffusion.num_inference_steps": 1},
          {"name": "two_steps", "diffusion.num_inference_steps": 2}]
'''


@pytest.fixture(scope="module")
def study_run(tmp_path_factory, synthetic_data_dir):
  base = tmp_path_factory.mktemp("study")
  path = base / "tiny_study.py"
  path.write_text(STUDY)
  lines = []
  paths = studies.run(str(path), str(base / "runs"), overrides={
      "input.data_dir": synthetic_data_dir}, out=lines.append)
  return base, path, paths, lines


def _final(workdir, step=2):
  return json.loads((pathlib.Path(workdir) / "eval_metrics.json").read_text())[str(step)]


def test_table_csv_and_pictures_hold_each_arms_metrics(study_run):
  base, _, paths, lines = study_run
  root = base / "runs" / "tiny_study"
  assert sorted(paths) == ["bars", "csv", "grid", "table"]
  for p in paths.values():
    assert os.path.getsize(p) > 0
  assert any("two_steps: evaluating the checkpoint of" in line for line in lines)
  # The second arm evaluated the first one's checkpoint: it has no checkpoints of its own.
  assert not (root / "two_steps" / "checkpoints").exists()
  rows = list(csv.DictReader(open(paths["csv"])))
  table = pathlib.Path(paths["table"]).read_text()
  for arm in ("one_step", "two_steps"):
    metrics = _final(root / arm)
    for task in ("depth", "semantic", "denoise"):
      metric = metrics[task]["headline"]
      (row,) = [r for r in rows if r["row"] == arm and r["task"] == task]
      assert row["metric"] == metric and float(row["value"]) == metrics[task][metric]
      assert f"{metrics[task][metric]:.4f}" in table
  baseline = [r for r in rows if r["kind"] == "baseline"]
  one = _final(root / "one_step")
  assert {r["task"]: float(r["value"]) for r in baseline} == {
      t: one[t]["baseline"][one[t]["headline"]] for t in ("depth", "semantic", "denoise")}
  # The pixel space's ceiling: the tasks' encodings keep the answer (depth exactly, labels all).
  ceiling = {r["task"]: float(r["value"]) for r in rows if r["kind"] == "ceiling"}
  assert ceiling["depth"] == pytest.approx(0.0, abs=1e-6)
  assert ceiling["semantic"] == pytest.approx(1.0)
  assert "| *trivial baseline* |" in table and "| *ceiling: pixels* |" in table


def test_a_second_run_skips_finished_arms(study_run, synthetic_data_dir):
  base, path, _, _ = study_run
  lines = []
  studies.run(str(path), str(base / "runs"), overrides={"input.data_dir": synthetic_data_dir},
              ceilings=False, out=lines.append)
  assert sum("done already" in line for line in lines) == 2


def test_user_mistakes_are_user_errors(tmp_path):
  with pytest.raises(errors.UnknownNameError, match="shipped studies: .*paradigms"):
    spec.resolve("no_such_study")
  bad = tmp_path / "bad.py"
  bad.write_text(STUDY.replace('"diffusion.num_inference_steps": 1', '"diffusion.num_steps": 1'))
  with pytest.raises(errors.ConfigError, match="unknown config key 'diffusion.num_steps'"):
    spec.load(str(bad), str(tmp_path))
  with pytest.raises(errors.UnknownNameError, match="--scale 'tpu'"):
    spec.load(str(bad), str(tmp_path), scale="tpu")


@pytest.mark.parametrize("name", ["paradigms", "conditioning", "pixel_vs_latent", "steps"])
def test_shipped_studies_load_at_both_scales(name, tmp_path):
  for scale in ("cpu", "accelerator"):
    study = spec.load(name, str(tmp_path), scale=scale)
    assert len(study.arms) >= 2 and study.steps > 0


def test_markdown_marks_the_best_arm():
  rows = report.rows({"a": {"depth": {"abs_rel": 0.3, "headline": "abs_rel",
                                      "higher_is_better": False, "baseline": {"abs_rel": 0.5}}},
                      "b": {"depth": {"abs_rel": 0.2, "headline": "abs_rel",
                                      "higher_is_better": False, "baseline": {"abs_rel": 0.5}}}})
  text = report.markdown("t", rows)
  assert "| b | **0.2000** |" in text and "| a | 0.3000 |" in text
  assert "| *trivial baseline* | 0.5000 |" in text
