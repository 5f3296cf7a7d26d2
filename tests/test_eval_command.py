"""`main eval --protocol`: a real photograph with real ground truth (scikit-image's Middlebury
motorcycle and its disparity) in the layout of Marigold's evaluation sets, scored through the
command with disparity alignment, checked against the alignment and metrics written out here;
the report files; an oracle and the protocols' settings through `evaluate_protocol`; one-line
mistakes."""
import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from dense_diffusion import errors
from dense_diffusion import main as cli
from dense_diffusion import metrics
from dense_diffusion import protocol_eval
from dense_diffusion import tasks as tasks_lib
from dense_diffusion.datasets import eval_folder
from dense_diffusion.datasets import eval_tfds

skimage_data = pytest.importorskip("skimage.data")

# Calibration of scikit-image's quarter-resolution copy (skimage.data.stereo_motorcycle's doc).
FOCAL_PX, BASELINE_M, DOFFS_PX = 994.978, 0.193001, 31.086


def _cli(*args: str) -> int:
  argv = cli.parse_flags(["main", "eval", *args])
  try:
    return cli.main(argv)
  finally:
    cli.FLAGS.unparse_flags()


@pytest.fixture(scope="module")
def motorcycle(tmp_path_factory) -> pathlib.Path:
  """A Marigold-layout folder: the left view, its depth in metres (from the disparity; no
  ground truth = 0) and the filename list."""
  left, _, disp = skimage_data.stereo_motorcycle()
  depth = np.where(np.isfinite(disp), FOCAL_PX * BASELINE_M / (disp + DOFFS_PX), 0.0)
  root = tmp_path_factory.mktemp("middlebury")
  (root / "rgb").mkdir()
  (root / "depth").mkdir()
  Image.fromarray(left).save(root / "rgb" / "motorcycle.png")
  np.save(root / "depth" / "motorcycle.npy", depth.astype(np.float32))
  (root / "filename_list.txt").write_text("# rgb depth\nrgb/motorcycle.png depth/motorcycle.npy\n")
  return root


@pytest.fixture(scope="module")
def depth_pipeline(tmp_path_factory) -> pathlib.Path:
  """A tiny random Marigold depth pipeline saved by diffusers (processing resolution 48)."""
  pytest.importorskip("diffusers")
  from test_marigold_pipelines import _build  # pylint: disable=import-outside-toplevel
  from test_text_encoder import _write_tiny_vocab  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("marigold")
  _write_tiny_vocab(root / "tokenizer", "<|endoftext|>")
  _build("depth", root / "tokenizer", root / "depth")
  return root / "depth"


def _disparity_reference(pred, gt, lo, hi):
  """Marigold's `least_square_disparity` + metrics, written out: fit s * pred + t to 1 / gt by
  lstsq over valid pixels with positive prediction, clip at 1e-3, invert, clamp, score."""
  valid = (gt > lo) & (gt < hi)
  fit = valid & (pred > 0)
  a = np.stack([pred[fit], np.ones(fit.sum())], axis=1).astype(np.float64)
  (s, t), *_ = np.linalg.lstsq(a, 1.0 / gt[fit].astype(np.float64), rcond=None)
  depth = 1.0 / np.maximum(s * pred.astype(np.float64) + t, 1e-3)
  depth = np.clip(depth, lo, hi)
  p, g = depth[valid], gt[valid].astype(np.float64)
  return {"abs_rel": float(np.mean(np.abs(p - g) / g)),
          "rmse": float(np.sqrt(np.mean((p - g) ** 2))),
          "delta1": float(np.mean(np.maximum(p / g, g / p) < 1.25))}


