"""notebooks/demo.ipynb executes headless and produces its images (issue 7, item 6).

The notebook runs in a fresh IPython kernel of this interpreter (nbclient), in a temporary
working directory, with its parameters cell overridden papermill-style: a few training steps, a
small evaluation, and a smaller UNet than the demo's so that initialisation and compilation
take seconds instead of minutes on 2 CPU cores. All nine demo tasks are kept. No network is used: outside Colab the
notebook skips the install and predicts on a rendered scene instead of an upload.
"""
import json
import os
import pathlib
import sys

import pytest

from subprocess_env import xla_flags

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "demo.ipynb"
STEPS = 5
PREDICT_TASKS = ["depth", "normals", "semantic", "panoptic", "denoise"]
DEMO_TASKS = ("depth", "normals", "semantic", "instance", "albedo", "shading", "denoise",
              "derain", "lowlight")
CELL_TIMEOUT = 600  # seconds per cell; the whole notebook takes ~85 s on 2 busy CPU cores.
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# A one-level UNet without attention blocks (the mid block keeps its cross-attention to the task
# and image tokens) and configs/tiny.py's encoder sizes: on 2 busy CPU cores the demo's 3-level
# UNet takes minutes to initialise and compile, this one seconds. A small shuffle buffer: the
# demo's (1000) reads the whole split of all nine entries before the first batch.
FAST_RUN = {
    "batch_size": 8,
    "input.shuffle_buffer": 16,
    "model.unet.block_out_channels": [16],
    "model.unet.down_block_types": ["DownBlock2D"],
    "model.unet.up_block_types": ["UpBlock2D"],
    "model.unet.cross_attention_dim": 32,
    "model.num_task_tokens": 2,
    "model.image_encoder.hidden_size": 32,
    "model.image_encoder.intermediate_size": 64,
    "model.image_encoder.num_attention_heads": 2,
    "diffusion.num_inference_steps": 1,
    "log_every": 1,
    "checkpoint_every": 1000,
    "eval.batch_size": 8,
    "eval.num_grid_examples": 2,
}


def tagged(nb, tag):
  cells = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
  assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
  return cells[0]


def inject_parameters(nb, **params):
  """Appends assignments to the `parameters` cell, as papermill's injected cell would."""
  cell = tagged(nb, "parameters")
  lines = [f"{name} = {value!r}" for name, value in params.items()]
  cell.source += "\n\n# Injected by tests/test_notebook.py\n" + "\n".join(lines)


def kernel_manager(kernel_dir: pathlib.Path):
  """A kernel manager whose kernel is this interpreter (the .venv's), not whatever a
  `python3` kernelspec on the search path resolves to."""
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import AsyncKernelManager
  spec_dir = kernel_dir / "dense_diffusion_test"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "dense_diffusion test", "language": "python"}))
  specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
  return AsyncKernelManager(kernel_name="dense_diffusion_test", kernel_spec_manager=specs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory, synthetic_res32_data_dir):
  """(executed notebook, its working directory): the notebook run once for every test here."""
  base = tmp_path_factory.mktemp("notebook")
  cwd = base / "cwd"
  cwd.mkdir()
  nb = nbformat.read(NOTEBOOK, as_version=4)
  inject_parameters(nb, TOTAL_STEPS=STEPS, WORKDIR="runs/nb", EVAL_EXAMPLES=8,
                    DATA_DIR=synthetic_res32_data_dir, CONFIG_OVERRIDES=FAST_RUN,
                    PREDICT_TASKS=PREDICT_TASKS)
  env = dict(os.environ)
  env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
             # One CPU device whatever the calling process set. The evaluation's sampler and the
             # Predictor's are the same program: the session's compilation cache (conftest.py)
             # serves the second.
             XLA_FLAGS=xla_flags())
  client = nbclient.NotebookClient(
      nb, km=kernel_manager(base / "kernels"), timeout=CELL_TIMEOUT,
      resources={"metadata": {"path": str(cwd)}})
  executed_path = base / "executed.ipynb"  # kept for a look at the outputs after a failure
  try:
    client.execute(env=env, cwd=str(cwd))
  except nbclient.exceptions.CellExecutionError as e:
    nbformat.write(nb, executed_path)
    pytest.fail(f"a notebook cell failed (outputs: {executed_path}):\n{str(e)[-6000:]}")
  nbformat.write(nb, executed_path)
  return nb, cwd


