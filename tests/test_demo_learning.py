"""A shortened demo run learns: losses fall, metrics improve, some tasks beat their baselines.

The full demo (README) beats every task's trivial baseline after its 800 steps, too long for
the test suite on 2 CPU cores. Here the same config (the task told by its prompt alone) trains
for STEPS steps. At initialisation the zero-initialised output conv makes every answer the input
residual alone, so restoration scores exactly its baseline (the degraded input) and everything
else predicts grey. Measured from a fresh clone (2026-12-08, 16 validation examples per task),
initial -> after STEPS (baseline): depth AbsRel 0.511 -> 0.465 (0.405), normals 90.0 -> 48.9
degrees (47.1), semantic mIoU 0.066 -> 0.129 (0.096), lowlight 8.8 -> 16.0 dB (8.8), panoptic PQ
0.021 -> 0.049 (0). So semantic, lowlight and panoptic beat their baselines by STEPS; normals and
depth improve but are still near theirs (the class-label demo of 2026-12-01 had normals at 37.7
degrees by STEPS: a prompt is learned later than a class label, docs/studies.md, and the normals
baseline is crossed later; at 800 steps it is 28.7 degrees, README). Instance PQ is still 0 at
120 steps (its loss falls; its centres separate objects later). Denoise and derain are then
only ~0.5 / 0.2 dB above their inputs (their wide margins come after ~600 steps,
docs/training.md), too close to assert, and their losses start at the input's error, so they are
not asserted to fall.
"""
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from dense_diffusion import evaluate
import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds the training subprocess may take before the test gives up on it.
STEPS = 120
# Tasks whose validation metric improves on the initial model's within STEPS steps. Shading and
# albedo first learn image-wide means (no better than grey at 120 steps), and depth is then only
# ~10% under its baseline; their losses must fall here, and they beat their baselines widely in
# the full demo (README table).
IMPROVING_TASKS = ("depth", "normals", "semantic", "lowlight", "panoptic")
# Tasks that beat their trivial baseline by a clear margin within STEPS steps.
BEATS_BASELINE_TASKS = ("semantic", "lowlight", "panoptic")
RESTORATION_TASKS = ("denoise", "derain", "lowlight")
# Tasks whose training loss falls within STEPS steps: all but restoration, which starts at its
# input (see above), and albedo, whose grey start is about as good as its first 120 steps.
FALLING_LOSS_TASKS = ("depth", "normals", "semantic", "instance", "shading", "lowlight")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, synthetic_res32_data_dir):
  """(metrics at initialisation, metrics after STEPS, training log, workdir) of the demo config.

  `main train` in a subprocess with XLA's default compilation (conftest.py makes the test
  processes compile without LLVM optimisation, which changes the float rounding the learning
  thresholds were measured with) on one CPU device.
  """
  workdir = tmp_path_factory.mktemp("demo_run")
  data_dir = synthetic_res32_data_dir  # the session's, prepared once
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)

  def train(total_steps):
    proc = subprocess_env.run(
        [sys.executable, "-m", "dense_diffusion.main", "train", "--config", "configs/demo.py",
         f"--workdir={workdir}", f"--config.input.data_dir={data_dir}",
         f"--config.total_steps={total_steps}", "--config.log_every=20",
         "--config.checkpoint_every=1000", "--config.eval.max_examples=16",
         "--config.eval.batch_size=16"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-5000:]
    return proc.stdout

  log = train(0) + train(STEPS)
  history = json.loads((workdir / evaluate.METRICS_FILE).read_text())
  return history["0"], history[str(STEPS)], log, workdir


def test_loss_falls(demo_run):
  _, _, log, _ = demo_run
  losses = [float(x) for x in re.findall(r"^step \d+/\d+ \(\d+%\) loss ([0-9.]+)", log, re.M)]
  assert len(losses) >= 3, log[-2000:]
  assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("task", FALLING_LOSS_TASKS)
def test_task_loss_falls(demo_run, task):
  _, _, log, _ = demo_run
  losses = [float(x) for x in re.findall(rf"^step \d+/.* {task}=([0-9.]+)", log, re.M)]
  # Per-task losses of a 20-step window are noisy (2-4 examples a step): the best of the last
  # three windows against the first.
  assert len(losses) >= 4 and min(losses[-3:]) < 0.75 * losses[0], (task, losses)


@pytest.mark.parametrize("task", RESTORATION_TASKS)
def test_restoration_starts_at_its_input(demo_run, task):
  at_init, _, _, _ = demo_run
  np.testing.assert_allclose(at_init[task]["psnr"], at_init[task]["baseline"]["psnr"],
                             rtol=1e-5)


@pytest.mark.parametrize("task", BEATS_BASELINE_TASKS)
def test_beats_baseline(demo_run, task):
  _, trained, _, _ = demo_run
  values = trained[task]
  key = values["headline"]
  model, baseline = values[key], values["baseline"][key]
  assert (model > baseline) == values["higher_is_better"], (task, key, model, baseline)
  assert evaluate.is_better(values), (task, key, model, baseline)


@pytest.mark.parametrize("task", IMPROVING_TASKS)
def test_metric_improves_over_initialisation(demo_run, task):
  at_init, trained, _, _ = demo_run
  key = trained[task]["headline"]
  assert at_init[task]["headline"] == key, (task, at_init[task]["headline"], key)
  before, after = at_init[task][key], trained[task][key]
  if trained[task]["higher_is_better"]:
    assert after > before, (task, key, before, after)
  else:
    assert after < before, (task, key, before, after)


def test_outputs_written(demo_run):
  _, trained, _, workdir = demo_run
  history = json.loads((workdir / evaluate.METRICS_FILE).read_text())
  assert set(history) == {"0", str(STEPS)}
  assert set(IMPROVING_TASKS) <= set(history[str(STEPS)])
  assert "panoptic" in trained and trained["panoptic"]["num_examples"] > 0
  assert (workdir / "predictions" / f"step_{STEPS}.png").stat().st_size > 10_000
  assert list(workdir.glob("events.out.tfevents.*"))
