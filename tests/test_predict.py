"""`predict`: a restored tiny run predicts on user images of any size and mode, writes every task's
files at the original size, reports unreadable files and batches with padding."""
import json
import pathlib

from etils import epath
import jax
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from dense_diffusion import checkpointing
from dense_diffusion import experiment
from dense_diffusion import main as cli
from dense_diffusion import predict
from dense_diffusion import tasks as tasks_lib
from dense_diffusion.datasets import readers
from dense_diffusion.tasks import panoptic

TASKS = ("depth", "semantic", "instance")
SIZES = {"wide.png": (50, 37), "tall.jpg": (40, 64), "grey.png": (30, 20)}  # (width, height)


EMA_OFFSET = 0.01


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_data_dir) -> pathlib.Path:
  """A tiny run's folder: config.json and a checkpoint at step 3 whose EMA differs from params;
  its data_dir is the session's, where synthetic_scenes/tiny32 is prepared.

  No optimizer step is taken: compiling the tiny model's backward pass costs more than this
  file's whole time budget on a 2-core CPU, and prediction only reads the saved state.
  """
  workdir = tmp_path_factory.mktemp("run")
  config = tiny.get_config()
  config.tasks = TASKS
  config.input.entries = readers.synthetic_mixture(TASKS, config="tiny32")
  config.input.data_dir = synthetic_data_dir
  config.batch_size = 2
  config.eval.batch_size = 2
  config.diffusion.num_inference_steps = 1
  experiment.save_config(config, workdir)
  exp = experiment.Experiment(config)
  state = exp.state.replace(step=exp.state.step + 3,
                            ema=jax.tree.map(lambda x: x + EMA_OFFSET, exp.state.ema))
  checkpointer = checkpointing.Checkpointer(str(workdir / "checkpoints"), async_save=False)
  with jax.set_mesh(exp.mesh):
    assert checkpointer.maybe_save(3, state, force=True)
  checkpointer.close()
  return workdir


