"""The round-trip ceiling (studies/ceiling.py) and the synthetic VAE (main train-vae).

An identity autoencoder gives each task its ground truth back, which scores perfectly (values
written out here, not computed by the code under test); a VAE trained a few steps on tiny32
has a ceiling for every task, is saved in the folder layout `model.vae.pretrained` reads, and
reads back with the same round trip.
"""
import json

import numpy as np
import pytest

from configs import synthetic_vae
from dense_diffusion.datasets import readers
from dense_diffusion.studies import ceiling
from dense_diffusion.studies import vae_training

TASKS = readers.SYNTHETIC_TASKS  # every task synthetic_scenes renders.
# A perfect answer's headline metric per task: (value, absolute tolerance), or a lower bound for
# PSNR (an exact answer's PSNR is only bounded by float round-off).
PERFECT = {"depth": ("abs_rel", 0.0, 1e-6), "normals": ("mean", 0.0, 1e-3),
           "semantic": ("miou", 1.0, 1e-9), "shading": ("rmse", 0.0, 1e-6)}
EXACT_PSNR = ("albedo", "denoise", "derain", "lowlight")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_data_dir):
  base = tmp_path_factory.mktemp("vae")
  config = synthetic_vae.get_config("steps=4")
  config.entries = readers.synthetic_mixture(TASKS, config="tiny32")
  config.data_dir = synthetic_data_dir
  config.batch_size = 4
  config.log_every = 2
  config.ceiling_examples = 8
  lines = []
  result = vae_training.train(config, str(base / "vae"), out=lines.append)
  return base, config, result, lines


def test_identity_scores_the_ground_truth_exactly(trained):
  _, _, result, _ = trained
  pixels = result["pixels"]
  assert set(pixels) == set(TASKS)
  for task, (metric, value, tol) in PERFECT.items():
    assert pixels[task][metric] == pytest.approx(value, abs=tol), task
  for task in EXACT_PSNR:
    assert pixels[task]["psnr"] > 100.0, task
  # Instances come back through their encoding (centre offsets, grouped again by the task's
  # decoder) nearly but not exactly: PQ 0.98 on tiny32's validation scenes.
  assert 0.95 < pixels["instance"]["pq"] <= 1.0


def test_the_trained_vae_has_a_ceiling_for_every_task(trained):
  base, config, result, lines = trained
  assert set(result["vae"]) == set(TASKS)
  for task, values in result["vae"].items():
    assert values["num_examples"] == 8
    assert np.isfinite(values[values["headline"]]), task
  assert any(line.startswith("vae step 4/4") for line in lines)
  assert json.loads((base / "vae" / vae_training.CEILING_FILE).read_text()) == json.loads(
      json.dumps(result, default=float))
  # The folder reads back as a diffusers-config AutoencoderKL; its round trip is the same.
  vae = vae_training.load(str(base / "vae"))
  again = ceiling.measure(config.entries[:1], {"vae": ceiling.vae_round_trip(vae)},
                          data_dir=config.data_dir, max_examples=8)["vae"]
  assert again["depth"]["abs_rel"] == pytest.approx(result["vae"]["depth"]["abs_rel"], rel=1e-4)
