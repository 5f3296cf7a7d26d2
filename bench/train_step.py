"""Training-step throughput of the train loop's jitted step (`train.Setup.train_step`).

    python bench/train_step.py [--steps 5] [--skip_big]

Rows:
  demo: configs/demo.py as is, on this machine's devices (a CPU split into `main demo`'s
    devices): steps/s and examples/s after warm-up, synthetic batches (no tf.data), XLA's FLOPs
    per step, and the fixed costs before the first step (Setup; lowering + compilation).
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

from dense_diffusion import train
from dense_diffusion.diffusion import modes
from dense_diffusion.models import build

# Dense bf16 peak FLOP/s per device kind (vendor data sheets, no sparsity).
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
             "TPU v5p": 459e12, "TPU v5 lite": 197e12}


def peak_flops(device) -> float | None:
  for name, value in PEAK_BF16.items():
    if name.lower() in device.device_kind.lower():
      return value
  return None


def synthetic_batch(config, batch: int, seed: int = 0) -> dict:
  res = int(config.model.unet["sample_size"])
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
          "target": rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
          "task": rng.integers(0, len(config.tasks), (batch,)).astype(np.int32)}


def flops_of(compiled_or_lowered) -> float:
  cost = compiled_or_lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def time_steps(config, steps: int) -> dict:
  """Builds the run's Setup, warms up, and times `steps` training steps on synthetic batches."""
  start = time.perf_counter()
  setup = train.Setup(config)
  setup_s = time.perf_counter() - start
  batch = setup.device_batch(synthetic_batch(config, setup.per_host_batch))
  with jax.set_mesh(setup.mesh):
    start = time.perf_counter()
    compiled = setup.train_step.lower(setup.state, setup.frozen, batch).compile()
    compile_s = time.perf_counter() - start
    flops = flops_of(compiled)
    for _ in range(2):  # warm-up: the first call compiles.
      setup.state, m = setup.train_step(setup.state, setup.frozen, batch)
    jax.block_until_ready(m)
    start = time.perf_counter()
    for _ in range(steps):
      setup.state, m = setup.train_step(setup.state, setup.frozen, batch)
    jax.block_until_ready(m)
    elapsed = time.perf_counter() - start
  n_params = sum(x.size for x in jax.tree.leaves(setup.state.params))
  return {"steps_per_s": steps / elapsed, "examples_per_s": steps * config.batch_size / elapsed,
          "flops": flops, "params": n_params, "batch": int(config.batch_size),
          "setup_s": setup_s, "compile_s": compile_s}


def abstract_cost(config) -> dict:
  """Parameter count and FLOPs of one training step, with no arrays allocated."""
  model = nnx.eval_shape(lambda: build.build_generalist(config.model, config.tasks, seed=0))
  graphdef, params, frozen = nnx.split(model, model.trainable_filter(False), ...)
  n_trainable = sum(x.size for x in jax.tree.leaves(params))
  n_frozen = sum(x.size for x in jax.tree.leaves(frozen))
  diffusion = modes.make_config(dict(config.diffusion))
  shim = types.SimpleNamespace(graphdef=graphdef, mode=modes.get(diffusion.mode),
                               diffusion=diffusion, schedule=train.make_schedule(config),
                               task_names=list(config.tasks))
  loss = lambda p, f, b, k: train.Setup._loss(shim, p, f, b, k)  # the train loop's own loss.
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
  print(f"demo: Setup (model, state, shardings) {r['setup_s']:.1f} s; train step lowering + "
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
