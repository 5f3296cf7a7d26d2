"""The `main compile` table of docs/benchmarks.md: one config compiled for several TPU slices,
with XLA's attention and with the splash kernel.

    TPU_LIBRARY_PATH=... python bench/compile_table.py --config configs/generalist_pixel128.py \
        --topology v5e-16 --topology v5p-8 [--attention xla --attention auto] [--no_sampler] \
        [--set model.remat=layer --set batch_size=128] [--exec_time_effort -1]

Prints one markdown row per (topology, attention): the train step's per-device memory, FLOPs per
device and per step, and the step time and examples/s at 40% and 60% MFU (aot.py has the
definitions). Compiling the SD-2-size step takes minutes per row on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import ast
import pathlib
import re
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from dense_diffusion import aot  # pylint: disable=g-import-not-at-top

GIB = 2**30


def _load(spec: str, overrides: list[str]):
  import importlib  # pylint: disable=g-import-not-at-top
  path, _, arg = spec.partition(":")
  module = importlib.import_module(pathlib.Path(path).with_suffix("").as_posix().replace("/", "."))
  config = module.get_config(arg or None)
  from dense_diffusion.experiment import config as config_lib  # pylint: disable=g-import-not-at-top
  values = {}
  for item in overrides:
    key, value = item.split("=", 1)
    try:
      values[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      values[key] = value
  config_lib.set_dotted(config, values)
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--topology", action="append", required=True)
  parser.add_argument("--attention", action="append", default=None,
                      help="attention.Options.tpu values to compare (default: xla and auto)")
  parser.add_argument("--set", action="append", default=[], help="config KEY=VALUE overrides")
  parser.add_argument("--no_sampler", action="store_true", help="compile the train step only")
  parser.add_argument("--exec_time_effort", type=float, default=None,
                      help="JAX's exec_time_optimization_effort in [-1, 1] (default: the "
                           "compiler's). -1 compiles several times faster and skips moving "
                           "buffers into on-chip VMEM: temporaries are then the HBM buffer "
                           "assignment alone, for comparing programs, not the tuned program's")
  args = parser.parse_args()
  aot.use_cpu_host()
  if args.exec_time_effort is not None:
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_exec_time_optimization_effort", args.exec_time_effort)
  print("| config | topology | attention | batch / device | arguments | temporaries | "
        "peak / HBM | fits | TFLOPs / device (XLA + kernels) | TFLOPs / step | "
        "step s @40% | step s @60% | examples/s @40% | examples/s @60% | compile s |")
  print("|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
  for topology in args.topology:
    for impl in args.attention or ["xla", "auto"]:
      config = _load(args.config, args.set)
      if args.no_sampler:
        config.eval.batch_size = None
      report = aot.compile_run(config, topology, attention_overrides={"tpu": impl},
                               programs=("train_step",) if args.no_sampler else None,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
      t = report.topology
      p = report.programs[0]
      per_device = report.global_batch // (report.mesh_shape["data"] * report.mesh_shape["fsdp"])
      if p.peak_bytes is None:
        needed = re.search(r"\(([\d.]+)G\) exceeds", p.error or "")
        peak = f"> HBM ({needed.group(1)} GB temporaries)" if needed else "> HBM"
        cells = ["-", "-", "-", "-", "-", "-"]
      else:
        peak = f"{p.peak_bytes / GIB:.2f} / {t.chip.hbm_bytes / GIB:.0f} GiB"
        seconds = [p.flops / (t.chip.peak_flops * m) for m in (0.4, 0.6)]
        cells = [f"{p.flops / 1e12:.1f} ({p.xla_flops / 1e12:.1f} + {p.kernel_flops / 1e12:.1f})",
                 f"{p.flops * t.chips / 1e12:.0f}", f"{seconds[0]:.2f}", f"{seconds[1]:.2f}",
                 f"{report.global_batch / seconds[0]:.0f}",
                 f"{report.global_batch / seconds[1]:.0f}"]
      temp = "-" if p.temp_bytes is None else f"{p.temp_bytes / GIB:.2f} GiB"
      args_bytes = "-" if p.argument_bytes is None else f"{p.argument_bytes / GIB:.2f} GiB"
      print(f"| {args.config} {' '.join(args.set)}"
            + ("" if args.exec_time_effort is None else f" (effort {args.exec_time_effort:g})")
            + f" | {topology} | {impl} | {per_device} | "
            f"{args_bytes} | {temp} | {peak} | {'yes' if p.fits else 'NO'} | "
            + " | ".join(cells) + f" | {p.compile_seconds:.0f} |", flush=True)


if __name__ == "__main__":
  main()
