"""Runs a study's arms through the normal train and evaluation code, each in its own workdir.

An arm is done when its `eval_metrics.json` holds the evaluation at its final step: a study
started again skips it (resumable; an arm stopped half-way resumes from its checkpoint, as
`main train` does). An arm that shares its training with an earlier one (the study's
`EVAL_KEYS`) evaluates that arm's final checkpoint with its own config into its own workdir.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

from dense_diffusion import workdir as workdir_lib
from dense_diffusion.studies import spec as spec_lib


def final_metrics(workdir: str, step: int) -> Optional[dict]:
  """The evaluation at `step` in the workdir's eval_metrics.json, or None."""
  path = workdir_lib.WorkdirPaths(workdir).metrics
  if not path.exists():
    return None
  return json.loads(path.read_text()).get(str(step))


def arm_config(arm: spec_lib.Arm):
  """The config `main train --config <arm's> <arm's overrides>` builds."""
  from dense_diffusion.launch import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  return sweep_lib._parse_config(arm.config_flag, arm.flags)  # pylint: disable=protected-access


def _train(arm: spec_lib.Arm) -> None:
  from dense_diffusion import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(arm_config(arm), arm.workdir)


def _evaluate_shared(arm: spec_lib.Arm) -> None:
  """Evaluates the final checkpoint of `arm.trains_in` with the arm's config, into its workdir."""
  import jax  # pylint: disable=g-import-not-at-top
  from dense_diffusion import evaluate  # pylint: disable=g-import-not-at-top
  from dense_diffusion import experiment as experiment_lib  # pylint: disable=g-import-not-at-top
  config = arm_config(arm)
  experiment_lib.check_config(config)
  paths = workdir_lib.WorkdirPaths(arm.workdir)
  paths.root.mkdir(parents=True, exist_ok=True)
  experiment_lib.save_config(config, paths.root)
  exp = experiment_lib.Experiment(config)
  step, state = exp.restore_latest(arm.trains_in)
  with jax.set_mesh(exp.mesh):
    evaluate.Evaluator(config, exp, arm.workdir).run(state, step)


def run(study: spec_lib.Study, out: Callable[[str], None] = print) -> dict:
  """Trains / evaluates every arm not done yet; returns {arm name: its final metrics}."""
  results = {}
  n = len(study.arms)
  for i, arm in enumerate(study.arms, 1):
    head = f"[{i}/{n}] {arm.name}"
    done = final_metrics(arm.workdir, arm.steps)
    if done is not None:
      out(f"{head}: done already ({arm.workdir}), skipped")
      results[arm.name] = done
      continue
    start = time.time()
    if arm.trains_in == arm.workdir:
      out(f"{head}: training {arm.steps} steps in {arm.workdir}\n  {arm.command}")
      _train(arm)
    else:
      out(f"{head}: evaluating the checkpoint of {arm.trains_in} with {arm.flags}")
      if final_metrics(arm.trains_in, arm.steps) is None:
        raise RuntimeError(f"{arm.trains_in} has not finished training; it comes first")
      _evaluate_shared(arm)
    done = final_metrics(arm.workdir, arm.steps)
    if done is None:  # a SIGTERM stopped the training: its checkpoint resumes next time.
      out(f"{head}: stopped before its final evaluation; run the study again to resume")
      return results
    out(f"{head}: finished in {time.time() - start:.0f}s")
    results[arm.name] = done
  return results
