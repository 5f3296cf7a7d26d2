"""The alpha_matte and dichotomous tasks and synthetic_scenes' foreground layer: encodings,
evaluators and their baselines, writers, the exact composite, and the training / evaluation
streams of synthetic_scenes for both tasks."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from dense_diffusion import input_pipeline as ip
from dense_diffusion import tasks
from dense_diffusion.datasets import readers
from dense_diffusion.datasets import synthetic_scenes
from dense_diffusion.datasets.synthetic_scenes import matte
from dense_diffusion.datasets.synthetic_scenes import renderer

RNG = np.random.default_rng(0)
SEEDS = [(0, 0, i) for i in range(6)]
RES = 40


@pytest.fixture(scope="module")
def scenes():
  return [renderer.render_scene(s, RES) for s in SEEDS]


# --- synthetic_scenes' foreground layer ------------------------------------------------------
def test_composite_is_the_matting_equation(scenes):
  """I = A F + (1 - A) B with B the scene's own image, up to the composite's 8-bit rounding."""
  for ex in scenes:
    a = ex["alpha"].astype(np.float64)[..., None]
    expected = 255 * (a * ex["foreground"] + (1 - a) * ex["image"] / 255)
    assert np.abs(ex["composite"] - expected).max() <= 0.5 + 1e-6
    assert ex["composite"].dtype == np.uint8 and ex["alpha"].dtype == np.float32


def test_alpha_is_soft_and_the_mask_is_its_half_level(scenes):
  for ex in scenes:
    alpha, mask = ex["alpha"], ex["mask"]
    assert alpha.min() == 0.0 and alpha.max() == 1.0  # background and an opaque body
    soft = (alpha > 0) & (alpha < 1)
    assert soft.sum() >= 0.3 * (alpha == 1).sum() ** 0.5  # at least an anti-aliased outline
    np.testing.assert_array_equal(mask, alpha >= matte.MASK_THRESHOLD)
    assert 0.02 < mask.mean() < 0.6


def test_supersampling_only_where_needed_loses_nothing():
  """The layer's alpha equals the mean opacity over every pixel's S x S points, computed here
  for every pixel (the renderer samples only pixels near an edge, fur or window rim)."""
  rng = np.random.default_rng(5)
  for _ in range(4):
    fg = matte.sample_foreground(rng)
    fg["window"] = True  # the rim too
    r = 48
    s = matte.SUPERSAMPLE
    points = (np.arange(r * s) + 0.5) / (r * s)
    y, x = np.meshgrid(points, points, indexing="ij")
    dense = matte.opacity(fg, x, y).reshape(r, s, r, s).mean(axis=(1, 3))
    np.testing.assert_allclose(matte.alpha_matte(fg, r), dense, atol=1e-6)


def test_fur_makes_wide_fuzzy_edges():
  """Fur spreads fractional alpha several pixels beyond the body; without it the soft pixels
  are a one-pixel anti-aliased outline."""
  fg = matte.sample_foreground(np.random.default_rng(1))
  fg.update(window=False, fur_span=2 * np.pi, fur_length=0.12)
  furry = matte.alpha_matte(fg, 64)
  bald = matte.alpha_matte({**fg, "fur_length": 0.0}, 64)
  soft = lambda a: int(np.sum((a > 0) & (a < 1)))
  assert soft(furry) > 3 * soft(bald)
  assert np.all(furry >= bald - 1e-6)  # fur only adds opacity outside the body


def test_layer_is_drawn_after_every_other_feature(monkeypatch, scenes):
  """The scene's other features come from the same draws as before the layer existed."""
  def no_layer(rng, background):
    del rng
    zeros = np.zeros(background.shape[:2], np.float32)
    return {"composite": background, "alpha": zeros, "mask": zeros > 0,
            "foreground": np.zeros(background.shape, np.float32)}
  monkeypatch.setattr(matte, "composite_layer", no_layer)
  for seed, ex in zip(SEEDS, scenes):
    plain = renderer.render_scene(seed, RES)
    for k in ("image", "depth", "semantic", "noisy", "rainy", "dark"):
      np.testing.assert_array_equal(plain[k], ex[k])


