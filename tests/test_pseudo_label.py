"""`main pseudo-label` (DMP's training data): a folder of images, a corrupt one among them,
labelled by a tiny trained teacher becomes a TFDS set whose labels are the teacher's answers in
the tasks' formats; an interrupted run resumes; the corrupt file is counted, skipped and named;
configs/dmp.py:real=1 trains on the set through `main train`. Also: the flags' mistakes, the
reader entry and its metadata check, the square crop."""
import contextlib
import io
import json
import os
import pathlib
import sys

import numpy as np
import pytest
from PIL import Image
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import dmp
from dense_diffusion import checkpointing
from dense_diffusion import errors
from dense_diffusion import experiment
from dense_diffusion import input_pipeline
from dense_diffusion import main as cli
from dense_diffusion import predict
from dense_diffusion import pseudo_label
from dense_diffusion import pp as pp_lib
from dense_diffusion.datasets import readers
from dense_diffusion.datasets.synthetic_scenes import renderer
import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]
TASKS = dmp.DMP_TASKS
# name -> (width, height); grey.png is a grey-scale file (read as RGB), sub/ a subfolder.
SIZES = {"wide.png": (40, 30), "tall.jpg": (24, 36), "sub/square.png": (32, 32),
         "grey.png": (28, 20)}
BATCH = 2  # the teacher's batch: the interrupted run stops after its first batch of two.
TIMEOUT = 900  # seconds for one command on a busy 2-core machine (a minute or two idle).


def _env():
  return dict(os.environ, XLA_FLAGS=subprocess_env.xla_flags(), TF_CPP_MIN_LOG_LEVEL="2")


