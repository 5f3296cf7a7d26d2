"""The train loop: steps, checkpoints with resume, logging, pre-emption, periodic evaluation.

    python -m dense_diffusion.main train --config configs/demo.py --workdir runs/demo

Everything the run is made of (tasks, paradigm, model, optimizer, shardings, the jitted step)
comes from `experiment.Experiment(config)`; this module only drives it. State lives in
`TrainState` (trainable parameters, optimizer state, EMA, step, RNG, non-finite counters).
Checkpoints hold the whole state plus the data iterator of every process, so a resumed run
continues exactly where it stopped.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np

from dense_diffusion import checkpointing
from dense_diffusion import errors
from dense_diffusion import evaluate
from dense_diffusion import experiment as experiment_lib
from dense_diffusion import sharding
from dense_diffusion import workdir as workdir_lib
from dense_diffusion.datasets import prepare


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after every step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    try:
      self._previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. a notebook worker): no pre-emption handling
      self._previous = None
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def agreed(self, step: int, every: int) -> bool:
    """Whether to save and stop after `step`: at once in one process; with several, at the next
    step divisible by `every` (the log interval) if any process got SIGTERM.

    Every process must save at the same step (the checkpoint is a collective), and the signal
    may reach them at different steps; the flags are gathered only every `every` steps because
    gathering waits for the step's computation, which otherwise overlaps with the next batch.
    """
    if jax.process_count() == 1:
      return self.requested
    if step % every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
      f"{seconds // 60}m{seconds % 60:02d}s")


def train_and_evaluate(config: Any, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluates, returns final metrics."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from dense_diffusion import input_pipeline  # pylint: disable=g-import-not-at-top

  experiment_lib.check_config(config)  # a mistake in the config fails before any work
  tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators are JAX's.
  paths = workdir_lib.WorkdirPaths(workdir)  # epath: a gs:// workdir keeps its scheme
  paths.root.mkdir(parents=True, exist_ok=True)
  # Before the XLA backend starts: preparing data first keeps its threads and memory out of the
  # way of the synthetic builder's rendering workers.
  prepare.ensure_prepared([*config.input.entries, *(config.eval.get("entries") or [])],
                          config.input.get("data_dir"))
  experiment_lib.save_config(config, paths.root)
  exp = experiment_lib.Experiment(config)
  print(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), mesh "
        f"{dict(exp.mesh.shape)}, processes {jax.process_count()}; params: "
        f"{sharding.describe(exp.state.params)}", flush=True)
  if jax.process_index() == 0:
    print(exp.trainable.summary(), flush=True)  # what trains, what stays, what is pretrained.

  checkpointer = checkpointing.Checkpointer(
      os.fspath(paths.checkpoints), max_to_keep=int(config.keep_checkpoints),
      save_interval_steps=int(config.checkpoint_every))
  with jax.set_mesh(exp.mesh):
    start_step, restored = checkpointer.restore_latest(exp.state, delete_unreadable=True)
  if restored is not None:
    exp.state = restored
    print(f"resumed from the checkpoint at step {start_step}", flush=True)
  start_step = int(start_step or 0)

  input_config = config.input
  dataset = input_pipeline.get_train_dataset(
      list(input_config.entries), exp.task_names, exp.per_host_batch, seed=int(config.seed),
      data_dir=input_config.get("data_dir"),
      shuffle_buffer=int(input_config.get("shuffle_buffer", 1000)),
      on_bad_example=input_config.get("on_bad_example", "fail"))
  options = tf.data.Options()
  # The task encoders run as tf.numpy_function ops, which TF calls stateful; they are pure
  # functions of their inputs, so the iterator position can be saved without their "state".
  options.experimental_external_state_policy = (
      tf.data.experimental.ExternalStatePolicy.IGNORE)
  dataset = dataset.with_options(options)
  data_iter = iter(dataset)
  data_ckpt = tf.train.Checkpoint(iterator=data_iter)
  data_dir = paths.data_checkpoints
  data_prefix = lambda step: os.fspath(paths.data_checkpoint(step, jax.process_index()))
  if start_step:
    prefix = paths.data_checkpoint(start_step, jax.process_index())
    if prefix.with_name(prefix.name + ".index").exists():
      data_ckpt.read(data_prefix(start_step)).assert_consumed()
    else:
      logging.warning("no data-iterator checkpoint for step %d: the input stream restarts",
                      start_step)
      print(f"WARNING: no data-iterator state for step {start_step}; the input stream restarts")

  writer = metric_writers.create_default_writer(
      os.fspath(paths.root), just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})

  checkpoint_every = int(config.checkpoint_every)

  def save(step: int, force: bool = False) -> None:
    if (not force and step % checkpoint_every) or step in checkpointer.steps():
      return
    if checkpointer.maybe_save(step, exp.state, force=True):
      data_dir.mkdir(parents=True, exist_ok=True)
      data_ckpt.write(data_prefix(step))
      _prune_data_checkpoints(data_dir, keep=checkpointer.steps() + [step])

  def next_batch():
    return exp.device_batch(next(data_iter))

  try:
    return _train_loop(config, exp, paths.root, checkpointer, next_batch, save, writer,
                       start_step)
  finally:
    # Also when the loop raises (a non-finite loss, a bug, Ctrl-C): the asynchronous save still
    # in flight is committed and the input iterator released while the interpreter is whole.
    # Before, the exception left both to the interpreter's exit: the save's background thread
    # failed ("cannot schedule new futures after shutdown": that checkpoint was lost), then the
    # main thread hung forever in the final garbage collection, destroying the tf.data
    # iterator and the checkpoint manager whose threads were gone (tests/test_train.py::
    # test_nonfinite_stop under load; the stack dump showed only "Garbage-collecting").
    data_iter = data_ckpt = dataset = None  # the closures above hold them: drop them now
    checkpointer.close()
    writer.flush()


def _train_loop(config: Any, exp: experiment_lib.Experiment, workdir: epath.Path,
                checkpointer: checkpointing.Checkpointer, next_batch, save, writer,
                start_step: int) -> dict:
  """Steps from `start_step` to `config.total_steps`: logs, saves (`save(step, force)`),
  evaluates every `eval_every` steps and at the end; stops early after saving on SIGTERM.
  Returns the final evaluation's metrics ({} after a pre-emption)."""
  evaluator = evaluate.Evaluator(config, exp, workdir)
  total_steps = int(config.total_steps)
  nonfinite_policy = config.get("nonfinite", "stop")  # checked by experiment.check_config
  log_every = int(config.log_every)
  eval_every = int(config.get("eval_every", 0) or 0)
  pending: list[dict] = []
  last_log_time, last_log_step = time.time(), start_step
  first_step_time = None
  with _Preemption() as preemption, jax.set_mesh(exp.mesh):
    step = start_step
    while step < total_steps:
      exp.state, metrics = exp.train_step(exp.state, exp.frozen, next_batch())
      step += 1
      pending.append(metrics)
      if first_step_time is None:
        first_step_time = time.time() - last_log_time
        print(f"first step (compilation included) took {first_step_time:.1f}s", flush=True)
        last_log_time, last_log_step = time.time(), step
      if step % log_every == 0 or step == total_steps:
        _log_train(writer, exp, pending, step, total_steps, last_log_time, last_log_step,
                   nonfinite_policy)
        pending = []
        last_log_time, last_log_step = time.time(), step
      save(step)
      if eval_every and step % eval_every == 0 and step < total_steps:
        evaluator.run(exp.state, step, writer)
      if preemption.agreed(step, log_every):
        where = "" if jax.process_count() == 1 else " (to at least one process)"
        print(f"SIGTERM{where} at step {step}: saving a checkpoint and exiting", flush=True)
        save(step, force=True)
        return {}
    save(total_steps, force=True)
    checkpointer.wait()
    return evaluator.run(exp.state, total_steps, writer)


