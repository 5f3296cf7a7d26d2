"""The README's main job: train the generalist on `synthetic_scenes` for every task, evaluate.

1. Shows what the model learns: renders scenes, encodes every task's exact answer as the RGB image
   the model is trained to produce, decodes it back (clean and with sampler-like noise), prints
   the round-trip quality and writes `encodings.png`.
2. Trains `configs/demo.py` from random initialisation on this machine's devices (about 10
   minutes on 2 CPU cores), resuming if the workdir already holds checkpoints.
3. Evaluates every task on the validation split against a trivial baseline, writes
   `eval_metrics.json`, `predictions/step_N.png` and TensorBoard logs, and prints the table.
"""
from __future__ import annotations

import os
import pathlib

from etils import epath
import numpy as np

from dense_diffusion import metrics
from dense_diffusion import tasks
from dense_diffusion import workdir as workdir_lib
from dense_diffusion.datasets.synthetic_scenes import CATEGORIES, NUM_CLASSES, render_scene

RESOLUTION = 128  # pixels; the seed paper's generalist works at 128x128.
NUM_SCENES = 4  # scenes rendered for the round-trip table.
NOISE_SIGMA = 0.02  # std of Gaussian noise added to encodings, in [-1, 1] units.
# The demo command splits the CPU into this many JAX devices (the batch is split over them):
# XLA:CPU keeps few threads busy on one device's small convolutions, and two devices with half
# the batch each trained 1.29x faster on 2 cores (1.89 vs 1.47 steps/s, docs/benchmarks.md).
CPU_DEVICES = 2


def _task_answers(scene: dict) -> dict[str, tuple[object, np.ndarray]]:
  """task name -> (task object, answer) for one rendered scene."""
  panoptic = {"ids": scene["panoptic_ids"], "segments": scene["segments"]}
  return {
      "depth": (tasks.get("depth", max_depth=10.0), scene["depth"]),
      "normals": (tasks.get("normals"), scene["normals"]),
      "semantic": (tasks.get("semantic", num_classes=NUM_CLASSES), scene["semantic"]),
      "instance": (tasks.get("instance"), scene["instance"]),
      "panoptic": (tasks.get("panoptic", categories=CATEGORIES), panoptic),
      "denoise": (tasks.get("denoise"), scene["image"]),
      "derain": (tasks.get("derain"), scene["image"]),
      "lowlight": (tasks.get("lowlight"), scene["image"]),
      "albedo": (tasks.get("albedo"), scene["albedo"]),
      "shading": (tasks.get("shading"), scene["shading"]),
  }


def _score(name: str, task, answer, decoded) -> str:
  """One human-readable quality figure of a decoded answer against the exact one."""
  if name == "depth":
    m = metrics.depth_metrics(decoded, answer)
    return f"AbsRel {m['abs_rel']:.4f}"
  if name == "normals":
    return f"mean angle {metrics.normal_metrics(decoded, answer)['mean']:.2f} deg"
  if name == "semantic":
    conf = metrics.SemanticConfusion(task.num_classes)
    conf.update(decoded, answer)
    return f"mIoU {conf.result()['miou']:.4f}"
  if name == "instance":
    found, total = _matched_instances(decoded, answer)
    return f"{found}/{total} instances found"
  if name == "panoptic":
    pq = metrics.panoptic_quality(
        [(answer["ids"], answer["segments"], decoded["ids"], decoded["segments"])],
        task.categories)
    return f"PQ {pq['All']['pq']:.4f}"
  if name == "shading":
    return f"max error {np.abs(decoded - answer).max():.4f}"
  reference = answer.astype(np.float32) / 255.0
  return f"PSNR {metrics.psnr(decoded, reference, data_range=1.0):.1f} dB"


def _matched_instances(decoded: np.ndarray, ids: np.ndarray) -> tuple[int, int]:
  """(ground-truth instances with a decoded instance at IoU > 0.5, all ground-truth instances)."""
  found = 0
  gt_ids = np.unique(ids[ids > 0])
  for k in gt_ids:
    gt = ids == k
    for j in np.unique(decoded[gt]):
      pred = decoded == j
      if j and (gt & pred).sum() / (gt | pred).sum() > 0.5:
        found += 1
        break
  return found, len(gt_ids)