def image_outputs(cell) -> list[bytes]:
  import base64
  return [base64.b64decode(o["data"]["image/png"]) for o in cell.get("outputs", [])
          if o.get("output_type") in ("display_data", "execute_result")
          and "image/png" in o.get("data", {})]


def assert_png(path: pathlib.Path, min_size: int = 32) -> None:
  from PIL import Image
  assert path.is_file(), path
  assert path.read_bytes()[:8] == PNG_MAGIC, path
  with Image.open(path) as img:
    img.verify()
  with Image.open(path) as img:
    assert min(img.size) >= min_size, (path, img.size)


def test_committed_notebook_is_generated_and_stripped():
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "build_demo_notebook", REPO / "notebooks" / "build_demo_notebook.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert NOTEBOOK.read_text() == module.render(), (
      "notebooks/demo.ipynb differs from what notebooks/build_demo_notebook.py writes: run it")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]
  parameters = tagged(nb, "parameters").source
  from dense_diffusion import demo
  demo_steps = demo.load_demo_config().total_steps  # the notebook's default is the README demo.
  for name in ("REPO_URL", f"TOTAL_STEPS = {demo_steps} ", "WORKDIR", "EVAL_EXAMPLES",
               "LOAD_WORKDIR"):
    assert name in parameters


def test_no_cell_errored(executed):
  nb, _ = executed
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      assert out.get("output_type") != "error", (cell.source[:200], out.get("evalue"))


def test_training_reached_the_step_count_and_evaluated_every_task(executed):
  nb, cwd = executed
  run = cwd / "runs" / "nb"
  text = "".join(o.get("text", "") for o in tagged(nb, "train").outputs
                 if o.get("output_type") == "stream")
  assert f"step {STEPS}/{STEPS}" in text, text[-3000:]
  history = json.loads((run / "eval_metrics.json").read_text())
  assert list(history) == [str(STEPS)]
  results = history[str(STEPS)]
  assert set(DEMO_TASKS) | {"panoptic"} <= set(results)
  for task in DEMO_TASKS:
    assert results[task]["num_examples"] == 8, (task, results[task])
  config = json.loads((run / "config.json").read_text())  # the overrides reached the run
  assert config["total_steps"] == STEPS and config["eval"]["max_examples"] == 8
  assert config["model"]["unet"]["block_out_channels"] == [16]
  assert config["input"]["data_dir"] == os.environ["TFDS_DATA_DIR"]  # the session's


def test_images_written_and_shown_inline(executed):
  nb, cwd = executed
  run = cwd / "runs" / "nb"
  assert_png(run / "encodings.png", 200)
  assert_png(run / "predictions" / f"step_{STEPS}.png", 200)
  for tag in ("encodings", "prediction-grid", "predict"):
    shown = image_outputs(tagged(nb, tag))
    assert shown and all(png[:8] == PNG_MAGIC for png in shown), tag
  grid_png = (run / "predictions" / f"step_{STEPS}.png").read_bytes()
  assert grid_png in image_outputs(tagged(nb, "prediction-grid"))
  metrics_text = json.dumps(tagged(nb, "metrics").outputs)
  for task in DEMO_TASKS:
    assert task in metrics_text


def test_predict_outputs_for_the_stand_in_upload(executed):
  _, cwd = executed
  upload = cwd / "runs" / "nb" / "uploads" / "synthetic_scene.png"
  assert_png(upload, 128)
  out = cwd / "runs" / "nb" / "predict"
  expected = {"depth": ["depth", "depth_color"], "normals": ["normals"],
              "semantic": ["semantic", "semantic_overlay"],
              "panoptic": ["panoptic", "panoptic_overlay"], "denoise": ["denoise"]}
  for task, names in expected.items():
    for name in names:
      assert_png(out / task / f"synthetic_scene_{name}.png", 128)  # back at the upload's size
  segments = json.loads((out / "panoptic" / "synthetic_scene_panoptic.json").read_text())
  assert (segments["height"], segments["width"]) == (128, 128)


def test_outputs_stay_under_workdir(executed):
  """The notebook writes only under its working directory (WORKDIR is relative to it)."""
  _, cwd = executed
  assert sorted(p.name for p in cwd.iterdir()) == ["runs"]
