"""Training-step throughput of the train loop's jitted step (`experiment.Experiment.train_step`).

    python bench/train_step.py [--steps 5] [--skip_big]

Rows:
  demo: configs/demo.py as is, on this machine's devices (a CPU split into `main demo`'s
    devices): steps/s and examples/s after warm-up, synthetic batches (no tf.data), XLA's FLOPs
    per step, and the fixed costs before the first step (the Experiment: model, state and
    shardings; lowering + compilation).
  generalist_pixel128: the seed paper's SD2-size model at 128x128 in bf16. Its parameters are
    counted abstractly (`nnx.eval_shape`: nothing is allocated) and the FLOPs of one training
    step (forward + backward of the loss) come from XLA's cost analysis of the lowered program at
    batch 1, times the global batch. With an accelerator it also runs the step and reports model
    FLOPs utilisation (MFU = FLOPs per step x steps/s / peak FLOP/s of the device).
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import time
import types

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np
from flax import nnx

from dense_diffusion import experiment
from dense_diffusion import paradigms
from dense_diffusion.experiment import config as config_lib
from dense_diffusion.experiment import model as model_lib
from dense_diffusion.experiment import trainable as trainable_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import peak_flops as peak_flops_lib  # pylint: disable=g-import-not-at-top  (bench/peak_flops.py)


def peak_flops(device) -> float | None:
  """Dense bf16 FLOP/s of `device` (bench/peak_flops.py's table, with its sources)."""
  return peak_flops_lib.peak_bf16_flops(device.device_kind)


def synthetic_batch(config, batch: int, seed: int = 0) -> dict:
  res = int(config.model.unet["sample_size"])
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
          "target": rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
          "valid": np.ones((batch, res, res, 1), bool),
          "task": rng.integers(0, len(config.tasks), (batch,)).astype(np.int32)}


def flops_of(compiled_or_lowered) -> float:
  cost = compiled_or_lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def time_steps(config, steps: int) -> dict:
  """Builds the run's Experiment, warms up, and times `steps` training steps on synthetic
  batches."""
  start = time.perf_counter()
  exp = experiment.Experiment(config)
  setup_s = time.perf_counter() - start
  batch = exp.device_batch(synthetic_batch(config, exp.per_host_batch))
  with jax.set_mesh(exp.mesh):
    start = time.perf_counter()
    compiled = exp.train_step.lower(exp.state, exp.frozen, batch).compile()
    compile_s = time.perf_counter() - start
    flops = flops_of(compiled)
    for _ in range(2):  # warm-up: the first call compiles.
      exp.state, m = exp.train_step(exp.state, exp.frozen, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
      exp.state, m = exp.train_step(exp.state, exp.frozen, batch)
    jax.block_until_ready(m)
    elapsed = time.perf_counter() - start
  n_params = sum(x.size for x in jax.tree.leaves(exp.state.params))
  return {"steps_per_s": steps / elapsed, "examples_per_s": steps * config.batch_size / elapsed,
          "flops": flops, "params": n_params, "batch": int(config.batch_size),
          "setup_s": setup_s, "compile_s": compile_s}


def abstract_cost(config) -> dict:
  """Parameter count and FLOPs of one training step, with no arrays allocated."""
  # What `experiment.Experiment` builds, without allocating the model or its state.
  config_lib.check(config)
  task_objects = config_lib.task_objects(config)
  task_names = [t.name for t in task_objects]
  paradigm = paradigms.make(paradigms.make_config(dict(config.diffusion)),
                            experiment.make_schedule(config))
  provenance = trainable_lib.Provenance()
  model = nnx.eval_shape(lambda: model_lib.build_model(config.model, task_objects,
                                                       paradigm=paradigm, seed=0,
                                                       provenance=provenance))
  trainable = trainable_lib.select(model, config.model, provenance)  # the run's own set.
  graphdef, params, frozen = nnx.split(model, trainable.filter(), ...)
  n_trainable = sum(x.size for x in jax.tree.leaves(params))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
  shim = types.SimpleNamespace(
      graphdef=graphdef, paradigm=paradigm, task_names=task_names,
      task_loss_weights=config_lib.task_loss_weights(config, task_names))
  # The train loop's own loss (the paradigm's, weighted per task).
  loss = lambda p, f, b, k: experiment.Experiment.loss(shim, p, f, b, k)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       synthetic_batch(config, 1))
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params, frozen, batch, key)
  per_example = flops_of(lowered)
  return {"params": n_trainable + n_frozen, "trainable": n_trainable,
          "flops": per_example * int(config.batch_size), "batch": int(config.batch_size)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=5, help="timed steps after warm-up")
  parser.add_argument("--skip_big", action="store_true", help="only the demo row")
  args = parser.parse_args()
  from configs import demo
  from configs import generalist_pixel128
  from dense_diffusion import demo as demo_command
  # The CPU split into as many devices as `main demo` uses (an accelerator is unaffected).
  jax.config.update("jax_num_cpu_devices", demo_command.CPU_DEVICES)
  device = jax.devices()[0]
  print(f"devices: {jax.device_count()} x {device.device_kind} ({device.platform})")
  rows = []
  r = time_steps(demo.get_config(), args.steps)
  rows.append(("demo (32x32, f32)", r["batch"], r["params"], r["flops"], r["steps_per_s"],
               r["examples_per_s"], "-"))
  print(f"demo: Experiment (model, state, shardings) {r['setup_s']:.1f} s; train step lowering + "
        f"compilation {r['compile_s']:.1f} s")
  if not args.skip_big:
    config = generalist_pixel128.get_config()
    a = abstract_cost(config)
    peak = peak_flops(device)
    if device.platform != "cpu" and peak:
      r = time_steps(config, args.steps)
      mfu = f"{100 * r['flops'] * r['steps_per_s'] / (peak * jax.device_count()):.1f}%"
      rows.append(("generalist_pixel128 (bf16)", a["batch"], a["params"], r["flops"],
                   r["steps_per_s"], r["examples_per_s"], mfu))
    else:
      rows.append(("generalist_pixel128 (bf16)", a["batch"], a["params"], a["flops"], None,
                   None, "pending (needs a GPU)"))
  print("| config | global batch | parameters | FLOPs / step | steps/s | examples/s | MFU |")
  print("|---|---:|---:|---:|---:|---:|---|")
  for name, batch, params, flops, sps, eps, mfu in rows:
    print(f"| {name} | {batch} | {params / 1e6:.1f} M | {flops / 1e12:.3g} T | "
          + (f"{sps:.2f} | {eps:.1f}" if sps is not None else "- | -") + f" | {mfu} |")


if __name__ == "__main__":
  main()