def _to_uint8(rgb: np.ndarray) -> np.ndarray:
  return np.clip((rgb + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def save_grid(scene: dict, encodings: dict[str, np.ndarray], path: str | os.PathLike) -> None:
  """Top row: the model's inputs (clean, noisy, rainy, dark); bottom row: every RGB target."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  inputs = [("input image", scene["image"]), ("noisy input", scene["noisy"]),
            ("rainy input", scene["rainy"]), ("dark input", scene["dark"])]
  targets = [(k, _to_uint8(v)) for k, v in encodings.items()]
  cols = max(len(inputs), len(targets))
  fig, axes = plt.subplots(2, cols, figsize=(1.9 * cols, 4.2))
  for row, panels in enumerate((inputs, targets)):
    for col in range(cols):
      ax = axes[row, col]
      ax.axis("off")
      if col < len(panels):
        title, img = panels[col]
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=9)
  fig.suptitle("synthetic_scenes: inputs (top) and the RGB-encoded answer of every task (bottom)",
               fontsize=10)
  fig.tight_layout()
  # Through epath's file object: matplotlib itself opens only local paths, not gs://.
  with epath.Path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def run(workdir: str = "runs/demo", *, train: bool = True, config_arg: str | None = None,
        overrides: dict | None = None) -> int:
  """The whole demo; `overrides` replace config keys (dotted names), e.g. total_steps."""
  if not train:
    return show_encodings(workdir)
  from dense_diffusion import train as train_lib
  config = load_demo_config(config_arg)
  for key, value in (overrides or {}).items():
    _set_dotted(config, key, value)
  # First, before any JAX computation: the dataset (rendered by worker processes).
  train_lib.ensure_prepared(config.input.entries, config.input.get("data_dir"))
  show_encodings(workdir)
  print(f"\ntraining configs/demo.py for {config.total_steps} steps into {workdir} "
        f"(TensorBoard: tensorboard --logdir {workdir})", flush=True)
  results = train_lib.train_and_evaluate(config, workdir)
  paths = workdir_lib.WorkdirPaths(workdir)
  print(f"\nmetrics: {paths.metrics}; pictures: {paths.predictions}", flush=True)
  return 0 if results else 1


def load_demo_config(arg: str | None = None):
  """configs/demo.py of this repository (the package is installed from the checkout)."""
  import importlib.util
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: run the demo from a checkout of the repository")
  spec = importlib.util.spec_from_file_location("dense_diffusion_demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _set_dotted(config, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise KeyError(f"config has no key {key!r}")
  node[leaf] = value


def show_encodings(workdir: str = "runs/demo", resolution: int = RESOLUTION,
                   num_scenes: int = NUM_SCENES, seed: int = 0) -> int:
  workdir_path = epath.Path(workdir)  # a local folder or gs://
  workdir_path.mkdir(parents=True, exist_ok=True)
  print(f"dense_diffusion: {len(tasks.names())} tasks, each answer encoded as an RGB image\n")
  rng = np.random.default_rng(seed)
  rows, first_encodings, first_scene = {}, None, None
  for i in range(num_scenes):
    scene = render_scene(np.random.default_rng((seed, i)), resolution)
    encodings = {}
    for name, (task, answer) in _task_answers(scene).items():
      encoded = task.encode(answer)
      if name == "panoptic":
        encoded = np.concatenate([encoded["semantic"], encoded["instance"]], -1)
        encodings["panoptic (sem)"], encodings["panoptic (inst)"] = encoded[..., :3], encoded[..., 3:]
      else:
        encodings[name] = encoded
      clean = _score(name, task, answer, task.decode(encoded))
      noisy_rgb = encoded + rng.normal(0, NOISE_SIGMA, encoded.shape).astype(np.float32)
      noisy = _score(name, task, answer, task.decode(noisy_rgb))
      rows.setdefault(name, (task.prompt, []))[1].append((clean, noisy))
    if first_scene is None:
      first_scene, first_encodings = scene, encodings

  width = max(len(p) for p, _ in rows.values())
  print(f"{'task':<10} {'prompt':<{width}}  {'decode(encode(x)) vs x':<24} "
        f"with noise sigma={NOISE_SIGMA} (scene 0)")
  for name, (prompt, results) in rows.items():
    clean, noisy = results[0]
    print(f"{name:<10} {prompt:<{width}}  {clean:<24} {noisy}")
  grid = workdir_path / "encodings.png"
  # derain / lowlight targets are the same clean image as denoise's: shown once.
  shown = {k: v for k, v in first_encodings.items() if k not in ("derain", "lowlight")}
  save_grid(first_scene, shown, grid)
  print(f"\nwrote {grid} (the inputs and every task's RGB target for scene 0)")
  return 0
