"""Studies: named comparisons of settings (paradigms, spaces, conditionings, sampler steps) run
at a fixed budget through the normal train / evaluation code, reported as one table.

    python -m dense_diffusion.main study --study paradigms --workdir runs/studies [--steps 400]
        [--scale accelerator]

Modules: `spec` (study files: a sweep file whose points are the arms), `runner` (each arm
trained and evaluated in its own workdir, resumable), `report` (study.md, study.csv, the bars
and the prediction grid), `ceiling` (a task's ground truth through a space and back, scored),
`vae_training` (a small AutoencoderKL for synthetic_scenes). docs/studies.md has the studies.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from dense_diffusion.studies import spec as spec_lib

__all__ = ["run"]


def _ceilings(study: spec_lib.Study, out: Callable[[str], None]) -> dict:
  """The round-trip ceiling of each space the arms work in (identity for pixels, the VAE for
  latents), on the first arm's evaluation entries."""
  from dense_diffusion.experiment import model as model_lib  # pylint: disable=g-import-not-at-top
  from dense_diffusion.studies import ceiling  # pylint: disable=g-import-not-at-top
  from dense_diffusion.studies import runner  # pylint: disable=g-import-not-at-top
  spaces = {}  # ceiling name -> (the autoencoder's maker, the config whose entries it reads)
  for arm in study.arms:
    config = runner.arm_config(arm)
    vae = dict(config.model.get("vae") or {})
    if config.model.get("latent"):
      source = model_lib.vae_source(config.model)
      if source not in ("pretrained", "recipe"):
        continue  # a random VAE's ceiling says nothing.
      what = (os.path.basename(os.path.normpath(vae["pretrained"])) if source == "pretrained"
              else "synthetic recipe")
      name = f"ceiling: VAE latents ({what})"
      make = lambda c=config: ceiling.vae_round_trip(model_lib.build_vae(
          c.model, data_dir=c.input.get("data_dir")))
    else:
      name, make = "ceiling: pixels", lambda: ceiling.identity
    spaces.setdefault(name, (make, config))
  if not spaces:
    return {}
  config = next(iter(spaces.values()))[1]
  out(f"measuring the round trip of {', '.join(spaces)}")
  return ceiling.measure(config.eval.get("entries") or config.input.entries,
                         {name: make() for name, (make, _) in spaces.items()},
                         data_dir=config.input.get("data_dir"),
                         max_examples=config.eval.get("max_examples"))


def _train_vae(study: spec_lib.Study, overrides: dict, out: Callable[[str], None]) -> None:
  """The study's VAE (`VAE` of the study file), trained once into `<root>/<name>/vae`."""
  from dense_diffusion.launch import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  from dense_diffusion.studies import vae_training  # pylint: disable=g-import-not-at-top
  file, _, arg = study.vae.partition(":")
  file = file if os.path.isabs(file) else os.fspath(spec_lib.REPO_ROOT / file)
  data_dir = overrides.get("input.data_dir")
  flags = [sweep_lib.override_flag("data_dir", data_dir)] if data_dir else []
  config = sweep_lib._parse_config(f"{file}:{arg}" if arg else file, flags)  # pylint: disable=protected-access
  out(f"study {study.name}: its VAE ({study.vae}) in {study.vae_dir}")
  vae_training.train(config, study.vae_dir, out=out)


def run(study: str, root: str, *, scale: Optional[str] = None, steps: Optional[int] = None,
        overrides: Optional[dict] = None, ceilings: bool = True,
        out: Callable[[str], None] = print) -> dict:
  """Runs (or resumes) the study and writes its report; returns {kind: path} of the files."""
  from dense_diffusion.studies import report  # pylint: disable=g-import-not-at-top
  from dense_diffusion.studies import runner  # pylint: disable=g-import-not-at-top
  loaded = spec_lib.load(study, root, scale=scale, steps=steps, overrides=overrides)
  out(f"study {loaded.name}: {len(loaded.arms)} arms, {loaded.steps} steps each "
      f"(scale {loaded.scale}), in {os.path.join(root, loaded.name)}")
  if loaded.vae:
    _train_vae(loaded, overrides or {}, out)
  results = runner.run(loaded, out=out)
  if len(results) < len(loaded.arms):
    return {}
  found = _ceilings(loaded, out) if ceilings else {}
  from dense_diffusion import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  pictures = {arm.name: os.fspath(workdir_lib.WorkdirPaths(arm.workdir).prediction(arm.steps))
              for arm in loaded.arms}
  notes = "\n".join(
      [f"{loaded.steps} training steps per arm (scale `{loaded.scale}`); every arm's numbers "
       "are its own eval_metrics.json at its final step. Arms:", ""]
      + [f"- `{arm.name}`: `{arm.command}`" for arm in loaded.arms])
  paths = report.write(os.path.join(root, loaded.name), f"study {loaded.name}", results,
                       found, pictures, notes)
  for kind, path in paths.items():
    out(f"wrote {kind}: {path}")
  return paths
