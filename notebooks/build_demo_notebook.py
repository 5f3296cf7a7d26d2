"""Writes notebooks/demo.ipynb (the Colab demo) from the cells below, outputs stripped.

    python notebooks/build_demo_notebook.py          # rewrite notebooks/demo.ipynb
    python notebooks/build_demo_notebook.py --check  # exit 1 if the committed file differs

The notebook is committed; edit the cells here and re-run this script rather than editing the
.ipynb by hand, so that the file stays reviewable and free of outputs. `tests/test_notebook.py`
checks that the two agree and executes the notebook headless.
"""
from __future__ import annotations

import pathlib
import sys

import nbformat
from nbformat import v4

PATH = pathlib.Path(__file__).resolve().parent / "demo.ipynb"

INTRO = """\
# dense_diffusion: one diffusion model for every dense vision task

<a href="https://colab.research.google.com/github/<org>/dense_diffusion/blob/main/notebooks/demo.ipynb"><img src="https://colab.research.google.com/assets/colab-badge.svg" alt="Open In Colab"/></a>

A **generalist** for dense prediction: every task's answer is encoded as an RGB image, and one
UNet *denoises* that image in pixel space, conditioned on the input image and on the task.
The tasks of the built-in, procedurally rendered `synthetic_scenes` dataset:

| kind | tasks |
| --- | --- |
| geometry | depth, surface normals |
| segmentation | semantic, instance (and panoptic, merged from the two) |
| restoration | denoise, derain, low-light enhancement |
| intrinsic decomposition | albedo, shading |

This notebook

1. installs the package (in Colab: clones the repository and `pip install -e`s it),
2. shows what the model learns to produce: every task's exact answer as an RGB image,
3. trains the demo config (`configs/demo.py`: a small UNet, from random initialisation) for a
   few minutes, or evaluates a finished run (`LOAD_WORKDIR`),
4. shows the validation metrics against a trivial baseline and the prediction grid
   (input / truth / prediction for every task),
5. runs `predict` on an image you upload.

Everything runs offline: the data is rendered, no weights are downloaded.
"""

PARAMETERS_MD = """\
## Parameters

In Colab, set `REPO_URL` to the repository to clone (and `REPO_REF` to a branch, tag or commit if
not the default branch). Running from a checkout (`jupyter notebook notebooks/demo.ipynb` with the
package installed) needs no change: the install step is skipped.

`TOTAL_STEPS = 800` is the README's demo: about 8 minutes on 2 CPU cores, much less on a
Colab GPU. Fewer steps train faster and learn less. To look at an existing run instead of
training, set `LOAD_WORKDIR` to its folder: its latest checkpoint is evaluated and used for
prediction. `WORKDIR` is relative to the notebook's working directory.

This cell is tagged `parameters`, so papermill (`papermill -p TOTAL_STEPS 200 ...`) can
override it.
"""

PARAMETERS = """\
REPO_URL = "https://github.com/<org>/dense_diffusion"  # the repository to clone in Colab: set it.
REPO_REF = None  # branch, tag or commit to check out in Colab (None: the default branch).
TOTAL_STEPS = 800  # training steps (the README's demo; ~8 min on 2 CPU cores).
WORKDIR = "runs/colab_demo"  # run folder, relative to the working directory.
EVAL_EXAMPLES = 64  # validation examples per task.
LOAD_WORKDIR = None  # a finished run's folder to evaluate and predict with, instead of training.
DATA_DIR = None  # TFDS data_dir for synthetic_scenes (None: TFDS's default, ~/tensorflow_datasets).
CONFIG_OVERRIDES = {}  # more config keys by dotted name, e.g. {"batch_size": 32, "optimizer.lr": 1e-3}.
PREDICT_TASKS = ["depth", "normals", "semantic", "panoptic", "denoise"]  # tasks run on the upload.
"""

