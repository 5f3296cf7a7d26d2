"""Throughput of the data side: renderer, TFDS generation, and the mixed tf.data pipeline.

    python bench/input_pipeline.py [--res 128] [--examples 512] [--batch 32] [--batches 30]

Prints a markdown table: renderer examples/s (64 and `--res`), synthetic_scenes generation at
64x64 (2,000 examples, rendering + TFDS encoding + shuffling + writing), and examples/s of the
training stream for the 9-task synthetic mixture at `--res` (after `--warmup` batches), plus the
same stream for one task per entry type to show where time goes.
"""
from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow_datasets as tfds  # noqa: E402

from dense_diffusion import input_pipeline as ip  # noqa: E402
from dense_diffusion.datasets import readers  # noqa: E402
from dense_diffusion.datasets import synthetic_scenes  # noqa: E402
from dense_diffusion.datasets.synthetic_scenes import renderer  # noqa: E402


def bench_render(res: int, n: int) -> float:
  renderer.render_scene(0, res)
  t = time.perf_counter()
  for i in range(n):
    renderer.render_scene((0, 0, i), res)
  return n / (time.perf_counter() - t)


def _cpu_seconds() -> float:
  own = resource.getrusage(resource.RUSAGE_SELF)
  kids = resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench_generate(data_dir: str, res: int, n: int) -> tuple[float, float]:
  """(wall seconds, CPU seconds of this process and its rendering workers)."""
  cfg = synthetic_scenes.SyntheticScenesConfig(name=f"bench{res}_{n}", resolution=res,
                                               num_train=n, num_validation=0)
  builder = tfds.builder("synthetic_scenes", config=cfg, data_dir=data_dir)
  t, c = time.perf_counter(), _cpu_seconds()
  builder.download_and_prepare()
  return time.perf_counter() - t, _cpu_seconds() - c


def bench_stream(data_dir: str, config: str, task_list, batch: int, batches: int,
                 warmup: int, pp: str | None = None) -> float:
  entries = [readers.synthetic_scenes(t, config=config) for t in task_list]
  if pp is not None:
    entries = [{**e, "pp": pp} for e in entries]
  ds = ip.get_train_dataset(entries, list(task_list), batch, data_dir=data_dir,
                            process_index=0, process_count=1, shuffle_buffer=1000)
  it = iter(tfds.as_numpy(ds))
  for _ in range(warmup):
    next(it)
  t = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  dt = time.perf_counter() - t
  assert b["image"].shape[0] == batch
  return batches * batch / dt


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--res", type=int, default=128)
  p.add_argument("--examples", type=int, default=512, help="train examples generated at --res")
  p.add_argument("--gen64", type=int, default=2000, help="examples of the 64x64 generation run")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--data_dir", default=None)
  args = p.parse_args()
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="bench_tfds_")

  print(f"# cores: {os.cpu_count()}, data_dir: {data_dir}")
  print("| what | setting | result |")
  print("| --- | --- | ---: |")
  print(f"| render_scene | 64x64, 400 scenes | {bench_render(64, 400):.0f} scenes/s |")
  print(f"| render_scene | {args.res}x{args.res}, 100 scenes | "
        f"{bench_render(args.res, 100):.0f} scenes/s |")
  secs, cpu = bench_generate(data_dir, 64, args.gen64)
  print(f"| synthetic_scenes download_and_prepare | 64x64, {args.gen64} examples | "
        f"{secs:.1f} s wall ({args.gen64 / secs:.0f} ex/s), {cpu:.1f} CPU-s |")
  secs, cpu = bench_generate(data_dir, args.res, args.examples)
  print(f"| synthetic_scenes download_and_prepare | {args.res}x{args.res}, {args.examples} "
        f"examples | {secs:.1f} s wall ({args.examples / secs:.0f} ex/s), {cpu:.1f} CPU-s |")
  config = f"bench{args.res}_{args.examples}"
  rows = [("9-task mixture", readers.SYNTHETIC_TASKS), ("depth only", ("depth",)),
          ("semantic only", ("semantic",)), ("instance only", ("instance",)),
          ("denoise only", ("denoise",))]
  for name, task_list in rows:
    rate = bench_stream(data_dir, config, task_list, args.batch, args.batches, args.warmup)
    print(f"| train stream, {name} | {args.res}x{args.res}, batch {args.batch} | "
          f"{rate:.0f} examples/s |")
  # Same reading, checking and batching without any task encoding (target = image): the cost of
  # the tf.numpy_function encoders is the difference to the rows above.
  rate = bench_stream(data_dir, config, ("denoise",), args.batch, args.batches, args.warmup,
                      pp='value_range(-1, 1)|copy("image", "target")|keep("image", "target")')
  print(f"| train stream, no encoding | {args.res}x{args.res}, batch {args.batch} | "
        f"{rate:.0f} examples/s |")


if __name__ == "__main__":
  main()
