"""Times the streaming metric accumulators over 500 images of 512x512.

Usage: .venv/bin/python bench/metrics.py [--num_images 500] [--size 512] [--batch 8]

Random data is generated once, as a pool of `--pool` distinct images (16 by default, to keep
memory and set-up time small on a shared machine) that is streamed cyclically in batches of
`--batch` through each accumulator (PQ takes one image per update, as it works per image).
One warm-up batch per metric (JAX compilation of SSIM) runs before timing and is not counted.

Columns: wall-clock seconds, and CPU seconds of this process (all threads; less sensitive to
other load on a shared machine). The load average before and after is printed with the table.
"""
import argparse
import os
import platform
import time

import numpy as np

from dense_diffusion import metrics


def _batches(pool, num_images, batch):
  n_pool = pool[0].shape[0]
  done = 0
  while done < num_images:
    b = min(batch, num_images - done)
    idx = (np.arange(done, done + b)) % n_pool
    yield tuple(x[idx] for x in pool)
    done += b


def _time(name, make_acc, pool, num_images, batch, results):
  warm = make_acc()
  warm.update(*next(_batches(pool, batch, batch)))
  acc = make_acc()
  t0, c0 = time.perf_counter(), time.process_time()
  for args in _batches(pool, num_images, batch):
    acc.update(*args)
  out = acc.result()
  results.append((name, batch, time.perf_counter() - t0, time.process_time() - c0))
  return out


def _panoptic_pool(rng, n, size, cells=6):
  """Blocky segment maps: (cells x cells) blocks, ids of ~30 segments (things and stuff)."""
  samples = []
  block = size // cells
  for _ in range(n):
    lab = rng.integers(1, 31, (cells, cells))
    gt = np.kron(lab, np.ones((block, block), np.int64))
    gt = np.pad(gt, ((0, size - gt.shape[0]), (0, size - gt.shape[1])))  # void border
    ids = np.unique(gt[gt > 0])
    gt_s = [{"id": int(i), "category_id": int(1 + i % 12), "iscrowd": int(i % 17 == 0)}
            for i in ids]
    noise = rng.random(gt.shape) < 0.1
    pred = np.where(noise, rng.integers(0, 31, gt.shape), gt)
    pids = np.unique(pred[pred > 0])
    pred_s = [{"id": int(i), "category_id": int(1 + i % 12)} for i in pids]
    samples.append((gt, gt_s, pred, pred_s))
  return samples


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_images", type=int, default=500)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--pool", type=int, default=16)
  args = parser.parse_args()
  n, s, b = args.num_images, args.size, args.batch
  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  pool_n = min(args.pool, n)
  depth_gt = rng.uniform(0.5, 9.5, (pool_n, s, s)).astype(np.float32)
  depth_pred = (0.5 * depth_gt + rng.normal(0, 0.1, depth_gt.shape)).astype(np.float32)
  normals_gt = rng.normal(size=(pool_n, s, s, 3)).astype(np.float32)
  normals_pred = normals_gt + rng.normal(0, 0.3, normals_gt.shape).astype(np.float32)
  sem_gt = rng.integers(0, 150, (pool_n, s, s)).astype(np.uint8)
  sem_gt[:, :16] = 255
  sem_pred = np.where(rng.random(sem_gt.shape) < 0.7, sem_gt % 150,
                      rng.integers(0, 150, sem_gt.shape)).astype(np.uint8)
  sem_raw = np.where(sem_gt == 255, 0, sem_gt + 1).astype(np.uint8)  # ADE20K PNG: 0 = other
  rgb_gt = rng.integers(0, 256, (pool_n, s, s, 3)).astype(np.uint8)
  rgb_pred = np.clip(rgb_gt + rng.normal(0, 10, rgb_gt.shape), 0, 255).astype(np.uint8)
  pan = _panoptic_pool(rng, pool_n, s)
  categories = [{"id": c, "isthing": int(c <= 8)} for c in range(1, 13)]
  gen_s = time.perf_counter() - t0

  load_before = os.getloadavg()[0]
  results = []
  _time("depth (scale_shift alignment)",
        lambda: metrics.DepthMetrics(alignment="scale_shift"),
        (depth_pred, depth_gt), n, b, results)
  _time("depth (scale_shift_disparity, alignment_max_res 256)",
        lambda: metrics.DepthMetrics(alignment="scale_shift_disparity", alignment_max_res=256),
        (depth_pred, depth_gt), n, b, results)
  _time("normals (pixel-pooled)", metrics.NormalMetrics, (normals_pred, normals_gt), n, b,
        results)
  _time("normals (per-image)", lambda: metrics.NormalMetrics(reduction="image"),
        (normals_pred, normals_gt), n, b, results)
  _time("semantic mIoU (K=150)", lambda: metrics.SemanticConfusion(150),
        (sem_pred, sem_gt), n, b, results)
  _time("semantic mIoU (K=150, reduce_zero_label)",
        lambda: metrics.SemanticConfusion(150, reduce_zero_label=True),
        (sem_pred, sem_raw), n, b, results)
  _time("PSNR+SSIM RGB (uint8 range)", lambda: metrics.RestorationMetrics(255.0),
        (rgb_pred, rgb_gt), n, b, results)
  _time("PSNR+SSIM Y channel", lambda: metrics.RestorationMetrics(255.0, y_channel=True),
        (rgb_pred, rgb_gt), n, b, results)
  _time("PSNR+SSIM Y channel, 8-bit (rain100)",
        lambda: metrics.restoration_protocol("rain100").accumulator(255.0),
        (rgb_pred, rgb_gt), n, b, results)
  acc = metrics.PanopticQuality(categories)
  acc.update(*pan[0])  # warm-up, same as the others
  acc = metrics.PanopticQuality(categories)
  t0, c0 = time.perf_counter(), time.process_time()
  for i in range(n):
    acc.update(*pan[i % pool_n])
  pq = acc.result()
  results.append(("panoptic PQ (~30 segments/image)", 1, time.perf_counter() - t0,
                   time.process_time() - c0))

  print(f"# bench/metrics.py: {n} images of {s}x{s} (pool of {pool_n} distinct random images, "
        f"generated in {gen_s:.1f} s), {platform.machine()} {platform.processor() or ''}")
  print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load "
        f"average {load_before:.1f} before / {os.getloadavg()[0]:.1f} after")
  print(f"# sanity: PQ All = {pq['All']['pq']:.3f} over {pq['All']['n']} categories")
  print()
  print("| metric | images/update | wall (s) | CPU (s) | wall ms / image | images / s |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  total = total_cpu = 0.0
  for name, batch, dt, cpu in results:
    total += dt
    total_cpu += cpu
    print(f"| {name} | {batch} | {dt:.2f} | {cpu:.2f} | {1e3 * dt / n:.1f} | {n / dt:.0f} |")
  print(f"| **all of the above** | | {total:.2f} | {total_cpu:.2f} | {1e3 * total / n:.1f} | |")


if __name__ == "__main__":
  main()