def _prune_data_checkpoints(data_dir: epath.Path, keep: list[int]) -> None:
  """Deletes the data-iterator states of steps whose orbax checkpoint is gone."""
  keep_names = {f"step_{s}_" for s in keep}
  for f in data_dir.glob("step_*"):
    if not any(f.name.startswith(k) for k in keep_names):
      f.unlink(missing_ok=True)


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _log_train(writer, exp: experiment_lib.Experiment, pending: list[dict], step: int,
               total_steps: int, since_time: float, since_step: int,
               nonfinite_policy: str) -> None:
  fetched = jax.device_get(pending)
  state_flags = jax.device_get((exp.state.nonfinite_steps, exp.state.first_nonfinite_step))
  nonfinite, first_bad = int(state_flags[0]), int(state_flags[1])
  if first_bad >= 0 and nonfinite_policy == "stop":
    raise errors.DivergedError(
        f"non-finite loss or gradient at step {first_bad + 1} (its update was not applied); "
        "lower optimizer.lr or raise optimizer.grad_clip_norm, check the inputs, or set "
        "config.nonfinite='skip' to drop such steps and go on")
  losses = np.array([m["loss"] for m in fetched], np.float64)
  finite = np.isfinite(losses)
  task_sum = np.sum([m["task_loss_sum"] for m in fetched], axis=0)
  task_count = np.sum([m["task_count"] for m in fetched], axis=0)
  scalars = {"train/loss": float(losses[finite].mean()) if finite.any() else float("nan"),
             "train/grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
             "train/lr": float(fetched[-1]["lr"]), "train/nonfinite_steps": nonfinite}
  for name, s, n in zip(exp.task_names, task_sum, task_count):
    if n:
      scalars[f"train/loss_{name}"] = float(s / n)
  elapsed = max(time.time() - since_time, 1e-9)
  steps_per_s = (step - since_step) / elapsed
  scalars["train/steps_per_sec"] = steps_per_s
  scalars["train/examples_per_sec"] = steps_per_s * int(exp.config.batch_size)
  writer.write_scalars(step, scalars)
  eta = (total_steps - step) / steps_per_s if steps_per_s > 0 else 0.0
  per_task = " ".join(f"{n}={scalars[f'train/loss_{n}']:.3f}" for n in exp.task_names
                      if f"train/loss_{n}" in scalars)
  print(f"step {step}/{total_steps} ({100 * step / total_steps:.0f}%) loss "
        f"{scalars['train/loss']:.4f} | {per_task} | {steps_per_s:.2f} steps/s "
        f"{scalars['train/examples_per_sec']:.0f} ex/s | ETA {_format_eta(eta)}"
        + (f" | {nonfinite} non-finite steps skipped" if nonfinite else ""), flush=True)
