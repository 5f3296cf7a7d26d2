"""The train loop: sharded steps, EMA, checkpoints with resume, logging, periodic evaluation.

    python -m dense_diffusion.main train --config configs/demo.py --workdir runs/demo

State lives in `TrainState` (trainable parameters, optimizer state, EMA, step, RNG, non-finite
counters). The step is one `jax.jit` with in/out shardings from `sharding.py` under
`jax.set_mesh`. Checkpoints hold the whole state plus the data iterator of every process, so a
resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import time
from typing import Any, Callable

from absl import logging
from etils import epath
import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dense_diffusion import checkpointing
from dense_diffusion import sharding
from dense_diffusion import workdir as workdir_lib
from dense_diffusion.diffusion import modes
from dense_diffusion.diffusion import schedules
from dense_diffusion.models import build


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # i32[]: optimizer steps taken.
  params: Any  # nnx.State of the trainable parameters.
  opt_state: Any
  ema: Any  # EMA of `params` (evaluation and prediction use it).
  rng: jax.Array
  nonfinite_steps: jax.Array  # i32[]: steps whose update was dropped (non-finite loss/grads).
  first_nonfinite_step: jax.Array  # i32[]: the first such step, -1 if none.


def make_optimizer(opt_config: Any, total_steps: int
                   ) -> tuple[optax.GradientTransformation, Callable[[int], float]]:
  """AdamW with linear warmup, cosine decay and global-norm clipping."""
  warmup = int(opt_config.warmup_steps)
  lr = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(opt_config.lr), warmup_steps=max(warmup, 1),
      decay_steps=max(total_steps, warmup + 1),
      end_value=float(opt_config.lr) * float(opt_config.end_lr_fraction))
  tx = optax.chain(
      optax.clip_by_global_norm(float(opt_config.grad_clip_norm)),
      optax.adamw(lr, b1=float(opt_config.b1), b2=float(opt_config.b2),
                  weight_decay=float(opt_config.weight_decay)))
  return tx, lr


def task_loss_weights(config: Any, task_names: list[str]) -> np.ndarray:
  """f32[num_tasks] multipliers of each task's loss (`config.task_loss_weights`, default 1)."""
  given = dict(config.get("task_loss_weights") or {})
  unknown = sorted(set(given) - set(task_names))
  if unknown:
    raise ValueError(f"config.task_loss_weights names tasks {unknown} that are not in "
                     f"config.tasks {task_names}")
  weights = np.array([float(given.get(name, 1.0)) for name in task_names], np.float32)
  if not np.all(np.isfinite(weights) & (weights >= 0)):
    raise ValueError(f"config.task_loss_weights must be finite and >= 0, got {given}")
  return weights


def make_schedule(config: Any) -> schedules.Schedule:
  s = config.schedule
  return schedules.make(s.kind, int(s.num_train_timesteps), float(s.beta_start),
                        float(s.beta_end),
                        rescale_betas_zero_snr=bool(s.get("rescale_betas_zero_snr", False)))