def test_motorcycle_through_the_command_with_disparity_alignment(motorcycle, depth_pipeline,
                                                                 tmp_path):
  out = tmp_path / "report"
  assert _cli(f"--pretrained={depth_pipeline}", f"--dataset={motorcycle}", "--protocol=scannet",
              "--alignment=scale_shift_disparity", "--steps=1", f"--output={out}") == 0
  summary = json.loads((out / "summary.json").read_text())
  per_image = json.loads((out / "per_image.json").read_text())
  assert summary["protocol"] == "scannet" and summary["num_images"] == 1
  assert summary["options"] == {"alignment": "scale_shift_disparity"}
  assert [r["name"] for r in per_image] == ["rgb/motorcycle.png"]

  # The same pipeline on the full photograph (500 x 741), the command's noise key.
  from dense_diffusion.pipelines import MarigoldDepthPipeline  # pylint: disable=g-import-not-at-top
  left = np.asarray(Image.open(motorcycle / "rgb" / "motorcycle.png").convert("RGB"))
  pred = MarigoldDepthPipeline.from_pretrained(depth_pipeline)(
      left, num_inference_steps=1, key=jax.random.fold_in(jax.random.key(0), 0)).prediction
  assert pred.shape == (1, 500, 741, 1)
  gt = np.load(motorcycle / "depth" / "motorcycle.npy")
  want = _disparity_reference(pred[0, ..., 0], gt, 1e-3, 10.0)
  for key, value in want.items():
    assert per_image[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert summary["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
  table = (out / "summary.md").read_text()
  assert "| protocol | dataset | model | images | abs_rel |" in table
  assert f"{want['abs_rel']:.4f}" in table
  worst = Image.open(out / "worst.png")
  assert worst.size[0] > 100 and worst.size[1] > 100


class _Oracle:
  """Answers with a function of the ground truth of the image it is shown (looked up by size)."""

  def __init__(self, answers):
    self.answers = answers

  def answer(self, images, task):
    del task
    return [self.answers[img.shape[:2]] for img in images]


def test_an_oracle_disparity_scores_perfectly_only_with_disparity_alignment(motorcycle,
                                                                            tmp_path):
  examples = list(eval_folder.examples(motorcycle, "depth"))
  gt = examples[0].truth
  disparity = np.where(gt > 0, 1.0 / np.maximum(gt, 1e-6), 0.0).astype(np.float32)
  task = tasks_lib.get("depth", affine_invariant=True)
  oracle = _Oracle({gt.shape: disparity})
  proto = metrics.protocol("scannet")
  logs = []
  good = protocol_eval.evaluate_protocol(oracle, task, proto, examples, tmp_path / "a",
                                    options={"alignment": "scale_shift_disparity"},
                                    log=logs.append)
  assert good["metrics"]["abs_rel"] < 1e-5 and good["metrics"]["delta1"] == 1.0
  # Aligned as depth (the protocol's default), a disparity map is far off: the reference fit.
  bad = protocol_eval.evaluate_protocol(oracle, task, proto, examples, tmp_path / "b",
                                   log=logs.append)
  valid = (gt > 1e-3) & (gt < 10.0)
  a = np.stack([disparity[valid], np.ones(valid.sum())], 1).astype(np.float64)
  (s, t), *_ = np.linalg.lstsq(a, gt[valid].astype(np.float64), rcond=None)
  aligned = np.clip(s * disparity[valid] + t, 1e-3, 10.0)
  want = np.mean(np.abs(aligned - gt[valid]) / gt[valid])
  assert bad["metrics"]["abs_rel"] == pytest.approx(want, rel=1e-4)
  assert bad["metrics"]["abs_rel"] > 0.01
  assert any("| scannet |" in line for line in logs)


def test_folder_reader_reads_pngs_masks_and_refuses_mismatches(tmp_path):
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (6, 9, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / "a.jpg.png")
  mm = rng.integers(1, 20000, (6, 9)).astype(np.uint16)
  mm[0, 0] = 0
  Image.fromarray(mm).save(tmp_path / "a_depth.png")
  mask = rng.random((6, 9)) > 0.5
  np.save(tmp_path / "a_depth_mask.npy", mask)
  normals = rng.integers(0, 256, (6, 9, 3), np.uint8)
  Image.fromarray(normals).save(tmp_path / "a_normals.png")
  (tmp_path / "depth.txt").write_text("a.jpg.png a_depth.png a_depth_mask.npy\n")
  (tmp_path / "normals.txt").write_text("a.jpg.png a_normals.png a_filled.png\n")
  (ex,) = eval_folder.examples(tmp_path, "depth", filename_list=str(tmp_path / "depth.txt"))
  np.testing.assert_array_equal(ex.image, rgb)
  np.testing.assert_allclose(ex.truth, mm / 1000.0, rtol=1e-6)
  np.testing.assert_array_equal(ex.mask, mask)
  (ex,) = eval_folder.examples(tmp_path, "depth", filename_list=str(tmp_path / "depth.txt"),
                               depth_scale=256.0)
  np.testing.assert_allclose(ex.truth, mm / 256.0, rtol=1e-6)
  (ex,) = eval_folder.examples(tmp_path, "normals", filename_list=str(tmp_path / "normals.txt"))
  np.testing.assert_allclose(ex.truth, normals / 127.5 - 1.0, atol=1e-6)
  assert ex.mask is None  # a third column without "mask" in its name is not a mask
  with pytest.raises(errors.MissingError, match="several .txt filename lists"):
    list(eval_folder.examples(tmp_path, "depth"))
  Image.fromarray(mm[:5]).save(tmp_path / "a_depth.png")
  with pytest.raises(errors.ConfigError, match="its answer is 9x5, the image 9x6"):
    list(eval_folder.examples(tmp_path, "depth", filename_list=str(tmp_path / "depth.txt")))


def test_full_resolution_pp_drops_only_the_resize_and_value_range():
  pp = ('depth_range(0.001, 10.0)|copy("depth", "label/depth")|eigen_mask("label/depth")|'
        'resize(128, key="image", method="area")|resize(128, key="depth", method="nearest")|'
        'value_range(-1, 1)')
  assert eval_tfds.full_resolution_pp(pp) == (
      'depth_range(0.001, 10.0)|copy("depth", "label/depth")|eigen_mask("label/depth")')
  entries = eval_tfds.reader_entries("coco_panoptic", "panoptic")
  assert eval_tfds.pick_entry(entries, "panoptic", "coco")["task"] == "semantic_coco"
  assert eval_tfds.reader_entries("coco/2017_panoptic", "panoptic") == entries
  with pytest.raises(errors.UnknownNameError, match="neither a folder nor a dataset reader"):
    eval_tfds.reader_entries("no_such_data", "depth")
  assert eval_tfds.reader_entries("synthetic_scenes/tiny32", "depth")[0]["dataset"] == (
      "synthetic_scenes/tiny32")


def test_every_protocol_names_its_task_and_headline():
  want = {"nyu_eigen": "depth", "kitti_garg": "depth", "eth3d": "depth", "scannet": "depth",
          "diode": "depth", "ade20k": "semantic_ade20k", "coco_panoptic": "panoptic",
          "rain100": "derain", "sidd": "denoise", "lol": "lowlight"}
  for name, task in want.items():
    proto = metrics.protocol(name)
    assert proto.task == task and proto.headline and proto.source
  rain = metrics.protocol("rain100").scorer()
  rng = np.random.default_rng(0)
  clean = rng.integers(0, 256, (16, 16, 3), np.uint8)
  pred = np.clip(clean / 255.0 + rng.normal(0, 0.05, clean.shape), 0, 1).astype(np.float32)
  got = rain.add(pred, clean)
  # The deraining script's Y PSNR, written out: 8-bit image, integer BT.601 luma, peak 255.
  def y(x):
    return np.round(16 + (65.481 * x[..., 0] + 128.553 * x[..., 1] + 24.966 * x[..., 2]) / 255)
  p8 = np.rint(pred * 255).astype(np.float64)
  mse = np.mean((y(p8) - y(clean.astype(np.float64))) ** 2)
  assert got["psnr"] == pytest.approx(10 * np.log10(255**2 / mse), abs=1e-6)


@pytest.mark.parametrize("args,message", [
    (("--protocol=nyu_eigen",), "either --workdir"),
    (("--protocol=bogus", "--workdir=x"), "unknown evaluation protocol 'bogus'"),
    (("--dataset=x", "--workdir=x"), "--dataset needs --protocol"),
])
def test_mistakes_are_one_line(args, message, capsys):
  assert _cli(*args) == errors.EXIT_USER_ERROR
  err = capsys.readouterr().err
  assert message in err and err.count("\n") == 1


def test_pretrained_with_an_unknown_setting_is_one_line(depth_pipeline, motorcycle, tmp_path,
                                                        capsys):
  assert _cli(f"--pretrained={depth_pipeline}", f"--dataset={motorcycle}", "--protocol=ade20k",
              f"--output={tmp_path}") == errors.EXIT_USER_ERROR
  assert "answers depth, not 'semantic_ade20k'" in capsys.readouterr().err
  assert _cli(f"--pretrained={depth_pipeline}", f"--dataset={motorcycle}", "--protocol=eth3d",
              "--alignment=bogus", f"--output={tmp_path}") == errors.EXIT_USER_ERROR
  assert "protocol 'eth3d'" in capsys.readouterr().err


def test_normals_and_ade20k_scorers_reduce_as_their_papers():
  rng = np.random.default_rng(1)
  truths = [rng.normal(size=(6, 7, 3)), rng.normal(size=(5, 9, 3))]
  truths = [t / np.linalg.norm(t, axis=-1, keepdims=True) for t in truths]
  truths[1][0] = 0.0  # unknown normals
  preds = [t + rng.normal(0, 0.3, t.shape) for t in truths]

  def angles(p, g):  # degrees over the known pixels, written out
    known = np.linalg.norm(g, axis=-1) > 0
    p, g = p[known], g[known]
    cos = np.sum(p * g, -1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(g, axis=-1)
    return np.degrees(np.arccos(np.clip(cos, -1, 1)))
  errs = [angles(p, g) for p, g in zip(preds, truths)]
  image, pixel = (metrics.protocol(n).scorer() for n in ("normals_image", "normals_pixel"))
  for p, g, e in zip(preds, truths, errs):
    assert image.add(p, g)["mean"] == pytest.approx(e.mean(), abs=1e-4)
    pixel.add(p, g)
  assert image.summary()["mean"] == pytest.approx(np.mean([e.mean() for e in errs]), abs=1e-4)
  assert image.summary()["median"] == pytest.approx(np.mean([np.median(e) for e in errs]),
                                                    abs=1e-4)
  pooled = np.concatenate(errs)
  assert pixel.summary()["mean"] == pytest.approx(pooled.mean(), abs=1e-4)
  assert pixel.summary()["a11.25"] == pytest.approx(np.mean(pooled < 11.25), abs=1e-9)

  # ADE20K: mmseg's intersections and unions summed over the split, mIoU over present classes.
  gts = [rng.integers(0, 150, (8, 8)), rng.integers(0, 150, (8, 8))]
  gts[0][:2] = 255
  preds = [np.where(rng.random(g.shape) < 0.6, g, rng.integers(0, 150, g.shape)) for g in gts]
  preds = [np.where(p == 255, 0, p) for p in preds]
  inter, union, area = np.zeros(150), np.zeros(150), np.zeros(150)
  for p, g in zip(preds, gts):
    keep = g != 255
    p, g = p[keep], g[keep]
    i = np.bincount(g[p == g], minlength=150)
    a_p, a_g = np.bincount(p, minlength=150), np.bincount(g, minlength=150)
    inter, union, area = inter + i, union + a_p + a_g - i, area + a_g
  with np.errstate(invalid="ignore"):
    miou = np.nanmean(inter / union)
  seg = metrics.protocol("ade20k").scorer(tasks_lib.get("semantic", num_classes=150))
  for p, g in zip(preds, gts):
    seg.add(p, g)
  assert seg.summary()["miou"] == pytest.approx(miou, abs=1e-12)
  assert seg.summary()["pixel_accuracy"] == pytest.approx(inter.sum() / area.sum(), abs=1e-12)
  with pytest.raises(errors.ConfigError, match="ADE20K has 150 classes"):
    metrics.protocol("ade20k").scorer(tasks_lib.get("semantic", num_classes=7))


def test_a_folder_without_a_list_stops_before_the_model_is_built(tmp_path, capsys, monkeypatch):
  from dense_diffusion import predict  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(predict, "Predictor", lambda workdir, **kw: _FakeRun())
  (tmp_path / "data").mkdir()
  assert _cli("--workdir=run", "--protocol=nyu_eigen", f"--dataset={tmp_path / 'data'}",
              f"--output={tmp_path / 'out'}") == errors.EXIT_USER_ERROR
  assert "no .txt filename list" in capsys.readouterr().err


class _FakeRun:
  """A trained run's stand-in that answers depth and must not be built."""
  config = ml_collections.ConfigDict({"input": {"data_dir": None, "entries": []},
                                      "eval": {"entries": []}})

  def check_task(self, task):
    return tasks_lib.get(task)

  def load(self):
    raise AssertionError("the model was built")