INSTALL_MD = """\
## 1. Install

In Colab the repository is cloned into `/content/dense_diffusion` and installed in editable
mode (this takes a few minutes; if pip reports that it upgraded `jax` or `numpy`, restart the
runtime and run the notebook again). Elsewhere the package must already be importable (e.g.
`pip install -e .` in a checkout); nothing is installed.
"""

INSTALL = """\
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow only feeds data here: quiet it.

if IN_COLAB:
  repo_dir = pathlib.Path("/content/dense_diffusion")
  if not repo_dir.exists():
    if "<org>" in REPO_URL:
      raise ValueError("set REPO_URL in the parameters cell to the repository to clone")
    subprocess.run(["git", "clone", REPO_URL, str(repo_dir)], check=True)
    if REPO_REF:
      subprocess.run(["git", "checkout", REPO_REF], cwd=repo_dir, check=True)
  # A GPU runtime needs JAX's CUDA build (the `gpu` extra); the plain install is CPU-only.
  extra = "[gpu]" if shutil.which("nvidia-smi") else ""
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{repo_dir}{extra}"],
                 check=True)
  # An editable install is found through a .pth file, which this already running kernel has
  # not read: put the checkout on the path directly.
  if str(repo_dir) not in sys.path:
    sys.path.insert(0, str(repo_dir))
elif importlib.util.find_spec("dense_diffusion") is None:
  # Not installed, but perhaps opened from a checkout (cwd = notebooks/ or the repository).
  here = pathlib.Path.cwd().resolve()
  checkout = next((p for p in (here, *here.parents)
                   if (p / "dense_diffusion" / "__init__.py").exists()
                   and (p / "configs" / "demo.py").exists()), None)
  if checkout is None:
    raise ModuleNotFoundError("dense_diffusion is not installed: pip install -e <checkout>")
  sys.path.insert(0, str(checkout))

import dense_diffusion
from absl import logging as absl_logging

absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS deprecation warnings would flood the cells.
print("dense_diffusion from", pathlib.Path(dense_diffusion.__file__).parent,
      "| Colab" if IN_COLAB else "| not Colab: install skipped")
"""

CONFIG_MD = """\
## 2. Config and data

The demo config, with the parameters above applied. `synthetic_scenes/res32` (512 training and
64 validation scenes at 32x32) is rendered on first use, before any JAX computation starts (the
renderer forks worker processes).
"""

CONFIG = """\
import tensorflow as tf
import tensorflow_datasets as tfds

from dense_diffusion import demo
from dense_diffusion import experiment
from dense_diffusion import train
from dense_diffusion.datasets import prepare

tfds.disable_progress_bar()  # the preparation's progress bars would fill the cell output
tf.get_logger().setLevel("ERROR")  # tf.data deprecation notes, not ours to fix here


def set_dotted(config, key, value):
  \"\"\"config["a.b.c"] = value; unlike ConfigDict.update_from_flattened_dict, a typo raises.\"\"\"
  *parents, leaf = key.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise KeyError(f"the config has no key {key!r}")
  node[leaf] = value


workdir = pathlib.Path(WORKDIR)  # this notebook's outputs (and the run, unless LOAD_WORKDIR)
workdir.mkdir(parents=True, exist_ok=True)
if LOAD_WORKDIR:
  run_dir = pathlib.Path(LOAD_WORKDIR)
  config = experiment.load_config(str(run_dir))  # the run's own config.json
else:
  run_dir = workdir
  config = demo.load_demo_config()
  config.total_steps = int(TOTAL_STEPS)
config.eval.max_examples = int(EVAL_EXAMPLES)
if DATA_DIR:
  config.input.data_dir = str(DATA_DIR)
for key, value in CONFIG_OVERRIDES.items():
  set_dotted(config, key, value)

prepare.ensure_prepared(config.input.entries, config.input.get("data_dir"))
print(f"tasks: {', '.join(config.tasks)}")
print(f"run folder: {run_dir}" + ("" if LOAD_WORKDIR else f" ({config.total_steps} steps)"))
"""