class Setup:
  """Everything a run derives from its config: model graph, state, shardings, step functions."""

  def __init__(self, config: Any, *, mesh: jax.sharding.Mesh | None = None):
    self.config = config
    self.task_names = list(config.tasks)
    self.task_loss_weights = task_loss_weights(config, self.task_names)
    self.mesh = mesh or sharding.make_mesh(dict(config.mesh))
    self.rules = sharding.ShardingRules.from_config(config.get("sharding"))
    self.per_host_batch = sharding.check_global_batch(int(config.batch_size), self.mesh)
    self.diffusion = modes.make_config(dict(config.diffusion))
    self.mode = modes.get(self.diffusion.mode)
    if self.diffusion.mode == "backbone":
      raise ValueError("diffusion.mode='backbone' (VPD features) needs task heads, which the "
                       "generalist train loop does not have; use generalist, onestep or dmp")
    self.mode.validate(self.diffusion)
    if config.model.get("input_residual") and self.diffusion.prediction_type != "sample":
      raise ValueError(
          "model.input_residual adds the input image to the network output, an estimate of "
          "the answer only under diffusion.prediction_type='sample' (x0), not "
          f"{self.diffusion.prediction_type!r}: set one or the other")
    self.schedule = make_schedule(config)
    model = build.build_generalist(config.model, self.task_names, seed=int(config.seed))
    lora_only = bool(config.model.get("lora"))
    self.graphdef, params, self.frozen = nnx.split(model, model.trainable_filter(lora_only), ...)
    self.tx, self.lr_fn = make_optimizer(config.optimizer, int(config.total_steps))
    self.ema_decay = float(config.optimizer.ema_decay)
    seed = int(config.seed)

    def initial_state(params) -> TrainState:
      return TrainState(
          step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
          ema=jax.tree.map(jnp.copy, params), rng=jax.random.key_data(jax.random.key(seed)),
          nonfinite_steps=jnp.zeros((), jnp.int32),
          first_nonfinite_step=jnp.full((), -1, jnp.int32))

    param_sh = sharding.state_shardings(params, self.mesh, self.rules)
    self.state_shardings = TrainState(
        step=sharding.replicated(self.mesh), params=param_sh,
        opt_state=sharding.state_shardings(
            jax.eval_shape(initial_state, params).opt_state, self.mesh, self.rules),
        ema=param_sh, rng=sharding.replicated(self.mesh),
        nonfinite_steps=sharding.replicated(self.mesh),
        first_nonfinite_step=sharding.replicated(self.mesh))
    self.frozen_shardings = sharding.state_shardings(self.frozen, self.mesh, self.rules)
    with jax.set_mesh(self.mesh):
      params = jax.device_put(params, param_sh)
      self.frozen = jax.device_put(self.frozen, self.frozen_shardings)
      # One program for the optimizer moments, the EMA copy and the counters, created in place
      # with their shardings (run eagerly, every parameter shape is its own compilation).
      self.state = jax.jit(initial_state, out_shardings=self.state_shardings)(params)
    self.batch_shardings = {"image": sharding.batch_sharding(self.mesh, 4),
                            "target": sharding.batch_sharding(self.mesh, 4),
                            "task": sharding.batch_sharding(self.mesh, 1)}
    self.train_step = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                        self.batch_shardings),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=(0,))

  def make_sampler(self) -> Callable:
    """jit(params, frozen, image [B,H,W,3], task i32[B], key) -> f32[B,H,W,C] sampled answers.

    The configured mode's sampler over the model, sharded like training batches; evaluation and
    prediction both use it.
    """
    graphdef, mode, diffusion, schedule = (self.graphdef, self.mode, self.diffusion,
                                           self.schedule)

    def model_fn(x_t, t, params, frozen, image, task):
      return nnx.merge(graphdef, params, frozen)(x_t, t, image, task)

    def sample(params, frozen, image, task, key):
      return mode.sample(schedule, diffusion, model_fn, image, key,
                         model_args=(params, frozen, image, task))

    sh = self.batch_shardings
    return jax.jit(sample, in_shardings=(self.state_shardings.params, self.frozen_shardings,
                                         sh["image"], sh["task"], None),
                   out_shardings=sh["image"])

  def model(self, params: Any) -> nnx.Module:
    """The model with `params` (e.g. `state.ema`) and the frozen parts."""
    return nnx.merge(self.graphdef, params, self.frozen)

  def _loss(self, params, frozen, batch, key):
    model = nnx.merge(self.graphdef, params, frozen)
    tb = self.mode.training_batch(self.schedule, self.diffusion, batch["target"],
                                  batch["image"], key)
    pred = model(tb.x_t, tb.t, batch["image"], batch["task"])
    per_example = jnp.mean(jnp.square(pred - tb.target), axis=(1, 2, 3)) * tb.weight
    num_tasks = len(self.task_names)
    # Per-task losses are logged unweighted, so runs with other task weights compare directly.
    task_sum = jax.ops.segment_sum(per_example, batch["task"], num_tasks)
    task_count = jax.ops.segment_sum(jnp.ones_like(per_example), batch["task"], num_tasks)
    task_weight = jnp.take(jnp.asarray(self.task_loss_weights), batch["task"])
    return jnp.mean(per_example * task_weight), (task_sum, task_count)

  def _train_step(self, state: TrainState, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, (task_sum, task_count)), grads = jax.value_and_grad(self._loss, has_aux=True)(
        state.params, frozen, batch, key)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    params = keep(params, state.params)
    opt_state = keep(opt_state, state.opt_state)
    # EMA warm-up: early on the average follows the parameters closely.
    decay = jnp.minimum(self.ema_decay, (1.0 + state.step) / (10.0 + state.step))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema, params)
    ema = keep(ema, state.ema)
    new_state = TrainState(
        step=state.step + 1, params=params, opt_state=opt_state, ema=ema, rng=state.rng,
        nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
        first_nonfinite_step=jnp.where((state.first_nonfinite_step < 0) & ~finite, state.step,
                                       state.first_nonfinite_step))
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": self.lr_fn(state.step),
               "task_loss_sum": task_sum, "task_count": task_count}
    return new_state, metrics

  def device_batch(self, batch: dict) -> dict:
    """A host's numpy batch -> global arrays sharded over the batch axes."""
    out = {}
    for key, sh in self.batch_shardings.items():
      local = np.asarray(batch[key])
      out[key] = jax.make_array_from_process_local_data(sh, local)
    return out


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