# --- alpha_matte -----------------------------------------------------------------------------
def test_alpha_matte_encoding_round_trip_and_inputs():
  task = tasks.get("alpha_matte")
  assert task.prompt == "Perform image matting" and task.label_key == "alpha"
  alpha = RNG.uniform(0, 1, (6, 7)).astype(np.float32)
  rgb = task.encode(alpha)
  assert rgb.shape == (6, 7, 3) and np.all(rgb[..., 0] == rgb[..., 2])
  np.testing.assert_allclose(task.decode(rgb), alpha, atol=1e-6)
  u8 = (alpha * 255).round().astype(np.uint8)
  np.testing.assert_allclose(task.decode(task.encode(u8)), u8 / 255, atol=1e-6)
  np.testing.assert_allclose(task.decode(np.stack([rgb, rgb])), np.stack([alpha, alpha]),
                             atol=1e-6)
  assert task.valid_mask(alpha).all() and task.valid_mask(alpha[..., None]).shape == (6, 7)
  holey = alpha.copy()
  holey[1, 2] = np.nan
  assert not task.valid_mask(holey)[1, 2] and np.all(np.isfinite(task.encode(holey)))
  with pytest.raises(ValueError, match="must be in \\[0, 1\\]"):
    task.encode(alpha * 255)
  with pytest.raises(ValueError, match="alpha matte"):
    task.encode(np.zeros((2, 3, 4)))


def test_alpha_matte_image_loss_is_l1_of_the_alpha():
  task = tasks.get("alpha_matte")
  target = task.encode(np.array([[0.0, 1.0], [0.5, 0.25]], np.float32))[None]
  pred = task.encode(np.array([[0.1, 0.7], [0.5, 0.25]], np.float32))[None]
  valid = np.ones((1, 2, 2, 1), bool)
  assert float(task.image_loss(pred, target, valid)[0]) == pytest.approx((0.1 + 0.3) / 4)
  valid[0, 0, 1] = False
  assert float(task.image_loss(pred, target, valid)[0]) == pytest.approx(0.1 / 3)


def test_matte_evaluator_and_its_median_baseline():
  task = tasks.get("alpha_matte")
  gt = np.zeros((10, 10), np.float32)
  gt[2:6, 3:7] = 1.0  # 16 opaque pixels
  gt[6, 3:7] = 0.6  # 4 translucent ones (153 / 255)
  ev = task.evaluator()
  u8 = (gt * 255).round().astype(np.uint8)  # read as / 255, like a dataset's PNG
  ev.update([u8 / np.float32(255)], [u8], [None])
  r = ev.result()
  assert r["sad"] == pytest.approx(0.0, abs=1e-9) and r["mse"] == pytest.approx(0.0, abs=1e-9)
  # Median alpha 0: all background, SAD = (16 + 4 * 0.6) / 1000, MSE = (16 + 4 * 0.36) / 100.
  assert r["baseline"]["sad"] == pytest.approx(0.0184, rel=1e-6)  # float32 alphas
  assert r["baseline"]["mse"] == pytest.approx(0.1744, rel=1e-6)
  assert task.headline == "sad" and not task.higher_is_better


def test_matte_writer(tmp_path):
  task = tasks.get("alpha_matte")
  image = RNG.integers(0, 256, (5, 6, 3), np.uint8)
  alpha = np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 6)
  paths = task.write(epath.Path(tmp_path), "x", image, alpha)
  assert [p.name for p in paths] == ["x_alpha.png", "x_cutout.png"]
  saved = np.asarray(Image.open(tmp_path / "x_alpha.png"))
  np.testing.assert_array_equal(saved, np.round(alpha * 255).astype(np.uint8))
  cutout = Image.open(tmp_path / "x_cutout.png")
  assert cutout.mode == "RGBA"
  np.testing.assert_array_equal(np.asarray(cutout)[..., :3], image)
  np.testing.assert_array_equal(np.asarray(cutout)[..., 3], saved)