@pytest.fixture(scope="module")
def predictor(run_dir) -> predict.Predictor:
  return predict.Predictor(str(run_dir), batch_size=2)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> pathlib.Path:
  folder = tmp_path_factory.mktemp("inputs")
  rng = np.random.default_rng(1)
  for name, (w, h) in SIZES.items():
    pixels = rng.integers(0, 256, (h, w) if name.startswith("grey") else (h, w, 3), np.uint8)
    Image.fromarray(pixels).save(folder / name)
  (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
  return folder


def _cli(*args: str) -> int:
  argv = cli.FLAGS(["main", "predict", *args])
  try:
    return cli.main(argv)
  finally:
    cli.FLAGS.unparse_flags()


def test_restores_the_latest_checkpoint_with_ema(run_dir, predictor):
  predictor.load()
  assert predictor.step == 3
  fresh = experiment.Experiment(experiment.load_config(str(run_dir))).state
  # The checkpoint's raw params are the initial ones; its EMA is shifted: predict uses the EMA.
  for restored, init in zip(jax.tree.leaves(predictor.params), jax.tree.leaves(fresh.params)):
    np.testing.assert_allclose(np.asarray(restored), np.asarray(init) + EMA_OFFSET, atol=1e-6)


def test_cli_depth_on_mixed_folder(run_dir, predictor, inputs, tmp_path, capsys, monkeypatch):
  made = []

  def reuse_compiled(workdir, *, batch_size, steps):  # the module's predictor: one compilation
    made.append((workdir, batch_size, steps))
    return predictor

  monkeypatch.setattr(predict, "Predictor", reuse_compiled)
  out = tmp_path / "out"
  rc = _cli(f"--workdir={run_dir}", "--task=depth", f"--input={inputs}", f"--output={out}",
            "--batch_size=2")
  captured = capsys.readouterr()
  assert made == [(str(run_dir), 2, None)]
  assert rc == 0
  assert "corrupt.png" in captured.err
  assert "depth: 3 written, 1 failed" in captured.out
  max_mm = 8.0 * 1000  # the tiny synthetic entries encode depth up to 8 m
  for name, size in SIZES.items():
    stem = pathlib.Path(name).stem
    depth = Image.open(out / f"{stem}_depth.png")
    assert depth.size == size and depth.mode == "I;16"
    assert np.asarray(depth).max() <= max_mm
    preview = Image.open(out / f"{stem}_depth_color.png")
    assert preview.size == size and preview.mode == "RGB"
  assert not list(out.glob("corrupt*"))


def test_semantic_is_palette_png_with_task_colours(predictor, inputs, tmp_path):
  summary = predictor.run("semantic", predict.list_inputs(inputs), tmp_path, err=lambda s: None)
  assert summary.written == 3 and [p.name for p, _ in summary.failed] == ["corrupt.png"]
  task = tasks_lib.get("semantic", num_classes=7)
  for name, size in SIZES.items():
    img = Image.open(tmp_path / f"{pathlib.Path(name).stem}_semantic.png")
    assert img.mode == "P" and img.size == size
    labels = np.asarray(img)
    assert set(np.unique(labels)) <= set(range(7))
    palette = np.asarray(img.getpalette()[:3 * 7], np.uint8).reshape(7, 3)
    np.testing.assert_array_equal(
        palette, np.round((task.palette[1:] + 1) * 127.5).astype(np.uint8))
    overlay = Image.open(tmp_path / f"{pathlib.Path(name).stem}_semantic_overlay.png")
    assert overlay.mode == "RGB" and overlay.size == size


def test_instance_and_panoptic_outputs(predictor, inputs, tmp_path):
  files = [inputs / n for n in SIZES]
  assert predictor.run("instance", files, tmp_path).written == 3
  summary = predictor.run("panoptic", files, tmp_path)
  assert summary.written == 3 and not summary.failed
  for name, size in SIZES.items():
    stem = pathlib.Path(name).stem
    inst = Image.open(tmp_path / f"{stem}_instance.png")
    assert inst.mode == "I;16" and inst.size == size
    pan = np.asarray(Image.open(tmp_path / f"{stem}_panoptic.png").convert("RGB"), np.int64)
    assert pan.shape == (size[1], size[0], 3)
    ids = pan[..., 0] + 256 * pan[..., 1] + 256**2 * pan[..., 2]
    record = json.loads((tmp_path / f"{stem}_panoptic.json").read_text())
    assert record["file_name"] == f"{stem}_panoptic.png"
    assert (record["height"], record["width"]) == (size[1], size[0])
    seg_ids = {s["id"] for s in record["segments_info"]}
    assert set(np.unique(ids)) - {0} == seg_ids
    known = {c["id"] for c in record["categories"]}
    for s in record["segments_info"]:
      assert s["category_id"] in known
      assert s["area"] == int(np.sum(ids == s["id"])) > 0


def test_batches_pad_the_last_one(predictor, tmp_path):
  folder = tmp_path / "many"
  folder.mkdir()
  rng = np.random.default_rng(2)
  for i in range(5):
    Image.fromarray(rng.integers(0, 256, (24 + i, 33, 3), np.uint8)).save(folder / f"{i}.png")
  lines = []
  summary = predictor.run("depth", predict.list_inputs(folder), tmp_path / "out", log=lines.append)
  assert summary.written == 5 and not summary.failed
  assert [l.split(":")[0] for l in lines[:-1]] == ["batch 1", "batch 2", "batch 3"]
  assert "1 images" in lines[2]
  for i in range(5):
    assert Image.open(tmp_path / "out" / f"{i}_depth.png").size == (33, 24 + i)
  # A padded batch gives the real images the same answers as a full batch of copies.
  x = predict.fit_square(np.asarray(Image.open(folder / "0.png")), 32)[0][None]
  alone = predictor.predict_rgb(x, "depth")
  pair = predictor.predict_rgb(np.concatenate([x, x]), "depth")
  assert alone.shape == (1, 32, 32, 3) and pair.shape == (2, 32, 32, 3)
  np.testing.assert_allclose(alone[0], pair[0], atol=1e-5)


def test_unknown_task_names_the_trained_ones(run_dir, inputs, tmp_path):
  with pytest.raises(ValueError, match=r"'normals' was not trained.*depth, semantic, instance"):
    predict.run(str(run_dir), "normals", str(inputs), str(tmp_path))
  predictor = predict.Predictor(str(run_dir))
  predictor.check_task("panoptic")  # semantic + instance were trained
  with pytest.raises(ValueError, match=r"'bogus' was not trained.*trained tasks: depth, semantic, "
                     r"instance \(and panoptic\)"):
    predictor.check_task("bogus")


def test_nothing_readable_exits_non_zero(run_dir, tmp_path, capsys):
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "a.jpg").write_text("text")
  assert _cli(f"--workdir={run_dir}", "--task=depth", f"--input={bad}",
              f"--output={tmp_path / 'out'}") == 1
  assert "none of the 1 input files" in capsys.readouterr().err


