"""A run's config: its known keys, the checks that turn a mistake into one line, load and save.

A config is an `ml_collections.ConfigDict` (configs/*.py). `check(config)` runs before anything is
built: unknown keys (a typo such as `optimzer`), tasks that are not registered or have no input
entry, entries whose task options do not fit the task. Every problem is a `ConfigError` whose
message names the key and what to change.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Mapping

import numpy as np

from dense_diffusion import errors
from dense_diffusion import paradigms
from dense_diffusion import tasks as tasks_lib
from dense_diffusion import workdir as workdir_lib
from dense_diffusion.diffusion import schedules

# The keys a config may have, per section ("" = top level). Sections not listed (model.unet,
# model.image_encoder, model.lora, task_loss_weights, diffusion) are checked by what reads them.
KNOWN_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({"seed", "tasks", "total_steps", "batch_size", "input", "task_loss_weights",
                   "model", "diffusion", "schedule", "optimizer", "mesh", "sharding",
                   "nonfinite", "log_every", "checkpoint_every", "keep_checkpoints",
                   "eval_every", "eval", "imports", "grad_accum_steps"}),
    "input": frozenset({"data_dir", "entries", "shuffle_buffer", "on_bad_example"}),
    "model": frozenset({"unet", "pretrained_unet", "input_widening", "text_encoder",
                        "text_skip_layers", "num_task_tokens", "task_token_init_std",
                        "input_residual",
                        "zero_init_output", "image_encoder", "image_encoder_options",
                        "pretrained_image_encoder", "dtype", "remat", "lora", "latent",
                        "vae", "head", "trainable", "frozen",
                        "allow_frozen_fresh", "attention"}),
    "optimizer": frozenset({"lr", "warmup_steps", "end_lr_fraction", "b1", "b2",
                            "weight_decay", "grad_clip_norm", "ema_decay"}),
    "schedule": frozenset({"kind", "num_train_timesteps", "beta_start", "beta_end",
                           "rescale_betas_zero_snr"}),
    "sharding": frozenset({"fsdp_largest_dim", "fsdp_min_size", "rules"}),
    "mesh": frozenset({"data", "fsdp", "tensor"}),
    "eval": frozenset({"batch_size", "max_examples", "num_grid_examples", "use_ema",
                       "entries"}),
}
REQUIRED_KEYS = ("tasks", "total_steps", "batch_size", "input", "model", "diffusion",
                 "schedule", "optimizer", "mesh", "eval")


def import_extensions(config: Any) -> None:
  """Imports the modules named in `config.imports` (tasks, paradigms, pp ops registered outside
  the package): eval and predict rebuild a run from its config.json, so they need them too."""
  for name in config.get("imports") or ():
    try:
      importlib.import_module(name)
    except ImportError as e:
      raise errors.MissingError(f"config.imports names {name!r}, which cannot be imported "
                                f"({e}); put its folder on PYTHONPATH") from None


def check(config: Any) -> None:
  """Raises ConfigError for unknown or missing keys and for tasks / entries that cannot work."""
  import_extensions(config)
  for section, known in KNOWN_KEYS.items():
    node = config if not section else config.get(section)
    if node is None:
      continue
    if not hasattr(node, "keys"):
      raise errors.ConfigError(f"config.{section} must be a dict, got {type(node).__name__}")
    unknown = sorted(set(node.keys()) - known)
    if unknown:
      where = f"config.{section}" if section else "the config"
      raise errors.ConfigError(f"{where} has unknown keys {unknown}; known: {sorted(known)}")
  missing = [k for k in REQUIRED_KEYS if k not in config]
  if missing:
    raise errors.ConfigError(f"the config lacks {missing} (configs/demo.py has every key)")
  task_objects(config)
  if config.model.get("latent"):
    _check_vae(config.model)
  paradigms.make_config(dict(config.diffusion))
  s = config.schedule
  schedules.make(s.kind, int(s.num_train_timesteps), float(s.beta_start), float(s.beta_end),
                 rescale_betas_zero_snr=bool(s.get("rescale_betas_zero_snr", False)))
  if config.get("nonfinite", "stop") not in ("stop", "skip"):
    raise errors.ConfigError(f"config.nonfinite={config.nonfinite!r}; choose 'stop' or 'skip'")


def _check_vae(model_config: Any) -> None:
  """model.vae has known keys, one source, and a recipe with configs/synthetic_vae.py's keys,
  before any data is prepared or VAE trained. (A VAE that nothing names, e.g. a real=1 config
  whose weights are not given yet, is refused when the model is built.)"""
  # pylint: disable-next=g-import-not-at-top
  from dense_diffusion.experiment import model as model_lib, vae_cache
  source = model_lib.vae_source(model_config)
  if source == "recipe":
    vae_cache.check_recipe(model_config.vae.recipe)
  if source in ("recipe", "random"):
    model_lib.vae_architecture(model_config)


def task_names(config: Any) -> list[str]:
  """The trained tasks in the order of the model's task index (`config.tasks`)."""
  names = list(config.tasks)
  if not names:
    raise errors.ConfigError("config.tasks is empty: name at least one task")
  if len(set(names)) != len(names):
    raise errors.ConfigError(f"config.tasks lists a task twice: {names}")
  for name in names:
    cls = tasks_lib.base.TASKS.get(name)
    if cls.parts:
      raise errors.ConfigError(
          f"config.tasks lists {name!r}, a composite of {list(cls.parts)}: train those, and "
          f"{name} is evaluated and predicted from them")
  return names


