"""The `referring` task (tasks/referring.py): encoding, the per-example prompt, the evaluator with
its whole-image baseline (numbers worked out by hand) and the prediction files."""
from etils import epath
import numpy as np
import pytest
from PIL import Image

from dense_diffusion import tasks

RNG = np.random.default_rng(0)


def test_encoding_round_trip_and_mask_conventions():
  task = tasks.get("referring")
  assert task.label_key == "mask" and task.headline == "oiou" and task.higher_is_better
  mask = RNG.uniform(size=(6, 9)) > 0.6
  rgb = task.encode(mask)
  assert rgb.shape == (6, 9, 3) and set(np.unique(rgb)) <= {-1.0, 1.0}
  np.testing.assert_array_equal(task.decode(rgb), mask.astype(np.float32))
  np.testing.assert_array_equal(task.decode(rgb[None])[0], mask.astype(np.float32))
  # The builder's 0 / 255 PNG masks and float masks read alike.
  np.testing.assert_array_equal(task.encode(np.where(mask, 255, 0).astype(np.uint8)), rgb)
  np.testing.assert_array_equal(task.encode(mask * 0.9), rgb)
  assert task.valid_mask(mask).all()
  with pytest.raises(ValueError, match="bool, uint8 or float"):
    task.encode(mask.astype(np.int32))


def test_prompt_is_the_example_expression_with_a_generic_fallback():
  task = tasks.get("referring")
  assert task.prompt == "Perform referring segmentation" and task.prompt_key == "prompt"
  assert task.example_prompt({"prompt": b"the man on the left"}) == "the man on the left"
  assert task.example_prompt({"prompt": np.array("red box")}) == "red box"
  assert task.example_prompt({"image": np.zeros((2, 2, 3))}) == task.prompt


def test_evaluator_and_its_whole_image_baseline():
  task = tasks.get("referring")
  gt1 = np.zeros((10, 10), bool)
  gt1[0:5, 0:4] = True  # 20 of 100 pixels
  gt2 = np.zeros((10, 10), np.uint8)
  gt2[2:7, 2:7] = 255  # 25 pixels, the builder's u8 convention
  pred1 = gt1.astype(np.float32) * 0.9  # exact after thresholding
  pred2 = np.zeros((10, 10), np.float32)
  pred2[2:7, 2:4] = 0.7  # 10 of the 25 pixels, nothing outside
  ev = task.evaluator()
  ev.update([pred1], [gt1], [None])
  ev.update([pred2], [gt2], [None])
  r = ev.result()
  assert r["oiou"] == pytest.approx(30 / 45)
  assert r["miou"] == pytest.approx((1 + 0.4) / 2)
  assert r["prec_0.5"] == 0.5 and r["prec_0.9"] == 0.5
  # The whole image: intersections 20 + 25 over unions 100 + 100.
  assert r["baseline"]["oiou"] == pytest.approx(45 / 200)
  assert r["baseline"]["miou"] == pytest.approx((0.2 + 0.25) / 2)
  assert r["baseline"]["prec_0.5"] == 0.0


def test_writer(tmp_path):
  task = tasks.get("referring")
  soft = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
  image = np.full((3, 4, 3), 100, np.uint8)
  mask_path, overlay_path = task.write(epath.Path(tmp_path), "x", image, soft)
  assert mask_path.name == "x_mask.png" and overlay_path.name == "x_overlay.png"
  np.testing.assert_array_equal(np.asarray(Image.open(mask_path)), 255 * (soft > 0.5))
  overlay = np.asarray(Image.open(overlay_path))
  np.testing.assert_array_equal(overlay[soft <= 0.5], image[soft <= 0.5])
  assert (overlay[soft > 0.5] != image[soft > 0.5]).any(axis=-1).all()