def test_load_rgb_converts_modes(tmp_path):
  rng = np.random.default_rng(3)
  rgba = rng.integers(0, 256, (5, 7, 4), np.uint8)
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  np.testing.assert_array_equal(predict.load_rgb(tmp_path / "rgba.png"), rgba[..., :3])
  grey = rng.integers(0, 256, (5, 7), np.uint8)
  Image.fromarray(grey, "L").save(tmp_path / "grey.png")
  np.testing.assert_array_equal(predict.load_rgb(tmp_path / "grey.png"),
                                np.repeat(grey[..., None], 3, -1))
  pal = Image.fromarray(grey, "L").convert("P")
  pal.save(tmp_path / "pal.png")
  np.testing.assert_array_equal(predict.load_rgb(tmp_path / "pal.png"),
                                np.asarray(pal.convert("RGB")))
  deep = np.array([[0, 1000], [2000, 4000]], np.uint16)
  Image.fromarray(deep).save(tmp_path / "deep.png")
  np.testing.assert_array_equal(predict.load_rgb(tmp_path / "deep.png")[..., 0],
                                [[0, 64], [128, 255]])


def test_writers_encode_values(tmp_path):
  out = epath.Path(tmp_path)
  image = np.zeros((2, 3, 3), np.uint8)
  depth = np.array([[0.0, 1.2344, 8.0], [65.6, 0.5, 0.001]], np.float32)
  tasks_lib.get("depth").write(out, "d", image, depth)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "d_depth.png")),
                                [[0, 1234, 8000], [65535, 500, 1]])
  normals = np.array([[[0, 0, -1], [1, 0, 0], [0, -1, 0]]] * 2, np.float32)
  tasks_lib.get("normals").write(out, "n", image, normals)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "n_normals.png"))[0],
                                [[128, 128, 0], [255, 128, 128], [128, 0, 128]])
  shading = np.array([[0.0, 0.5, 1.0], [2.0, 0.25, 0.0]], np.float32)
  tasks_lib.get("shading").write(out, "s", image, shading)
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s_shading.png")),
                                [[0, 32768, 65535], [65535, 16384, 0]])
  ids = np.array([[0, 1, 256], [70000, 0, 3]])
  rgb = panoptic.id_rgb(ids).astype(np.int64)
  np.testing.assert_array_equal(rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2], ids)


def test_resize_map_nearest_keeps_labels_and_bilinear_is_smooth():
  labels = np.arange(16, dtype=np.int32).reshape(4, 4)
  up = tasks_lib.resize_map(labels, 8, 12, nearest=True)
  assert up.dtype == np.int32 and up.shape == (8, 12)
  np.testing.assert_array_equal(up[::2, ::3], labels)
  ramp = np.tile(np.linspace(0, 1, 4, dtype=np.float32), (4, 1))
  smooth = tasks_lib.resize_map(ramp, 4, 10, nearest=False)
  assert smooth.shape == (4, 10) and np.all(np.diff(smooth[0]) >= 0)
  assert 0.0 <= smooth.min() and smooth.max() <= 1.0
  assert len(np.unique(smooth[0])) > 4  # interpolated, not repeated


# --- the aspect ratio is kept: longer side to the model resolution, padded, cropped, resized back