def _main(*args):
  return subprocess_env.run([sys.executable, "-m", "dense_diffusion.main", *map(str, args)],
                            cwd=REPO, env=_env(), capture_output=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, synthetic_data_dir) -> pathlib.Path:
  """A tiny DMP run on the five tasks (configs/dmp.py:tiny=1, pixel space), saved untrained:
  enough to answer, and DMP's sampler starts at the image, so its answers are deterministic.
  The student below has the same network and sampler, so its evaluation reuses the teacher's
  compiled program (the session's compilation cache)."""
  workdir = tmp_path_factory.mktemp("teacher")
  config = dmp.get_config("tiny=1")
  config.input.data_dir = synthetic_data_dir
  config.batch_size = BATCH
  config.eval.batch_size = BATCH
  config.diffusion.num_inference_steps = 1
  experiment.save_config(config, workdir)
  exp = experiment.Experiment(config)
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  import jax  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(exp.mesh):
    assert checkpointer.maybe_save(0, exp.state, force=True)
  checkpointer.close()
  return workdir


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for name, (w, h) in SIZES.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    shape = (h, w) if name.startswith("grey") else (h, w, 3)
    Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(folder / name)
  (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
  (folder / "notes.txt").write_text("not an image")  # left out, with a count
  return folder


@pytest.fixture(scope="module")
def labelled(teacher, images, tmp_path_factory):
  """A run interrupted after its first batch (as Ctrl-C would), then the `pseudo-label`
  command rerun with the same flags (in this process: a second process would import and
  build everything again). Returns (data_dir, what the first run said, the files it left
  staged, the command's (exit code, stdout, stderr))."""
  out = tmp_path_factory.mktemp("tfds")
  spec = ",".join(f"{task}={teacher}" for task in TASKS)
  said = []

  def interrupt_at_progress(line):
    said.append(line)
    if line.startswith("labelled"):
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    pseudo_label.run(str(images), [spec], str(out), dataset="rooms",
                     log=interrupt_at_progress, err=said.append)
  staged = sorted(p.name for p in
                  (pseudo_label.staging_dir(out, "rooms") / "examples").glob("*.npz"))
  stdout, stderr = io.StringIO(), io.StringIO()
  argv = cli.FLAGS(["main", "pseudo-label", "--input", str(images), "--teacher", spec,
                    "--output", str(out), "--dataset", "rooms"])
  try:
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
      code = cli.main(argv)
  finally:
    cli.FLAGS.unparse_flags()
  return out, said, staged, (code, stdout.getvalue(), stderr.getvalue())


def _read(data_dir) -> tuple[dict, list[dict]]:
  builder = tfds.builder("pseudo_labelled/rooms", data_dir=str(data_dir))
  return builder, list(tfds.as_numpy(builder.as_dataset(split="train")))


def test_an_interrupted_run_resumes(labelled):
  out, said, staged, (code, stdout, stderr) = labelled
  assert code == 0, stderr[-3000:]
  # The first run stopped after one batch: two images staged, and it said how to go on.
  assert len(staged) == BATCH
  assert any(line.startswith(f"interrupted: {BATCH} of 5 images") for line in said), said
  # The rerun took those two as they were and labelled the other three.
  assert f"resuming: {BATCH} of 5 images already labelled" in stdout
  assert "labelling 3 images" in stdout
  assert "left out 1 files without an image suffix" in stdout
  assert "labelled 4/5 images" in stdout  # progress: done / total, rate, ETA
  assert "images/s, ETA" in stdout
  assert not pseudo_label.staging_dir(out, "rooms").exists()  # removed once built
  assert f"data={pseudo_label.dataset_dir(out, 'rooms')}" in stdout


def test_the_corrupt_image_is_counted_skipped_and_named(labelled):
  out, _, _, (_, _, stderr) = labelled
  assert "1 of 5 images could not be read and were skipped" in stderr
  assert "corrupt.png (UnidentifiedImageError" in stderr
  builder, examples = _read(out)
  assert builder.info.splits["train"].num_examples == 4
  assert sorted(e["key"].decode() for e in examples) == sorted(SIZES)
  assert [s.split(":")[0] for s in builder.info.metadata["skipped"]] == ["corrupt.png"]


def test_the_labels_are_the_teachers_answers_in_the_tasks_formats(labelled, teacher, images):
  out, _, _, _ = labelled
  builder, examples = _read(out)
  # The options the labels are in: the teacher's own (synthetic_scenes' depth range, classes).
  options = builder.info.metadata["task_options"]
  assert options["depth"] == {"min_depth": 0.0, "max_depth": readers.SYNTHETIC_MAX_DEPTH,
                              "affine_invariant": False}
  assert options["semantic"]["num_classes"] == renderer.NUM_CLASSES
  assert [c["name"] for c in options["semantic"]["categories"]] == list(renderer.CLASS_NAMES)
  assert options["shading"] == {"max_shading": 1.0}
  assert builder.info.metadata["teachers"] == {t: str(teacher.resolve()) for t in TASKS}
  reference = predict.Predictor(str(teacher), batch_size=BATCH)
  for example in examples:
    key = example["key"].decode()
    pixels = predict.load_rgb(images / key)
    w, h = SIZES[key]
    np.testing.assert_array_equal(example["image"], pixels)  # grey read as RGB, same size
    want = {task: reference.answer([pixels], task)[0] for task in TASKS}
    assert example["depth"].dtype == np.float16 and example["depth"].shape == (h, w)
    np.testing.assert_array_equal(example["depth"], want["depth"].astype(np.float16))
    assert 0 <= example["depth"].min() and example["depth"].max() <= readers.SYNTHETIC_MAX_DEPTH
    np.testing.assert_allclose(example["normals"], want["normals"], atol=2e-3)
    norms = np.linalg.norm(example["normals"].astype(np.float32), axis=-1)
    np.testing.assert_allclose(norms[norms > 0], 1.0, atol=3e-3)  # unit vectors
    np.testing.assert_array_equal(example["semantic"][..., 0], want["semantic"])
    assert example["semantic"].max() < renderer.NUM_CLASSES
    np.testing.assert_array_equal(example["albedo"],
                                  np.round(np.clip(want["albedo"], 0, 1) * 255).astype(np.uint8))
    np.testing.assert_array_equal(example["shading"], want["shading"].astype(np.float16))


def test_dmp_trains_on_the_set_through_main_train(labelled, synthetic_data_dir, tmp_path):
  """configs/dmp.py:real=1 at test size (tiny=1) on the set, evaluated out of domain on
  synthetic_scenes/tiny32. Pixel space (latent=0): the teacher's compiled sampler serves the
  student's evaluation; real=1's latent path runs in tests/test_real_configs.py."""
  out, _, _, _ = labelled
  path = pseudo_label.dataset_dir(out, "rooms")
  workdir = tmp_path / "student"
  result = _main("train", "--config", f"configs/dmp.py:real=1,tiny=1,latent=0,data={path}",
                 "--workdir", workdir, f"--config.input.data_dir={synthetic_data_dir}",
                 "--config.total_steps=2", f"--config.batch_size={BATCH}",
                 f"--config.eval.batch_size={BATCH}", f"--config.eval.max_examples={BATCH}",
                 "--config.diffusion.num_inference_steps=1", "--config.input.shuffle_buffer=4",
                 "--config.log_every=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 2/2" in result.stdout
  saved = json.loads((workdir / "config.json").read_text())
  assert {e["dataset"] for e in saved["input"]["entries"]} == {"pseudo_labelled/rooms"}
  assert {e["task"] for e in saved["input"]["entries"]} == set(TASKS)
  metrics = json.loads((workdir / "eval_metrics.json").read_text())
  scored = json.dumps(metrics)
  for task in TASKS:  # every task scored on synthetic_scenes' ground truth
    assert f'"{task}"' in scored, metrics


def test_the_reader_takes_the_options_from_the_set_and_checks_them(labelled):
  out, _, _, _ = labelled
  path = pseudo_label.dataset_dir(out, "rooms")
  entry = readers.get("pseudo_labelled", task="semantic", path=str(path), resolution=32)
  assert entry["dataset"] == "pseudo_labelled/rooms" and entry["data_dir"] == str(out)
  assert entry["task_options"]["num_classes"] == renderer.NUM_CLASSES
  assert "random_square_crop" in entry["pp"]
  builder = tfds.builder("pseudo_labelled/rooms", data_dir=str(out))
  input_pipeline.check_metadata(entry, builder)  # made from the set: it fits
  # An entry that assumes other labels (DMP's default: ADE20K's 150 classes) is refused.
  assumed = readers.pseudo_labelled("semantic", name="rooms",
                                    task_options=dmp.DMP_LABELS["semantic"])
  with pytest.raises(errors.ConfigError, match=r"task_options\.semantic\.num_classes is 7"):
    input_pipeline.check_metadata(assumed, builder)
  with pytest.raises(errors.MissingError, match="pseudo-label"):
    readers.pseudo_labelled("depth", path=str(out / "pseudo_labelled" / "nowhere"))
  with pytest.raises(errors.ConfigError, match="DATA_DIR/pseudo_labelled/NAME"):
    readers.pseudo_labelled("depth", path=str(out))
  config = dmp.get_config(f"real=1,tiny=1,data={path}")
  assert [e["task"] for e in config.input.entries] == list(TASKS)
  assert config.model.latent  # DMP's set-up: SD's latent space
  with pytest.raises(errors.MissingError, match="pseudo_labelled/absent"):
    tfds.builder("pseudo_labelled/absent", data_dir=str(out))


@pytest.mark.parametrize("teachers,message", [
    (["depth"], "write TASK=SOURCE"),
    (["panoptic=x"], "pseudo-labels cover the tasks"),
    (["depth=a,depth=b"], "two teachers"),
    (["depth=/no/such/folder"], "is not a folder"),
])
def test_teacher_mistakes_are_one_line(teachers, message, images, tmp_path):
  with pytest.raises(errors.UserError, match=message):
    pseudo_label.run(str(images), teachers, str(tmp_path))


def test_an_existing_set_and_a_missing_flag_are_one_line(labelled, images, teacher, capsys):
  out, _, _, _ = labelled
  with pytest.raises(errors.ConfigError, match="already exists"):
    pseudo_label.run(str(images), [f"depth={teacher}"], str(out), dataset="rooms")
  argv = cli.FLAGS(["main", "pseudo-label", "--input", str(images), "--output", str(out)])
  try:
    assert cli.main(argv) == errors.EXIT_USER_ERROR
  finally:
    cli.FLAGS.unparse_flags()
  assert capsys.readouterr().err.strip() == "error: pseudo-label needs --teacher"


def test_random_square_crop_is_one_window_of_the_shorter_side():
  image = np.arange(5 * 8 * 3, dtype=np.uint8).reshape(5, 8, 3)
  label = np.arange(5 * 8, dtype=np.int32).reshape(5, 8)
  fn = pp_lib.get_preprocess_fn('random_square_crop(keys=("image", "semantic"))')
  offsets = set()
  for i in range(12):
    out = fn({"image": tf.constant(image), "semantic": tf.constant(label),
              "_rng": tf.constant([0, i], tf.int64)})
    got, got_label = out["image"].numpy(), out["semantic"].numpy()
    assert got.shape == (5, 5, 3)
    x0 = int(got_label[0, 0])  # label values are column indices on row 0
    np.testing.assert_array_equal(got, image[:, x0:x0 + 5])
    np.testing.assert_array_equal(got_label, label[:, x0:x0 + 5])
    offsets.add(x0)
  assert offsets <= set(range(4)) and len(offsets) > 1  # random, and never past the edge


def test_a_marigold_normals_teacher_answers_in_our_camera_frame():
  """Marigold's normals are x right, y up, z towards the viewer (diffusers'
  MarigoldImageProcessor.visualize_normals); ours x right, y down, z forward."""
  from dense_diffusion import tasks  # pylint: disable=g-import-not-at-top
  from dense_diffusion.pipelines import marigold  # pylint: disable=g-import-not-at-top
  facing_the_camera_and_up = np.array([[[0.0, 0.6, 0.8]]], np.float32)  # Marigold's frame
  normals = object.__new__(marigold.MarigoldNormalsPipeline)
  [(task, got)] = pseudo_label.in_our_frame(normals, [(tasks.get("normals"),
                                                       facing_the_camera_and_up)])
  assert task.name == "normals"
  np.testing.assert_allclose(got, [[[0.0, -0.6, -0.8]]])  # up = -y, towards the camera = -z
  depth = object.__new__(marigold.MarigoldDepthPipeline)
  answers = [(tasks.get("depth", affine_invariant=True), np.ones((1, 1), np.float32))]
  assert pseudo_label.in_our_frame(depth, answers) is answers
