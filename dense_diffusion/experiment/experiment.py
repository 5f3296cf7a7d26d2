"""`Experiment`: everything a run derives from its config, built in one place.

    exp = Experiment(config)          # tasks, paradigm, schedule, model, optimizer, shardings
    exp.state                         # TrainState (trainable params, optimizer state, EMA, ...)
    exp.train_step(state, frozen, batch) -> (state, metrics)    one jitted, sharded step
    exp.make_predictor()(params, frozen, image, task, key)       the paradigm's inference

Train, evaluate and predict each build one and call it; nothing here knows which paradigm or
which tasks it runs: the paradigm owns the loss (`Paradigm.loss`) and the inference
(`Paradigm.predict`), the tasks own everything about their answers.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dense_diffusion import checkpointing
from dense_diffusion import errors
from dense_diffusion import paradigms
from dense_diffusion import sharding
from dense_diffusion import workdir as workdir_lib
from dense_diffusion.diffusion import schedules
from dense_diffusion.experiment import config as config_lib
from dense_diffusion.experiment import model as model_lib
from dense_diffusion.experiment import trainable as trainable_lib
from dense_diffusion.models import attention
from dense_diffusion.models import unet as unet_lib
from dense_diffusion.paradigms import spaces

# Keys of a training batch and their ranks (all sharded over the batch axes).
BATCH_RANKS = {"image": 4, "target": 4, "valid": 4, "task": 1}


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


def make_schedule(config: Any) -> schedules.Schedule:
  s = config.schedule
  return schedules.make(s.kind, int(s.num_train_timesteps), float(s.beta_start),
                        float(s.beta_end),
                        rescale_betas_zero_snr=bool(s.get("rescale_betas_zero_snr", False)))


def check_grad_accum(config: Any, mesh: jax.sharding.Mesh) -> int:
  """`config.grad_accum_steps` (default 1), checked against the batch: every microbatch must
  hold the same number of rows on every batch shard."""
  n = int(config.get("grad_accum_steps", 1))
  shards = sharding.batch_shards(mesh)
  per_shard = int(config.batch_size) // shards
  if n < 1 or per_shard % n:
    raise errors.ConfigError(
        f"grad_accum_steps={n} must be >= 1 and divide the batch per data shard "
        f"(batch_size {int(config.batch_size)} / {shards} shards = {per_shard}): choose a "
        f"divisor of {per_shard}")
  return n


class Experiment:
  """A run built from its config: tasks, paradigm, model graph, state, shardings, step functions.

  Args:
    config: the run's ConfigDict (configs/*.py); checked first (`config.check`).
    mesh: a device mesh to use instead of the config's.
    abstract: build nothing: the model, `state` and `frozen` are shapes and dtypes
      (`jax.ShapeDtypeStruct`s with their shardings), for lowering and compiling the train step
      of a config too big for this machine (`train_step.lower(...).compile()` gives its FLOPs
      and memory; bench/train_memory.py).
  """

  def __init__(self, config: Any, *, mesh: jax.sharding.Mesh | None = None,
               abstract: bool = False):
    config_lib.check(config)
    self.config = config
    # Which attention formulation and kernel blocks (read when the model is traced).
    attention.configure(config.model.get("attention"))
    self.tasks = config_lib.task_objects(config)  # the model's tasks, in task-index order
    self.task_names = [t.name for t in self.tasks]
    self.task_loss_weights = config_lib.task_loss_weights(config, self.task_names)
    self.mesh = mesh or sharding.make_mesh(dict(config.mesh))
    self.rules = sharding.ShardingRules.from_config(config.get("sharding"))
    self.per_host_batch = sharding.check_global_batch(int(config.batch_size), self.mesh)
    self.grad_accum_steps = check_grad_accum(config, self.mesh)
    self.diffusion = paradigms.make_config(dict(config.diffusion))
    if config.model.get("input_residual") and self.diffusion.prediction_type != "sample":
      raise errors.ConfigError(
          "model.input_residual adds the input image to the network output, an estimate of "
          "the answer only under diffusion.prediction_type='sample' (x0), not "
          f"{self.diffusion.prediction_type!r}: set one or the other")
    latent = bool(config.model.get("latent"))
    if latent and config.model.get("zero_init_output") and self.diffusion.loss_space == "image":
      raise errors.ConfigError(
          "model.zero_init_output with model.latent and diffusion.loss_space='image': a zero "
          "latent decodes to a flat image whose GroupNorm gradients overflow; turn "
          "zero_init_output off")
    self.schedule = make_schedule(config)
    vae = dict(config.model.get("vae") or {})
    self.space = spaces.make(latent, remat_decoder=bool(vae.get("remat_decoder", False)))
    self.paradigm = paradigms.make(self.diffusion, self.schedule, space=self.space,
                                   tasks=self.tasks)
    provenance = trainable_lib.Provenance()
    build = lambda: model_lib.build_model(
        config.model, self.tasks, paradigm=self.paradigm, seed=int(config.seed),
        provenance=provenance, data_dir=config.input.get("data_dir"), shapes_only=abstract)
    model = nnx.eval_shape(build) if abstract else build()
    self.trainable = trainable_lib.select(model, config.model, provenance)
    if not abstract:  # an abstract build reads no weights: every part looks fresh.
      allow = config.model.get("allow_frozen_fresh")
      model_lib.check_random_vae({p.module for p in self.trainable.fresh_frozen_not_allowed(allow)})
      self.trainable.check_fresh_frozen(allow)
    trainable = self.trainable.filter()
    self.graphdef, params, self.frozen = nnx.split(model, trainable, ...)
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
    if abstract:
      with_sharding = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
      self.frozen = jax.tree.map(with_sharding, self.frozen, self.frozen_shardings)
      self.state = jax.tree.map(with_sharding, jax.eval_shape(initial_state, params),
                                self.state_shardings)
    else:
      with jax.set_mesh(self.mesh):
        params = jax.device_put(params, param_sh)
        self.frozen = jax.device_put(self.frozen, self.frozen_shardings)
        # One program for the optimizer moments, the EMA copy and the counters, created in
        # place with their shardings (run eagerly, every parameter shape is its own
        # compilation).
        self.state = jax.jit(initial_state, out_shardings=self.state_shardings)(params)
    self.batch_shardings = {k: sharding.batch_sharding(self.mesh, rank)
                            for k, rank in BATCH_RANKS.items()}
    self.train_step = jax.jit(
        self._train_step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                        self.batch_shardings),
        out_shardings=(self.state_shardings, sharding.replicated(self.mesh)),
        donate_argnums=(0,))

  def model(self, params: Any) -> nnx.Module:
    """The model with `params` (e.g. `state.ema`) and the frozen parts."""
    return nnx.merge(self.graphdef, params, self.frozen)

  def make_predictor(self) -> Callable:
    """jit(params, frozen, image [B,H,W,3], task i32[B], key) -> f32[B,H,W,C] answers.

    The paradigm's inference over the model, sharded like training batches; evaluation and
    prediction both use it.
    """
    graphdef, paradigm = self.graphdef, self.paradigm

    def predict(params, frozen, image, task, key):
      model = nnx.merge(graphdef, params, frozen)
      # Inference has no backward pass to save memory for: the blocks run plainly (remat would
      # only add work).
      for _, node in nnx.iter_graph(model):
        if isinstance(node, unet_lib.UNet):
          node.remat = "none"
      return paradigm.predict(model, image, task, key)

    sh = self.batch_shardings
    return jax.jit(predict, in_shardings=(self.state_shardings.params, self.frozen_shardings,
                                          sh["image"], sh["task"], None),
                   out_shardings=sh["image"])

  def loss(self, params, frozen, batch, key):
    """(weighted objective, (per-task loss sums, per-task counts)) of one batch.

    The paradigm's per-example loss, times each example's task loss weight, averaged. The
    per-task sums are of the unweighted losses, so runs with other task weights compare.
    """
    model = nnx.merge(self.graphdef, params, frozen)
    per_example, _ = self.paradigm.loss(model, batch, key)
    num_tasks = len(self.task_names)
    task_sum = jax.ops.segment_sum(per_example, batch["task"], num_tasks)
    task_count = jax.ops.segment_sum(jnp.ones_like(per_example), batch["task"], num_tasks)
    task_weight = jnp.take(jnp.asarray(self.task_loss_weights), batch["task"])
    return jnp.mean(per_example * task_weight), (task_sum, task_count)

  def _gradients(self, params, frozen, batch, key):
    """(loss, (task sums, task counts)), grads of one step's batch.

    With `grad_accum_steps` = n > 1 the batch is split into n microbatches that a `lax.scan`
    runs one after another, summing their gradients: activations of one microbatch live at a
    time, and the step equals one over the whole batch (the mean of equal-sized microbatches'
    means; each microbatch draws its own noise, from the step's key folded with its index).
    """
    grad_fn = jax.value_and_grad(self.loss, has_aux=True)
    n = self.grad_accum_steps
    if n == 1:
      return grad_fn(params, frozen, batch, key)
    batch_axes = sharding.BATCH_AXES

    def split(x):  # [B, ...] -> [n, B/n, ...], microbatch j = rows j, j+n, ... (each device's
      # rows stay on it: B/n rows per microbatch, evenly from every batch shard).
      x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
      return jax.lax.with_sharding_constraint(
          x, jax.sharding.PartitionSpec(None, batch_axes, *([None] * (x.ndim - 2))))

    micro = jax.tree.map(split, batch)
    # The running sum is sharded like the parameters (FSDP: each device keeps its shard, the
    # microbatch's gradients are reduce-scattered into it), never a replicated copy.
    like_params = lambda grads: jax.lax.with_sharding_constraint(
        grads, self.state_shardings.params)

    def one(carry, xs):
      index, microbatch = xs
      (loss, aux), grads = grad_fn(params, frozen, microbatch, jax.random.fold_in(key, index))
      return jax.tree.map(jnp.add, carry, ((loss, aux), like_params(grads))), None

    tasks = jnp.zeros((len(self.task_names),), jnp.float32)
    zeros = ((jnp.zeros((), jnp.float32), (tasks, tasks)),
             like_params(jax.tree.map(jnp.zeros_like, params)))
    total, _ = jax.lax.scan(one, zeros, (jnp.arange(n), micro))
    (loss, aux), grads = total
    return (loss / n, aux), jax.tree.map(lambda g: g / n, grads)

  def _train_step(self, state: TrainState, frozen, batch):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, (task_sum, task_count)), grads = self._gradients(state.params, frozen, batch, key)
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
    return {key: jax.make_array_from_process_local_data(sh, np.asarray(batch[key]))
            for key, sh in self.batch_shardings.items()}

  def restore_latest(self, workdir: Any, *, async_save: bool = True) -> tuple[int, TrainState]:
    """(step, state) of the latest readable checkpoint of `workdir`; MissingError if none."""
    checkpointer = checkpointing.Checkpointer(
        os.fspath(workdir_lib.WorkdirPaths(workdir).checkpoints), async_save=async_save)
    with jax.set_mesh(self.mesh):
      step, state = checkpointer.restore_latest(self.state)
    checkpointer.close()
    if state is None:
      raise errors.MissingError(f"no checkpoint in {workdir}/checkpoints: train the run first")
    return int(step), state
