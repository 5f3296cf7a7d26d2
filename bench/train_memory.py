"""Memory and FLOPs of one training step of any config, compiled for this machine's backend
without allocating the model (`experiment.Experiment(config, abstract=True)`).

    python bench/train_memory.py --config configs/onestep.py:real=1,latent=1,loss=image \
        --batch 2 --height 480 --width 640 [--set model.vae.remat_decoder=False ...]

Prints the parameter count, the bytes of the step's arguments (train state, frozen parts,
batch), its outputs and its temporaries (activations kept for the backward pass and scratch),
as XLA's buffer assignment reports them (`compiled.memory_analysis()`), and its FLOPs
(`cost_analysis()`). On a CPU the numbers are XLA:CPU's; a GPU's buffer assignment differs in
detail (fusions, cuDNN workspaces), so leave headroom.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from dense_diffusion import experiment
from dense_diffusion.experiment import config as config_lib

GIB = 2**30


def load_config(spec: str):
  """`configs/x.py:arg` -> the config (`get_config(arg)`)."""
  path, _, arg = spec.partition(":")
  module = importlib.import_module(pathlib.Path(path).with_suffix("").as_posix().replace("/", "."))
  return module.get_config(arg or None)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True, help="configs/X.py[:arg]")
  parser.add_argument("--batch", type=int, default=1, help="global batch of the step")
  parser.add_argument("--height", type=int, default=None, help="image height (default: res)")
  parser.add_argument("--width", type=int, default=None, help="image width (default: res)")
  parser.add_argument("--set", action="append", default=[],
                      help="config overrides KEY=VALUE (python literals), e.g. model.remat=layer")
  args = parser.parse_args()
  config = load_config(args.config)
  overrides = {}
  for item in args.set:
    key, value = item.split("=", 1)
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  config_lib.set_dotted(config, overrides)
  config.batch_size = args.batch
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  res = int(config.model.unet["sample_size"])
  h, w = args.height or res, args.width or res
  start = time.perf_counter()
  exp = experiment.Experiment(config, abstract=True)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.state.params))
  n_frozen = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(exp.frozen))
  sd = lambda shape, dtype, key: jax.ShapeDtypeStruct(shape, dtype,
                                                      sharding=exp.batch_shardings[key])
  batch = {"image": sd((args.batch, h, w, 3), np.float32, "image"),
           "target": sd((args.batch, h, w, 3), np.float32, "target"),
           "valid": sd((args.batch, h, w, 1), np.bool_, "valid"),
           "task": sd((args.batch,), np.int32, "task")}
  with jax.set_mesh(exp.mesh):
    compiled = exp.train_step.lower(exp.state, exp.frozen, batch).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  print(f"| config | batch | image | trainable params | frozen params | arguments | outputs | "
        f"temporaries | peak (args + temp + out - aliased) | TFLOPs/step | compile s |")
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  peak = (mem.argument_size_in_bytes + mem.temp_size_in_bytes + mem.output_size_in_bytes
          - mem.alias_size_in_bytes)
  print(f"| {args.config} {' '.join(args.set)} | {args.batch} | {h}x{w} | {n_params / 1e6:.1f} M | "
        f"{n_frozen / 1e6:.1f} M | {mem.argument_size_in_bytes / GIB:.2f} GiB | "
        f"{mem.output_size_in_bytes / GIB:.2f} GiB | {mem.temp_size_in_bytes / GIB:.2f} GiB | "
        f"{peak / GIB:.2f} GiB | {float(cost.get('flops', float('nan'))) / 1e12:.1f} | "
        f"{seconds:.0f} |")
  print(f"backend: {jax.devices()[0].platform} ({jax.devices()[0].device_kind})")


if __name__ == "__main__":
  main()
