"""A small AutoencoderKL trained on synthetic_scenes: its images and the tasks' RGB encodings.

    python -m dense_diffusion.main train-vae --config configs/synthetic_vae.py --workdir runs/vae

Writes `<workdir>/config.json` (diffusers AutoencoderKL keys) and `<workdir>/params` (orbax),
the folder layout `main convert` writes, so every `model.vae.pretrained` key reads it, and
`<workdir>/ceiling.json`: each task's round-trip ceiling through it (studies/ceiling.py), with
the identity's (pixel space) beside it. The training is `experiment/vae_cache.fit` (L1
reconstruction of a posterior sample plus a small KL term, AdamW), the one a synthetic latent
config runs on first use when it names the recipe (`model.vae.recipe`) instead of a folder.
"""
from __future__ import annotations

import json
import os
from typing import Any

from dense_diffusion.experiment import vae_cache

CEILING_FILE = "ceiling.json"
CONFIG_FILE = "config.json"


def vae_config(config: Any) -> dict:
  """The diffusers AutoencoderKL config written beside the parameters."""
  return vae_cache.vae_config(config)


def train(config: Any, workdir: str, out=print) -> dict:
  """Trains the VAE of `config` (configs/synthetic_vae.py), saves it, measures its ceiling."""
  from dense_diffusion.datasets import prepare  # pylint: disable=g-import-not-at-top
  from dense_diffusion.studies import ceiling  # pylint: disable=g-import-not-at-top

  if os.path.isfile(os.path.join(workdir, CEILING_FILE)):
    out(f"{workdir} holds a trained VAE and its ceiling already")
    return json.loads(open(os.path.join(workdir, CEILING_FILE), encoding="utf-8").read())
  entries = [dict(e) for e in config.entries]
  data_dir = config.get("data_dir")
  prepare.ensure_prepared(entries, data_dir)
  vae = vae_cache.fit(config, workdir, out=out)
  out(f"wrote the VAE to {workdir} (config.json + params, as `main convert` writes)")
  result = ceiling.measure(
      entries, {"pixels": ceiling.identity, "vae": ceiling.vae_round_trip(vae)},
      data_dir=data_dir, max_examples=int(config.ceiling_examples))
  with open(os.path.join(workdir, CEILING_FILE), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2, sort_keys=True, default=float)
  out(format_ceiling(result))
  return result


def format_ceiling(result: dict) -> str:
  """task, headline metric: the identity's round trip, the VAE's, the trivial baseline."""
  lines = [f"  {'task':<10} {'metric':<9} {'pixels':>9} {'vae':>9} {'baseline':>9}"]
  for task, values in result["vae"].items():
    key = values["headline"]
    lines.append(f"  {task:<10} {key:<9} {result['pixels'][task][key]:>9.4f} "
                 f"{values[key]:>9.4f} {values['baseline'][key]:>9.4f}")
  return "round-trip ceiling (ground truth encoded, through the autoencoder, decoded):\n" + (
      "\n".join(lines))


def load(path: str):
  """The trained VAE at `path` (what `model.vae.pretrained=path` reads)."""
  from dense_diffusion.convert import vae as vae_convert  # pylint: disable=g-import-not-at-top
  return vae_convert.load_diffusers_vae(path)