ENCODINGS_MD = """\
## 3. What the model learns to produce

A rendered scene, its degraded versions (the restoration tasks' inputs, top row) and the exact
answer of every task encoded as an RGB image (bottom row): depth as a colour ramp, normals as
xyz -> rgb, class and instance labels as colours. The model's output is decoded back from such
images; the table shows that decoding is exact on clean encodings and how much a little noise
costs.
"""

ENCODINGS = """\
from IPython.display import Image, display

demo.show_encodings(str(workdir))
display(Image(filename=str(workdir / "encodings.png")))
"""

TRAIN_MD = """\
## 4. Train (or evaluate a finished run)

One model for all tasks at once. Every `log_every` steps a line shows the loss of each task; at
the end every task is evaluated on the validation split. Running this cell again with the same
`WORKDIR` resumes from the latest checkpoint (or only re-evaluates, when training is done).
"""

TRAIN = """\
import time

from dense_diffusion import evaluate

start = time.time()
if LOAD_WORKDIR:
  results = evaluate.evaluate_latest(config, str(run_dir))
else:
  results = train.train_and_evaluate(config, str(run_dir))
print(f"done in {time.time() - start:.0f}s")
"""

METRICS_MD = """\
## 5. Metrics against a trivial baseline

The baseline is what a model that learned nothing scores: each image's own mean depth / mean
normal / majority class / mean shading, no instances, the degraded input itself for
restoration.
"""

METRICS = """\
import json

from dense_diffusion import evaluate

history = json.loads((run_dir / evaluate.METRICS_FILE).read_text())
step = max(int(s) for s in history)  # the evaluation just written
results = history[str(step)]
order = [t for t in (*config.tasks, "panoptic") if t in results]  # the config's task order
rows = []
for task in order + sorted(set(results) - set(order)):
  values = results[task]
  key = values.get("headline")  # every task's result names its headline metric
  if key is None or key not in values:
    continue
  model, baseline = values[key], values.get("baseline", {}).get(key, float("nan"))
  better = evaluate.is_better(values)  # by the result's own "higher_is_better"
  rows.append({"task": task, "metric": key, "model": round(model, 4),
               "baseline": round(baseline, 4), "better": "yes" if better else "NO",
               "examples": values.get("num_examples")})

print(f"step {step}")
try:
  import pandas as pd
  display(pd.DataFrame(rows).set_index("task"))
except ImportError:  # pandas is not a dependency of the package
  print(f"{'task':<10} {'metric':<8} {'model':>9} {'baseline':>9}  better  examples")
  for r in rows:
    print(f"{r['task']:<10} {r['metric']:<8} {r['model']:>9.4f} {r['baseline']:>9.4f}  "
          f"{r['better']:<6}  {r['examples']}")
"""

GRID_MD = """\
## 6. Prediction grid: every task

One row per task: input, ground truth and the model's prediction (as the RGB image it
produces) for a few validation examples.
"""

GRID = """\
grid = run_dir / "predictions" / f"step_{step}.png"
print(grid)
display(Image(filename=str(grid)))
"""

PREDICT_MD = """\
## 7. Predict on your own image

In Colab, pick one or more image files to upload (any size; they are resized to the model's
32x32 and the answers back). Elsewhere (headless, or if nothing is uploaded) a freshly rendered
synthetic scene, written to a PNG, stands in for the upload. This is what
`python -m dense_diffusion.main predict --workdir RUN --task TASK --input FILES --output OUT`
does; the `Predictor` restores the checkpoint and compiles the sampler once for all tasks.
"""