def entry_tasks(entries: Any) -> list[tasks_lib.Task]:
  """The task object of every input entry (built from its `task` and `task_options`)."""
  out = []
  for entry in entries:
    entry = dict(entry)
    if "task" not in entry:
      raise errors.ConfigError(f"input entry for {entry.get('dataset')} has no 'task'")
    try:
      out.append(tasks_lib.from_entry(entry))
    except ValueError as e:
      raise errors.ConfigError(f"input entry {entry.get('dataset')}/{entry['task']}: {e}"
                               ) from None
  return out


def task_objects(config: Any) -> list[tasks_lib.Task]:
  """One task object per `config.tasks` name, in order: the first input entry's for that task
  (its options decide the model's task; entries of the same task may differ in options such as
  the number of classes, and each is evaluated with its own)."""
  names = task_names(config)
  by_name: dict[str, tasks_lib.Task] = {}
  for entry, task in zip(config.input.entries, entry_tasks(config.input.entries)):
    if task.name not in names:
      raise errors.ConfigError(
          f"input entry {dict(entry).get('dataset')} trains task {task.name!r}, which is not in "
          f"config.tasks {names}; add it there or remove the entry")
    by_name.setdefault(task.name, task)
  untrained = [n for n in names if n not in by_name]
  if untrained:
    raise errors.ConfigError(f"config.tasks lists {untrained} but no input entry has data for "
                             "them; add entries (datasets/readers.py) or remove the tasks")
  return [by_name[n] for n in names]


def available_tasks(config: Any) -> dict[str, tasks_lib.Task]:
  """What a run can answer: its trained tasks (`task_objects`) and the composite tasks that can
  be built from them (`tasks.compose`: panoptic from instance and a semantic task with thing /
  stuff categories)."""
  trained = task_objects(config)
  out = {t.name: t for t in trained}
  for name in tasks_lib.composites():
    composite = tasks_lib.compose(name, trained)
    if composite is not None:
      out[name] = composite
  return out


def task_loss_weights(config: Any, names: list[str]) -> np.ndarray:
  """f32[num_tasks] multipliers of each task's loss (`config.task_loss_weights`, default 1)."""
  given = dict(config.get("task_loss_weights") or {})
  unknown = sorted(set(given) - set(names))
  if unknown:
    raise errors.ConfigError(f"config.task_loss_weights names tasks {unknown} that are not in "
                             f"config.tasks {names}")
  weights = np.array([float(given.get(name, 1.0)) for name in names], np.float32)
  if not np.all(np.isfinite(weights) & (weights >= 0)):
    raise errors.ConfigError(f"config.task_loss_weights must be finite and >= 0, got {given}")
  return weights


def save(config: Any, workdir: str | os.PathLike) -> None:
  """Writes `<workdir>/config.json` (process 0 only): eval and predict rebuild the run from it."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    workdir_lib.WorkdirPaths(workdir).config.write_text(config.to_json_best_effort(indent=2))


def load(workdir: str | os.PathLike):
  """The config a run in `workdir` was started with (`config.json`)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = workdir_lib.WorkdirPaths(workdir).config
  if not path.exists():
    raise errors.MissingError(f"{path} does not exist: is {workdir} the workdir of a train run?")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  import_extensions(config)
  return config


def set_dotted(config: Any, values: Mapping[str, Any]) -> None:
  """config["a.b.c"] = value for each item; a key that does not exist is a ConfigError."""
  for key, value in values.items():
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      if p not in node:
        raise errors.ConfigError(f"the config has no key {key!r}")
      node = node[p]
    if leaf not in node:
      raise errors.ConfigError(f"the config has no key {key!r}")
    node[leaf] = value