def save_config(config: Any, workdir: str | os.PathLike) -> None:
  """Writes `<workdir>/config.json` (process 0 only): eval and predict rebuild the run from it."""
  if jax.process_index() == 0:
    workdir_lib.WorkdirPaths(workdir).config.write_text(config.to_json_best_effort(indent=2))


def train_and_evaluate(config: Any, workdir: str) -> dict:
  """Trains (resuming from the latest checkpoint in `workdir`), evaluates, returns final metrics."""
  import tensorflow as tf
  from clu import metric_writers
  from dense_diffusion import evaluate
  from dense_diffusion import input_pipeline

  tf.config.set_visible_devices([], "GPU")  # tf.data only; the accelerators are JAX's.
  paths = workdir_lib.WorkdirPaths(workdir)  # epath: a gs:// workdir keeps its scheme
  paths.root.mkdir(parents=True, exist_ok=True)
  # Before the XLA backend starts: preparing data first keeps its threads and memory out of the
  # way of the synthetic builder's rendering workers.
  ensure_prepared(config.input.entries, config.input.get("data_dir"))
  save_config(config, paths.root)
  setup = Setup(config)
  total_steps = int(config.total_steps)
  print(f"devices: {jax.device_count()} ({jax.devices()[0].platform}), mesh "
        f"{dict(setup.mesh.shape)}, processes {jax.process_count()}; params: "
        f"{sharding.describe(setup.state.params)}", flush=True)

  checkpointer = checkpointing.Checkpointer(
      os.fspath(paths.checkpoints), max_to_keep=int(config.keep_checkpoints),
      save_interval_steps=int(config.checkpoint_every))
  with jax.set_mesh(setup.mesh):
    start_step, restored = checkpointer.restore_latest(setup.state, delete_unreadable=True)
  if restored is not None:
    setup.state = restored
    print(f"resumed from the checkpoint at step {start_step}", flush=True)
  start_step = int(start_step or 0)

  input_config = config.input
  dataset = input_pipeline.get_train_dataset(
      list(input_config.entries), setup.task_names, setup.per_host_batch, seed=int(config.seed),
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
    if checkpointer.maybe_save(step, setup.state, force=True):
      data_dir.mkdir(parents=True, exist_ok=True)
      data_ckpt.write(data_prefix(step))
      _prune_data_checkpoints(data_dir, keep=checkpointer.steps() + [step])

  evaluator = evaluate.Evaluator(config, setup, paths.root)
  nonfinite_policy = config.get("nonfinite", "stop")
  if nonfinite_policy not in ("stop", "skip"):
    raise ValueError(f"config.nonfinite={nonfinite_policy!r}; choose 'stop' or 'skip'")
  log_every = int(config.log_every)
  pending: list[dict] = []
  last_log_time, last_log_step = time.time(), start_step
  first_step_time = None
  eval_every = int(config.get("eval_every", 0) or 0)
  final_metrics: dict = {}
  with _Preemption() as preemption, jax.set_mesh(setup.mesh):
    step = start_step
    while step < total_steps:
      batch = setup.device_batch(next(data_iter))
      setup.state, metrics = setup.train_step(setup.state, setup.frozen, batch)
      step += 1
      pending.append(metrics)
      if first_step_time is None:
        first_step_time = time.time() - last_log_time
        print(f"first step (compilation included) took {first_step_time:.1f}s", flush=True)
        last_log_time, last_log_step = time.time(), step
      if step % log_every == 0 or step == total_steps:
        _log_train(writer, setup, pending, step, total_steps, last_log_time, last_log_step,
                   nonfinite_policy)
        pending = []
        last_log_time, last_log_step = time.time(), step
      save(step)
      if eval_every and step % eval_every == 0 and step < total_steps:
        evaluator.run(setup.state, step, writer)
      if preemption.agreed(step, log_every):
        where = "" if jax.process_count() == 1 else " (to at least one process)"
        print(f"SIGTERM{where} at step {step}: saving a checkpoint and exiting", flush=True)
        save(step, force=True)
        checkpointer.close()
        writer.flush()
        return {}
    save(total_steps, force=True)
    checkpointer.wait()
    final_metrics = evaluator.run(setup.state, total_steps, writer)
  checkpointer.close()
  writer.flush()
  return final_metrics


# Builders that generate their data with no download or manual folder: prepared on first use.
SELF_CONTAINED_DATASETS = ("synthetic_scenes",)


def ensure_prepared(entries, data_dir: str | None) -> None:
  """Prepares self-contained datasets that are missing; says how to get the others.

  With several processes (`jax.distributed`), process 0 prepares first while the others wait:
  two processes preparing into one shared data_dir would race on TFDS's final rename. Then any
  process that still misses the data (its data_dir is a disk of its own host) prepares its own
  copy. Call it before anything starts the XLA backend.
  """
  import tensorflow_datasets as tfds
  names = sorted({e["dataset"] for e in entries})

  def prepare_missing():
    for name in names:
      builder = tfds.builder(name, data_dir=data_dir)
      if builder.is_prepared():
        continue
      if name.split("/")[0] not in SELF_CONTAINED_DATASETS:
        raise FileNotFoundError(
            f"dataset {name} is not prepared in {builder.data_dir}; data/README.md says where to "
            "get it and the command that prepares it (data/prepare.py)")
      print(f"preparing {name} in {builder.data_dir} (one time)...", flush=True)
      start = time.time()
      builder.download_and_prepare()
      print(f"prepared {name} in {time.time() - start:.0f}s", flush=True)

  client, process_id = _distributed_client()
  if client is None:
    prepare_missing()
    return
  try:
    if process_id == 0:
      prepare_missing()
  finally:  # also when process 0 failed: the others then try, and fail with their own message.
    # A barrier id serves once: number the calls (every process makes the same ones).
    client.wait_at_barrier(f"dense_diffusion_ensure_prepared_{next(_PREPARE_CALLS)}",
                           PREPARE_TIMEOUT_S * 1000)
  if process_id != 0:
    prepare_missing()


PREPARE_TIMEOUT_S = 4 * 3600  # how long processes > 0 wait for process 0 to prepare the data.
_PREPARE_CALLS = itertools.count()


def _distributed_client():
  """(JAX's coordination-service client, this process's id), or (None, 0) in one process.

  Read from JAX's internal state because `jax.process_index()` and `multihost_utils` start the
  XLA backend, which `ensure_prepared` leaves until the data is ready.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  state = distributed.global_state
  if state.client is None or (state.num_processes or 1) <= 1:
    return None, 0
  return state.client, int(state.process_id)


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


def _log_train(writer, setup: Setup, pending: list[dict], step: int, total_steps: int,
               since_time: float, since_step: int, nonfinite_policy: str) -> None:
  fetched = jax.device_get(pending)
  state_flags = jax.device_get((setup.state.nonfinite_steps, setup.state.first_nonfinite_step))
  nonfinite, first_bad = int(state_flags[0]), int(state_flags[1])
  if first_bad >= 0 and nonfinite_policy == "stop":
    raise FloatingPointError(
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
  for name, s, n in zip(setup.task_names, task_sum, task_count):
    if n:
      scalars[f"train/loss_{name}"] = float(s / n)
  elapsed = max(time.time() - since_time, 1e-9)
  steps_per_s = (step - since_step) / elapsed
  scalars["train/steps_per_sec"] = steps_per_s
  scalars["train/examples_per_sec"] = steps_per_s * int(setup.config.batch_size)
  writer.write_scalars(step, scalars)
  eta = (total_steps - step) / steps_per_s if steps_per_s > 0 else 0.0
  per_task = " ".join(f"{n}={scalars[f'train/loss_{n}']:.3f}" for n in setup.task_names
                      if f"train/loss_{n}" in scalars)
  print(f"step {step}/{total_steps} ({100 * step / total_steps:.0f}%) loss "
        f"{scalars['train/loss']:.4f} | {per_task} | {steps_per_s:.2f} steps/s "
        f"{scalars['train/examples_per_sec']:.0f} ex/s | ETA {_format_eta(eta)}"
        + (f" | {nonfinite} non-finite steps skipped" if nonfinite else ""), flush=True)


def load_config(workdir: str):
  """The config a run in `workdir` was started with (`config.json`)."""
  import ml_collections
  path = workdir_lib.WorkdirPaths(workdir).config
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} the workdir of a train run?")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def evaluate_latest(config: Any, workdir: str) -> dict:
  """Evaluates the latest checkpoint of `workdir` (config: given, or the run's config.json)."""
  from dense_diffusion import evaluate
  config = config if config is not None else load_config(workdir)
  setup = Setup(config)
  checkpointer = checkpointing.Checkpointer(
      os.fspath(workdir_lib.WorkdirPaths(workdir).checkpoints))
  with jax.set_mesh(setup.mesh):
    step, state = checkpointer.restore_latest(setup.state)
    if state is None:
      raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
    return evaluate.Evaluator(config, setup, workdir).run(state, step)
