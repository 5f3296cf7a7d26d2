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

from dense_diffusion import errors
from dense_diffusion import tasks as tasks_lib
from dense_diffusion import workdir as workdir_lib
from dense_diffusion.datasets import prepare
from dense_diffusion.datasets.synthetic_scenes import label_features, render_scene
from dense_diffusion.experiment import config as config_lib

RESOLUTION = 128  # pixels; the seed paper's generalist works at 128x128.
NUM_SCENES = 4  # scenes rendered for the round-trip table.
NOISE_SIGMA = 0.02  # std of Gaussian noise added to encodings, in [-1, 1] units.
# The demo command splits the CPU into this many JAX devices (the batch is split over them):
# XLA:CPU keeps few threads busy on one device's small convolutions, and two devices with half
# the batch each trained 1.29x faster on 2 cores (1.89 vs 1.47 steps/s, docs/benchmarks.md).
CPU_DEVICES = 2


def scene_example(scene: dict, task: tasks_lib.Task) -> dict:
  """A rendered scene's features as the task reads them from synthetic_scenes (its renames)."""
  example = label_features(scene)
  for src, dst in task.synthetic_source:
    example[dst] = example[src]
  return example


def score(task: tasks_lib.Task, answer, decoded, model_input: np.ndarray) -> str:
  """The task's headline metric of a decoded answer against the exact one (its evaluator)."""
  evaluator = task.evaluator()
  evaluator.update([decoded], [answer], [model_input])
  return f"{task.headline} {evaluator.result()[task.headline]:.4f}"


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
    return show_encodings(workdir, config=load_demo_config(config_arg))
  from dense_diffusion import train as train_lib  # pylint: disable=g-import-not-at-top
  config = load_demo_config(config_arg)
  config_lib.set_dotted(config, overrides or {})
  config_lib.check(config)
  # First, before any JAX computation: the dataset (rendered by worker processes).
  prepare.ensure_prepared(config.input.entries, config.input.get("data_dir"))
  show_encodings(workdir, config=config)
  print(f"\ntraining configs/demo.py for {config.total_steps} steps into {workdir} "
        f"(TensorBoard: tensorboard --logdir {workdir})", flush=True)
  results = train_lib.train_and_evaluate(config, workdir)
  paths = workdir_lib.WorkdirPaths(workdir)
  print(f"\nmetrics: {paths.metrics}; pictures: {paths.predictions}", flush=True)
  return 0 if results else 1


def load_demo_config(arg: str | None = None):
  """configs/demo.py of this repository (the package is installed from the checkout)."""
  import importlib.util
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  path = root / "configs" / "demo.py"
  if not path.exists():
    raise errors.MissingError(f"{path} not found: run the demo from a checkout of the repository")
  # The config imports its siblings as `configs.X` (configs/synthetic_vae.py): importable from
  # any working directory (a notebook's, a test's), as they are from the repository root.
  if str(root) not in sys.path:
    sys.path.append(str(root))
  spec = importlib.util.spec_from_file_location("dense_diffusion_demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def show_encodings(workdir: str = "runs/demo", resolution: int = RESOLUTION,
                   num_scenes: int = NUM_SCENES, seed: int = 0, config=None) -> int:
  """Renders scenes, encodes every task's exact answer (`config`: the demo's tasks and their
  options by default), decodes it back clean and with noise, prints the round-trip table and
  writes `encodings.png`."""
  config = config if config is not None else load_demo_config()
  demo = list(config_lib.available_tasks(config).values())
  workdir_path = epath.Path(workdir)  # a local folder or gs://
  workdir_path.mkdir(parents=True, exist_ok=True)
  print(f"dense_diffusion: {len(demo)} tasks, each answer encoded as an RGB image\n")
  rng = np.random.default_rng(seed)
  rows, first_encodings, first_scene = {}, None, None
  for i in range(num_scenes):
    scene = render_scene(np.random.default_rng((seed, i)), resolution)
    encodings = {}
    for task in demo:
      example = scene_example(scene, task)
      answer = task.answer(example, prefix="")
      model_input = example["image"].astype(np.float32) / 127.5 - 1.0
      encoded = task.encode(answer)
      # A composite's encoding is one RGB image per part.
      composite = isinstance(encoded, dict)
      parts = encoded if composite else {task.name: encoded}
      for part, rgb in parts.items():
        encodings[f"{task.name} ({part})" if composite else task.name] = rgb
      noisy = {k: v + rng.normal(0, NOISE_SIGMA, v.shape).astype(np.float32)
               for k, v in parts.items()}
      clean_score = score(task, answer, task.decode(encoded), model_input)
      noisy_score = score(task, answer, task.decode(noisy if composite else noisy[task.name]),
                          model_input)
      rows.setdefault(task.name, (task.prompt, []))[1].append((clean_score, noisy_score))
    if first_scene is None:
      first_scene, first_encodings = scene, encodings

  width = max(len(p) for p, _ in rows.values())
  print(f"{'task':<10} {'prompt':<{width}}  {'decode(encode(x)) vs x':<24} "
        f"with noise sigma={NOISE_SIGMA} (scene 0)")
  for name, (prompt, results) in rows.items():
    clean, noisy = results[0]
    print(f"{name:<10} {prompt:<{width}}  {clean:<24} {noisy}")
  grid = workdir_path / "encodings.png"
  # Targets that are the same image (the clean render of every restoration task) are shown once.
  shown: dict[str, np.ndarray] = {}
  for name, rgb in first_encodings.items():
    if not any(np.array_equal(rgb, other) for other in shown.values()):
      shown[name] = rgb
  save_grid(first_scene, shown, grid)
  print(f"\nwrote {grid} (the inputs and every task's RGB target for scene 0)")
  return 0
