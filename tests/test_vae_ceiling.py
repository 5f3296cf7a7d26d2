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

TASKS = ("depth", "normals", "semantic", "denoise")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  base = tmp_path_factory.mktemp("vae")
  config = synthetic_vae.get_config("steps=6")
  config.entries = readers.synthetic_mixture(TASKS, config="tiny32")
  config.data_dir = str(base / "tfds")
  config.batch_size = 4
  config.log_every = 3
  config.ceiling_examples = 8
  lines = []
  result = vae_training.train(config, str(base / "vae"), out=lines.append)
  return base, config, result, lines


def test_identity_scores_the_ground_truth_exactly(trained):
  _, config, result, _ = trained
  pixels = result["pixels"]
  assert pixels["depth"]["abs_rel"] == pytest.approx(0.0, abs=1e-6)
  assert pixels["depth"]["delta1"] == pytest.approx(1.0)
  assert pixels["normals"]["mean"] == pytest.approx(0.0, abs=0.5)  # degrees; u8 rounding only.
  assert pixels["semantic"]["miou"] == pytest.approx(1.0)
  assert pixels["denoise"]["psnr"] > 60.0  # float round-off of an exact answer.


def test_the_trained_vae_has_a_ceiling_for_every_task(trained):
  base, config, result, lines = trained
  assert set(result["vae"]) == set(TASKS)
  for task, values in result["vae"].items():
    assert values["num_examples"] == 8
    assert np.isfinite(values[values["headline"]]), task
  assert any(line.startswith("vae step 6/6") for line in lines)
  assert json.loads((base / "vae" / vae_training.CEILING_FILE).read_text()) == json.loads(
      json.dumps(result, default=float))
  # The folder reads back as a diffusers-config AutoencoderKL; its round trip is the same.
  vae = vae_training.load(str(base / "vae"))
  again = ceiling.measure(config.entries[:1], ceiling.vae_round_trip(vae),
                          data_dir=config.data_dir, max_examples=8)
  assert again["depth"]["abs_rel"] == pytest.approx(result["vae"]["depth"]["abs_rel"], rel=1e-4)