PREDICT = """\
import collections
import io

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image as PILImage

from dense_diffusion import predict
from dense_diffusion.datasets.synthetic_scenes import render_scene

uploads = workdir / "uploads"
uploads.mkdir(parents=True, exist_ok=True)
inputs = []
if IN_COLAB:
  from google.colab import files
  for name, data in files.upload().items():
    path = uploads / pathlib.Path(name).name
    path.write_bytes(data)
    inputs.append(path)
if not inputs:
  # A scene from a seed outside the dataset's (seed, split, index) seeds: new to the model.
  scene = render_scene(2024, 128)
  path = uploads / "synthetic_scene.png"
  PILImage.fromarray(scene["image"]).save(path)
  inputs.append(path)

predictor = predict.Predictor(str(run_dir))
outputs = {}
for task in PREDICT_TASKS:
  summary = predictor.run(task, inputs, workdir / "predict" / task)
  outputs[task] = [pathlib.Path(p) for p in summary.outputs]


def preview(files, stem, task):
  \"\"\"The file of `task`'s outputs for input `stem` that is best to look at.\"\"\"
  mine = [f for f in files if f.name.startswith(f"{stem}_")]
  for suffix in ("_color.png", "_overlay.png", f"_{task}.png"):
    for f in mine:
      if f.name.endswith(suffix):
        return f
  return None


def show(fig):
  \"\"\"Displays a figure as PNG whatever the matplotlib backend (the evaluator selects Agg).\"\"\"
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
  plt.close(fig)
  display(Image(data=buf.getvalue()))


# Output names start with the input's stem (stem_ext when two inputs share a stem).
stem_counts = collections.Counter(p.stem for p in inputs)
for path in inputs:
  stem = path.stem if stem_counts[path.stem] == 1 else f"{path.stem}_{path.suffix.lstrip('.')}"
  panels = [("input", predict.load_rgb(path))]
  for task in PREDICT_TASKS:
    f = preview(outputs[task], stem, task)
    if f is not None:
      panels.append((task, np.asarray(PILImage.open(f))))
  fig, axes = plt.subplots(1, len(panels), figsize=(2.4 * len(panels), 2.6), squeeze=False)
  for ax, (title, img) in zip(axes[0], panels):
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
  fig.suptitle(path.name, fontsize=10)
  show(fig)
print("outputs:", workdir / "predict")
"""

OUTRO = """\
## Next

- Command line: `python -m dense_diffusion.main train --config configs/demo.py --workdir runs/demo`
  (`docs/training.md`), `python -m dense_diffusion.main predict ...` (`docs/predict.md`).
- TensorBoard: `%load_ext tensorboard` then `%tensorboard --logdir runs/colab_demo`.
- Real datasets and pre-trained Stable Diffusion weights: `data/README.md`, `docs/models.md`.
"""


def build() -> nbformat.NotebookNode:
  """The notebook, outputs stripped; code cells carry tags the test finds them by."""
  md = v4.new_markdown_cell
  code = lambda source, tag: v4.new_code_cell(source, metadata={"tags": [tag]})
  cells = [
      md(INTRO), md(PARAMETERS_MD), code(PARAMETERS, "parameters"),
      md(INSTALL_MD), code(INSTALL, "install"),
      md(CONFIG_MD), code(CONFIG, "config"),
      md(ENCODINGS_MD), code(ENCODINGS, "encodings"),
      md(TRAIN_MD), code(TRAIN, "train"),
      md(METRICS_MD), code(METRICS, "metrics"),
      md(GRID_MD), code(GRID, "prediction-grid"),
      md(PREDICT_MD), code(PREDICT, "predict"),
      md(OUTRO),
  ]
  for i, cell in enumerate(cells):
    cell.id = f"cell-{i:02d}"  # stable ids: regenerating gives the same file
    cell.source = cell.source.rstrip("\n")
  nb = v4.new_notebook(cells=cells)
  nb.metadata = {
      "accelerator": "GPU",
      "colab": {"provenance": [], "name": "dense_diffusion demo"},
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
  }
  return nb


def render() -> str:
  return nbformat.writes(build()) + "\n"


def main(argv: list[str]) -> int:
  text = render()
  if "--check" in argv:
    if not PATH.exists() or PATH.read_text() != text:
      print(f"{PATH} is not what {pathlib.Path(__file__).name} writes: run it", file=sys.stderr)
      return 1
    return 0
  PATH.write_text(text)
  print(f"wrote {PATH}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
