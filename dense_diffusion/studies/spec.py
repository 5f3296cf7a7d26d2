"""Study files: a sweep file (dense_diffusion/launch/sweep.py) whose points are the arms compared.

A study file lives in configs/studies/ and is a sweep file with three optional additions:

    CONFIG = "configs/study.py"      # base config, as in a sweep
    CONFIG_ARG = "tasks=depth+normals+semantic"
    NAME = "paradigms"
    # Budgets by name: `main study --scale NAME` picks one (default "cpu"); `steps` is each
    # arm's training budget, `arg` joins CONFIG_ARG, `overrides` are config keys for every arm.
    SCALES = {"cpu": dict(steps=400), "accelerator": dict(steps=20000, arg="res=64")}
    # Keys only evaluation reads: arms that differ in nothing else share one training.
    EVAL_KEYS = ("diffusion.num_inference_steps",)
    # A VAE the study trains first (main train-vae's config[:arg]) into <root>/<name>/vae;
    # "{vae}" in an arm's `arg` becomes that folder.
    VAE = "configs/synthetic_vae.py:res=32"

    def get_sweep():
      return [{"name": "dmp", "arg": "arm=dmp"}, ...]

Besides config keys, a point may hold two reserved keys: `name` (the arm's name, its workdir's
and its row's; default: the sweep's run name) and `arg` (joined to the config argument, for
what a command-line override cannot say, e.g. another recipe). Every arm is validated as a
sweep point is (keys known to its config, values that survive the flag parser) before
anything runs; a mistake is one line (`errors.ConfigError`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from dense_diffusion import errors
from dense_diffusion.launch import REPO_ROOT
from dense_diffusion.launch import sweep as sweep_lib

STUDIES_DIR = REPO_ROOT / "configs" / "studies"  # where `--study NAME` looks.
RESERVED = ("name", "arg")  # point keys that are not config keys.
DEFAULT_SCALE = "cpu"


@dataclasses.dataclass(frozen=True)
class Arm:
  """One compared setting: its config (file and argument), overrides, budget and workdir."""
  name: str
  config: str  # the config file, absolute.
  config_arg: str  # the config's argument ("" for none).
  overrides: dict  # config key -> value (total_steps included).
  workdir: str
  trains_in: str  # the workdir whose checkpoint it evaluates (its own, or a sibling's).

  @property
  def config_flag(self) -> str:
    return f"{self.config}:{self.config_arg}" if self.config_arg else self.config

  @property
  def flags(self) -> list[str]:
    return [sweep_lib.override_flag(k, v) for k, v in self.overrides.items()]

  @property
  def steps(self) -> int:
    return int(self.overrides["total_steps"])

  @property
  def command(self) -> str:
    """The `main train` command line that trains this arm alone."""
    rel = os.path.relpath(self.config, REPO_ROOT)
    flag = f"{rel}:{self.config_arg}" if self.config_arg else rel
    train = " ".join(["python -m dense_diffusion.main train", f"--config {flag}",
                      f"--workdir {self.trains_in}", *self.flags])
    if self.trains_in == self.workdir:
      return train
    return f"{train} (its final evaluation only: the checkpoint of {self.trains_in})"


@dataclasses.dataclass(frozen=True)
class Study:
  name: str
  path: str
  scale: str
  steps: int
  arms: list
  doc: str  # the study file's docstring: what it asks.
  vae: Optional[str] = None  # the VAE config[:arg] trained first, or None.
  vae_dir: Optional[str] = None  # where it goes.


# The budgets the shipped studies offer as their SCALES (`main study --scale NAME`): steps per
# arm, and for the accelerator a larger image, batch and evaluation set.
STANDARD_SCALES = {
    "cpu": dict(steps=400),
    "accelerator": dict(steps=20000, arg="res=64",
                        overrides={"batch_size": 64, "eval.max_examples": 256,
                                   "eval.batch_size": 64}),
}


def resolve(study: str) -> str:
  """A study name (configs/studies/NAME.py) or a study file's path -> the file's path."""
  if os.path.isfile(study):
    return study
  path = STUDIES_DIR / f"{study}.py"
  if path.is_file():
    return str(path)
  known = sorted(p.stem for p in STUDIES_DIR.glob("*.py") if not p.stem.startswith("_"))
  raise errors.UnknownNameError(f"--study {study!r} is neither a study file nor one of the "
                                f"shipped studies: {', '.join(known)}")


def _join_args(*args: Optional[str]) -> str:
  return ",".join(a for a in args if a)


def load(study: str, root: str, *, scale: Optional[str] = None, steps: Optional[int] = None,
         overrides: Optional[dict] = None) -> Study:
  """The study's arms at a budget, validated; workdirs `<root>/<study name>/<arm name>`."""
  path = resolve(study)
  try:
    spec = sweep_lib.load(path)
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise errors.ConfigError(str(e)) from None
  module_vars = _module_vars(path)
  scales = module_vars.get("SCALES") or {DEFAULT_SCALE: {}}
  scale = scale or (DEFAULT_SCALE if DEFAULT_SCALE in scales else next(iter(scales)))
  if scale not in scales:
    raise errors.UnknownNameError(f"--scale {scale!r}: {path} has the scales "
                                  f"{', '.join(scales)}")
  budget = dict(scales[scale])
  unknown = set(budget) - {"steps", "arg", "overrides"}
  if unknown:
    raise errors.ConfigError(f"{path}: SCALES[{scale!r}] has unknown keys {sorted(unknown)}; "
                             "known: steps, arg, overrides")
  steps = int(steps or budget.get("steps") or 0)
  if steps <= 0:
    raise errors.ConfigError(f"{path}: no budget: give --steps or SCALES[{scale!r}]['steps']")
  eval_keys = tuple(module_vars.get("EVAL_KEYS", ()))
  config_path = str(REPO_ROOT / spec.config) if not os.path.isabs(spec.config) else spec.config
  common = {**dict(budget.get("overrides") or {}), **dict(overrides or {}), "total_steps": steps}
  points = [dict(p) for p in spec.points]
  names = _arm_names(points)
  arms, trainers = [], {}
  study_root = os.path.join(root, spec.name)
  vae = module_vars.get("VAE")
  vae_dir = os.path.join(study_root, "vae") if vae else None
  for name, point in zip(names, points):
    arg = _join_args(spec.config_arg, budget.get("arg"), point.pop("arg", None))
    if "{vae}" in arg:
      if not vae:
        raise errors.ConfigError(f"{path}: an arm's arg uses {{vae}} but the study sets no VAE")
      arg = arg.replace("{vae}", vae_dir)
    point.pop("name", None)
    keys = {**common, **point}
    _validate(path, config_path, arg, keys)
    workdir = os.path.join(study_root, name)
    train_key = (arg, repr(sorted((k, repr(v)) for k, v in keys.items() if k not in eval_keys)))
    trains_in = trainers.setdefault(train_key, workdir)
    arms.append(Arm(name, config_path, arg, keys, workdir, trains_in))
  return Study(spec.name, path, scale, steps, arms, module_vars.get("__doc__") or "", vae, vae_dir)


def _module_vars(path: str) -> dict:
  import importlib.util  # pylint: disable=g-import-not-at-top
  module_spec = importlib.util.spec_from_file_location(f"_study_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return vars(module)


def _arm_names(points: list) -> list:
  """The points' `name`s, else the sweep's run names of their other keys."""
  plain = sweep_lib.run_names([{k: v for k, v in p.items() if k != "name"} for p in points])
  names = [str(p.get("name") or n) for p, n in zip(points, plain)]
  for name in names:
    if names.count(name) > 1 or sweep_lib._UNSAFE.search(name):  # pylint: disable=protected-access
      raise errors.ConfigError(f"arm name {name!r}: arm names must be distinct and use only "
                               "letters, digits and . _ + -")
  return names


def _validate(path: str, config_path: str, arg: str, keys: dict) -> None:
  """The arm's keys reach its config as written (sweep.validate on a one-point sweep)."""
  one = sweep_lib.Sweep(name="arm", path=path, config=config_path, config_arg=arg or None,
                        points=[keys])
  try:
    sweep_lib.validate(one, repo_root="/")
  except (ValueError, TypeError, FileNotFoundError) as e:
    raise errors.ConfigError(f"{e} (config argument {arg!r})") from None