def _structured(h: int, w: int) -> np.ndarray:
  """A 3:2 picture whose squashed and letterboxed versions differ: ramps and a checker."""
  yy, xx = np.mgrid[0:h, 0:w]
  r = 255.0 * xx / (w - 1)
  g = 255.0 * yy / (h - 1)
  b = 255.0 * (((yy // 5) + (xx // 5)) % 2)
  return np.stack([r, g, b], -1).astype(np.uint8)


def _torch_fit(image: np.ndarray, size: int):
  """Reference: torch's antialiased bilinear resize of the longer side to `size` (diffusers'
  rounding h * size // max, at least 1), then replicate padding of the bottom and right to a square."""
  torch = pytest.importorskip("torch")
  h, w = image.shape[:2]
  fh, fw = max(1, h * size // max(h, w)), max(1, w * size // max(h, w))
  x = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
  x = torch.nn.functional.interpolate(x, size=(fh, fw), mode="bilinear", antialias=True,
                                      align_corners=False)
  x = torch.nn.functional.pad(x, (0, size - fw, 0, size - fh), mode="replicate")
  return x[0].permute(1, 2, 0).numpy(), (fh, fw)


def _pil_resize(x: np.ndarray, h: int, w: int) -> np.ndarray:
  return np.asarray(Image.fromarray(x.astype(np.float32), "F").resize((w, h), Image.BILINEAR))


def _identity_depth_reference(image: np.ndarray, size: int, letterbox: bool = True):
  """The depth (metres) a model that paints its input answers, processed by hand: the tiny
  run's depth code is v = (channel mean + 1) / 2 over 0..8 m."""
  if letterbox:
    x, (fh, fw) = _torch_fit(image, size)
  else:
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    x = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                                        align_corners=False)[0].permute(1, 2, 0).numpy()
    fh = fw = size
  depth = (np.clip(x, -1, 1).mean(-1) + 1.0) * 0.5 * 8.0
  return _pil_resize(depth[:fh, :fw], *image.shape[:2])


def test_fit_square_is_torchs_resize_of_the_longer_side_and_replicate_padding():
  for h, w in ((40, 60), (60, 40), (7, 50), (32, 32), (20, 24), (1, 70)):
    image = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), np.uint8)
    got, content = predict.fit_square(image, 32)
    want, want_content = _torch_fit(image, 32)
    assert got.shape == (32, 32, 3) and content == want_content
    np.testing.assert_allclose(got, want, atol=2e-5)
  answer = {"ids": np.arange(32 * 32).reshape(32, 32), "x": (np.ones((32, 32, 3)),)}
  cropped = predict.crop_answer(answer, (21, 32))
  assert cropped["ids"].shape == (21, 32) and cropped["x"][0].shape == (21, 32, 3)


@pytest.fixture
def identity_model(predictor, monkeypatch):
  """The module's predictor with a model that answers with its input."""
  predictor.load()
  monkeypatch.setattr(predictor, "predict_rgb",
                      lambda images, task, batch_index=0: np.clip(images, -1.0, 1.0))
  return predictor


def test_predict_keeps_the_aspect_ratio(predictor, tmp_path):
  image = _structured(40, 60)  # 3:2
  Image.fromarray(image).save(tmp_path / "wide.png")
  Image.fromarray(image.transpose(1, 0, 2)).save(tmp_path / "tall.png")  # 2:3
  summary = predictor.run("depth", [tmp_path / "wide.png", tmp_path / "tall.png"],
                          tmp_path / "model")
  assert summary.written == 2
  assert Image.open(tmp_path / "model" / "wide_depth.png").size == (60, 40)
  assert Image.open(tmp_path / "model" / "tall_depth.png").size == (40, 60)


def test_predict_answers_the_letterboxed_image(identity_model, tmp_path):
  image = _structured(40, 60)
  Image.fromarray(image).save(tmp_path / "wide.png")
  assert identity_model.run("depth", [tmp_path / "wide.png"], tmp_path / "out").written == 1
  got_mm = np.asarray(Image.open(tmp_path / "out" / "wide_depth.png"), np.float64)
  want_m = _identity_depth_reference(image, 32)
  assert got_mm.shape == (40, 60)
  np.testing.assert_allclose(got_mm, np.round(want_m * 1000.0), atol=1.0)
  squashed_m = _identity_depth_reference(image, 32, letterbox=False)
  assert np.abs(squashed_m - want_m).max() > 0.2  # a squashed input would answer otherwise


def test_eval_protocol_on_a_workdir_keeps_the_aspect_ratio(run_dir, identity_model, tmp_path,
                                                           monkeypatch):
  """`main eval --workdir --protocol --dataset FOLDER`: the answer is scored at the ground
  truth's full resolution, from the letterboxed image: a ground truth equal to the hand-made
  letterboxed answer scores ~0 AbsRel."""
  image = _structured(40, 60)
  folder = tmp_path / "set"
  folder.mkdir()
  Image.fromarray(image).save(folder / "wide.png")
  np.save(folder / "wide_depth.npy", _identity_depth_reference(image, 32))
  (folder / "filename_list.txt").write_text("wide.png wide_depth.npy\n")
  monkeypatch.setattr(predict, "Predictor", lambda workdir, **kw: identity_model)
  out = tmp_path / "report"
  argv = cli.parse_flags(["main", "eval", f"--workdir={run_dir}", "--protocol=scannet",
                          f"--dataset={folder}", "--alignment=none", f"--output={out}"])
  try:
    assert cli.main(argv) == 0
  finally:
    cli.FLAGS.unparse_flags()
  summary = json.loads((out / "summary.json").read_text())
  assert summary["num_images"] == 1 and summary["options"] == {"alignment": None}
  assert summary["metrics"]["abs_rel"] < 1e-4 and summary["metrics"]["delta1"] == 1.0


def test_the_evaluator_answers_full_resolution_splits_and_scores_the_composite(
    predictor, tmp_path, monkeypatch):
  """The config's evaluation (train's and `main eval --workdir`) reads each split at full
  resolution, fits every image into the model's square and scores answers at the ground
  truth's size; panoptic is scored from the semantic and instance answers."""
  from dense_diffusion import evaluate  # pylint: disable=import-outside-toplevel
  from dense_diffusion.datasets import eval_tfds  # pylint: disable=import-outside-toplevel
  predictor.load()
  config = experiment.load_config(str(predictor.workdir))
  config.eval.max_examples = 3  # over two batches of 2: the last one padded
  shown = []
  real_examples = eval_tfds.examples

  def spy(entry, task, **kw):
    for ex in real_examples(entry, task, **kw):
      shown.append((entry["task"], ex.image.shape, ex.image.dtype))
      yield ex
  monkeypatch.setattr(eval_tfds, "examples", spy)
  evaluator = evaluate.Evaluator(config, predictor._setup, tmp_path)  # pylint: disable=protected-access
  state = predictor._setup.state.replace(ema=predictor.params)  # pylint: disable=protected-access
  with jax.set_mesh(predictor._setup.mesh):  # pylint: disable=protected-access
    results = evaluator.run(state, 3)
  assert set(results) == {"depth", "semantic", "instance", "panoptic"}
  assert all(results[t]["num_examples"] == 3 for t in ("depth", "semantic", "instance"))
  assert results["panoptic"]["num_examples"] == 3
  assert {s for _, s, _ in shown} == {(32, 32, 3)} and {d for *_, d in shown} == {np.dtype(np.uint8)}
  assert (tmp_path / "eval_metrics.json").exists()


def test_eval_protocol_defaults_to_the_runs_own_entry(run_dir, identity_model, tmp_path,
                                                      monkeypatch):
  monkeypatch.setattr(predict, "Predictor", lambda workdir, **kw: identity_model)
  argv = cli.parse_flags(["main", "eval", f"--workdir={run_dir}", "--protocol=scannet",
                          "--alignment=none", "--max_examples=3", f"--output={tmp_path}"])
  try:
    assert cli.main(argv) == 0
  finally:
    cli.FLAGS.unparse_flags()
  per_image = json.loads((tmp_path / "per_image.json").read_text())
  assert [r["name"] for r in per_image] == [f"synthetic_scenes/tiny32/{i}" for i in range(3)]
  assert (tmp_path / "worst.png").exists() and (tmp_path / "summary.md").exists()


def _copy_run(run_dir: pathlib.Path, dst: pathlib.Path, **config_changes) -> pathlib.Path:
  """A copy of the run's folder whose config.json has `config_changes` (dotted keys)."""
  import shutil  # pylint: disable=import-outside-toplevel
  shutil.copytree(run_dir, dst)
  config = experiment.load_config(str(dst))
  for key, value in config_changes.items():
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  experiment.save_config(config, dst)
  return dst


def test_main_eval_prepares_the_builtin_data_it_needs(run_dir, tmp_path, capsys):
  """`main eval --workdir RUN` with an empty data_dir: synthetic_scenes is prepared on the way
  (as `main train` does), then every task is scored."""
  empty = tmp_path / "empty_tfds"
  run = _copy_run(run_dir, tmp_path / "run", **{"input.data_dir": str(empty),
                                                "eval.max_examples": 2})
  argv = cli.parse_flags(["main", "eval", f"--workdir={run}"])
  try:
    assert cli.main(argv) == 0
  finally:
    cli.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert "preparing synthetic_scenes/tiny32" in out and "prepared synthetic_scenes" in out
  assert (empty / "synthetic_scenes" / "tiny32").is_dir()
  metrics = json.loads((run / "eval_metrics.json").read_text())
  assert set(metrics["3"]) >= set(TASKS) | {"panoptic"}
  assert all(metrics["3"][t]["num_examples"] == 2 for t in TASKS)


def test_main_eval_names_a_missing_real_dataset_in_one_line(run_dir, tmp_path, capsys):
  """A real dataset that is not prepared: one line naming it, the data_dir looked in and where
  the docs say how to prepare it; exit status 2, before the model is built."""
  empty = tmp_path / "empty_tfds"
  run = _copy_run(run_dir, tmp_path / "run", **{
      "input.data_dir": str(empty), "eval.entries": [readers.ade20k(resolution=32)]})
  argv = cli.parse_flags(["main", "eval", f"--workdir={run}"])
  try:
    assert cli.main(argv) == 2
  finally:
    cli.FLAGS.unparse_flags()
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert err.startswith("error: dataset ade20k is not prepared in ")
  assert str(empty) in err and "data/README.md" in err and "data/prepare.py" in err
  assert not (run / "eval_metrics.json").exists()