# --- dichotomous -----------------------------------------------------------------------------
def test_dichotomous_encoding_and_mask_conventions():
  task = tasks.get("dichotomous")
  assert task.prompt == "Perform dichotomous image segmentation" and task.label_key == "mask"
  mask = RNG.uniform(size=(5, 8)) > 0.6
  rgb = task.encode(mask)
  assert set(np.unique(rgb)) <= {-1.0, 1.0}
  np.testing.assert_array_equal(task.decode(rgb), mask.astype(np.float32))
  # DIS5K's PNGs: foreground above 128; floats above 0.5.
  np.testing.assert_array_equal(task.encode(np.where(mask, 200, 128).astype(np.uint8)), rgb)
  np.testing.assert_array_equal(task.encode(mask * 0.9), rgb)
  with pytest.raises(ValueError, match="bool, uint8 or float"):
    task.encode(mask.astype(np.int32))


def test_dichotomous_evaluator_and_its_majority_baseline():
  task = tasks.get("dichotomous")
  gt = np.zeros((20, 20), bool)
  gt[5:10, 4:12] = True  # 40 of 400 pixels
  ev = task.evaluator()
  ev.update([gt.astype(np.float32)], [gt], [None])
  r = ev.result()
  assert r["max_f"] == pytest.approx(1.0) and r["mae"] == 0.0
  # All background: its best threshold is 0 (everything foreground), precision 0.1, recall 1.
  assert r["baseline"]["max_f"] == pytest.approx(1.3 * 0.1 / (0.3 * 0.1 + 1))
  assert r["baseline"]["mae"] == pytest.approx(0.1)
  assert task.headline == "max_f" and task.higher_is_better


def test_dichotomous_writer(tmp_path):
  task = tasks.get("dichotomous")
  soft = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
  (path,) = task.write(epath.Path(tmp_path), "y", np.zeros((3, 4, 3), np.uint8), soft)
  assert path.name == "y_mask.png"
  np.testing.assert_array_equal(np.asarray(Image.open(path)), np.round(soft * 255))


# --- both through synthetic_scenes' streams --------------------------------------------------
CONFIG = synthetic_scenes.SyntheticScenesConfig(
    name="matting_test", resolution=32, num_train=8, num_validation=4, seed=7)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("tfds")
  tfds.builder("synthetic_scenes", config=CONFIG, data_dir=str(path)).download_and_prepare()
  return str(path)


def test_synthetic_streams_of_both_tasks(data_dir):
  names = ["alpha_matte", "dichotomous"]
  refs = {f"validation_{i:06d}": renderer.render_scene((7, 1, i), 32) for i in range(4)}
  for index, name in enumerate(names):
    entry = readers.synthetic_scenes(name, config="matting_test", flip=False)
    train = next(iter(tfds.as_numpy(ip.get_train_dataset(
        [entry], names, 4, data_dir=data_dir, process_index=0, process_count=1,
        shuffle_buffer=8))))
    assert train["image"].shape == (4, 32, 32, 3) and np.all(train["task"] == index)
    assert train["valid"].all()
    ds, _ = ip.get_eval_dataset(entry, names, 4, data_dir=data_dir, process_index=0,
                                process_count=1)
    batch = next(iter(tfds.as_numpy(ds)))
    key = tasks.get(name).label_key
    for row in range(4):
      # Which scene: the input is its composite (not the plain render).
      ref = next(r for r in refs.values()
                 if np.allclose(batch["image"][row], r["composite"] / 127.5 - 1, atol=1e-5))
      np.testing.assert_array_equal(batch[f"label/{key}"][row], ref[key])
      np.testing.assert_allclose(batch["target"][row], tasks.get(name).encode(ref[key]))
