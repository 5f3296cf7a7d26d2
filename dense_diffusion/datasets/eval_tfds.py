"""A TFDS evaluation split read at full resolution, one example at a time, for `main eval`.

An input entry (a reader's, `readers.get(name)`, or one of a run's config) names the dataset, its
evaluation split and its `pp_eval`, which keeps the raw labels under "label/..." and then resizes
the image to the model's square and maps it to [-1, 1]. `full_resolution_pp` drops those
`resize` and `value_range` ops, so the image keeps its own size and 0..255 values and the labels
stay raw: the evaluation fits each image into the model's square itself, keeping its aspect
ratio, and scores the answer at the ground truth's resolution.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np

from dense_diffusion import errors
from dense_diffusion import tasks as tasks_lib
from dense_diffusion.datasets import eval_folder

# The pp ops that bring the image to the model's size and value range.
SCALE_OPS = ("resize", "value_range")


def full_resolution_pp(pp: str) -> str:
  """`pp` without its `resize(...)` and `value_range(...)` ops."""
  from dense_diffusion import pp as pp_lib  # pylint: disable=g-import-not-at-top
  ops = [op for op in pp_lib.split_ops(pp or "") if op.split("(", 1)[0].strip() not in SCALE_OPS]
  return "|".join(ops)


def reader_entries(name: str, task: str) -> list[dict]:
  """The entries of reader `name` ("reader" or "reader/config", e.g. synthetic_scenes/tiny32;
  or the TFDS name a reader reads, e.g. coco/2017_panoptic) for `task`: the reader's `task` and
  `config` arguments are filled when it takes them."""
  from dense_diffusion.datasets import readers  # pylint: disable=g-import-not-at-top
  reader, _, config = name.partition("/")
  if reader not in readers.names():
    # A TFDS name that a reader reads with its defaults (coco/2017_panoptic).
    for other in readers.names():
      try:
        entries = reader_entries(other, task)
      except (errors.UserError, TypeError, ValueError):
        continue
      if any(e["dataset"] == name for e in entries):
        return entries
    raise errors.UnknownNameError(
        f"--dataset {name!r} is neither a folder nor a dataset reader (or a TFDS dataset one "
        f"reads); readers: {', '.join(readers.names())}")
  params = inspect.signature(readers.READERS.get(reader)).parameters
  kwargs = {}
  if config:
    if "config" not in params:
      raise errors.ConfigError(f"reader {reader!r} takes no configuration ({name!r})")
    kwargs["config"] = config
  if "task" in params:
    parts = tasks_lib.base.TASKS.get(task).parts
    kwargs["task"] = parts[0] if parts else task
  entries = readers.get(reader, **kwargs)
  return [dict(e) for e in (entries if isinstance(entries, list) else [entries])]


def pick_entry(entries: Sequence[Mapping[str, Any]], task: str, where: str) -> dict:
  """The entry that holds `task`'s answers: its own, or (a composite) the first part's entry of
  a dataset whose entries make the composite (`tasks.compose`: COCO's semantic_coco and
  instance make panoptic, ADE20K's semantic_ade20k does not)."""
  parts = tasks_lib.base.TASKS.get(task).parts if task in tasks_lib.names() else ()
  for entry in entries:
    if entry["task"] == task:
      return dict(entry)
  if parts:
    by_dataset: dict[str, list] = {}
    for entry in entries:
      if entry["task"] in tasks_lib.names():
        by_dataset.setdefault(entry["dataset"], []).append(dict(entry))
    for group in by_dataset.values():
      composite = tasks_lib.compose(task, [tasks_lib.from_entry(e) for e in group])
      if composite is not None:
        first = composite.part_names()[parts[0]]
        return next(e for e in group if e["task"] == first)
  have = sorted({str(e["task"]) for e in entries})
  raise errors.ConfigError(f"{where} has no {task} entry (its tasks: {', '.join(have)})")


def examples(entry: Mapping[str, Any], task: tasks_lib.Task, *, split: Optional[str] = None,
             data_dir: Optional[str] = None) -> Iterator[eval_folder.Example]:
  """Every example of the entry's evaluation split (or `split`): the image u8[H, W, 3] at its
  own size and `task.answer` of its raw labels."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from dense_diffusion import input_pipeline  # pylint: disable=g-import-not-at-top
  entry = dict(entry)
  entry["pp_eval"] = full_resolution_pp(entry.get("pp_eval") or entry.get("pp", ""))
  if split:
    entry["eval_split"] = split
  ds, _ = input_pipeline.get_eval_dataset(entry, [entry["task"]], 1, data_dir=data_dir,
                                          process_index=0, process_count=1)
  prefix = tasks_lib.LABEL_PREFIX
  index = 0
  for batch in tfds.as_numpy(ds):
    if not batch["mask"][0]:
      continue
    labels = {}
    for key, value in batch.items():
      if key.startswith(prefix) and not key.endswith("_shape"):
        shape = batch.get(f"{key}_shape")
        x = value[0]
        labels[key] = x[tuple(slice(0, int(s)) for s in shape[0])] if shape is not None else x
    image = np.clip(np.round(batch["image"][0]), 0, 255).astype(np.uint8)
    yield eval_folder.Example(f"{entry['dataset']}/{index}", image, task.answer(labels),
                              labels=labels)
    index += 1
