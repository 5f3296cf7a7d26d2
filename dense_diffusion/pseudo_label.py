"""`main pseudo-label`: a folder of images labelled by teachers, as a TFDS training set (DMP).

    python -m dense_diffusion.main pseudo-label --input bedrooms/ \
        --teacher depth=runs/depth_teacher,semantic=runs/ade_teacher \
        --teacher normals=weights/marigold-normals \
        --teacher albedo=weights/marigold-iid-lighting,shading=weights/marigold-iid-lighting \
        --output /data/tfds --dataset bedrooms

DMP (Lee et al. 2024) fine-tunes on ~10K unlabelled bedroom images whose labels are the answers of
off-the-shelf predictors. Here a teacher is either a trained run's workdir (`predict.Predictor`:
any task the run was trained on) or a diffusers Marigold-format pipeline folder
(`predict.PretrainedPredictor`: depth, normals, albedo / shading). Each `--teacher TASK=SOURCE`
names one task's teacher; one source named for several tasks is loaded once.

Every image of `--input` (searched recursively; hidden files and files without an image suffix
are left out, with a count) is read as `predict` reads it, answered by each teacher at the
image's own size, and its answers stored as the task's label (`datasets/pseudo_labelled`: depth
in metres or relative, unit normals in our camera frame, class ids, albedo RGB, grey shading)
in one file per image of a staging folder, `OUTPUT/downloads/manual/pseudo_labelled/NAME`.
An interrupted run rerun with the same flags goes on from the images already there. Images
that cannot be read are counted, skipped and listed at the end. When every image is answered,
`pseudo_labelled/NAME` is built in OUTPUT from the staging folder, which is then removed.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

from absl import logging
import numpy as np

from dense_diffusion import errors
from dense_diffusion import predict
from dense_diffusion.datasets import common
from dense_diffusion.datasets.pseudo_labelled import pseudo_labelled as dataset_lib

PROGRESS_EVERY_S = 10.0  # seconds between progress lines (also the first and the last batch).
LISTED_BAD = 50  # unreadable images listed by name at the end (all are in the metadata).
SETUP_FILE = "setup.json"  # the staging folder's record of what labels it (resuming checks it)
# Marigold's normals (diffusers' MarigoldImageProcessor.visualize_normals: x right, y up, z
# towards the viewer) -> ours (x right, y down, z forward).
MARIGOLD_NORMALS_TO_OURS = np.array([1.0, -1.0, -1.0], np.float32)


# --- teachers ------------------------------------------------------------------------------------


class RunTeacher:
  """A trained run's workdir answering the tasks it was trained on, `batch_size` at a time."""

  def __init__(self, source: str, *, batch_size: Optional[int], steps: Optional[int]):
    self.source = source
    self.predictor = predict.Predictor(source, batch_size=batch_size, steps=steps)

  def task_object(self, task: str):
    return self.predictor.check_task(task)  # the run's task, with its entry's options

  @property
  def batch_size(self) -> int:
    self.predictor.load()
    return self.predictor.batch_size

  def answer(self, images: Sequence[np.ndarray], tasks: Sequence[str]) -> list[dict]:
    out = [{} for _ in images]
    size = self.batch_size
    for start in range(0, len(images), size):
      chunk = images[start:start + size]
      for task in tasks:
        for i, answer in enumerate(self.predictor.answer(chunk, task)):
          out[start + i][task] = answer
    return out


class PipelineTeacher:
  """A pretrained Marigold-format pipeline folder; one pipeline call answers all its tasks for
  one image (a normals pipeline's answers brought into our camera frame)."""

  batch_size = 1

  def __init__(self, source: str, *, steps: Optional[int], ensemble_size: int,
               processing_resolution: Optional[int]):
    self.source = source
    self.predictor = predict.PretrainedPredictor(
        source, steps=steps, ensemble_size=ensemble_size,
        processing_resolution=processing_resolution)

  def task_object(self, task: str):
    return self.predictor.task_object(task)

  def answer(self, images: Sequence[np.ndarray], tasks: Sequence[str]) -> list[dict]:
    out = []
    for image in images:
      answers = in_our_frame(self.predictor.pipeline, self.predictor.task_answers(image))
      out.append({t.name: a for t, a in answers if t.name in tasks})
    return out


def in_our_frame(pipeline, answers: list) -> list:
  """A pipeline's [(task, answer)] with a normals pipeline's vectors in our camera frame."""
  from dense_diffusion.pipelines import marigold  # pylint: disable=g-import-not-at-top
  if not isinstance(pipeline, marigold.MarigoldNormalsPipeline):
    return answers
  return [(t, np.asarray(a, np.float32) * MARIGOLD_NORMALS_TO_OURS) for t, a in answers]


def parse_teachers(specs: Iterable[str]) -> dict[str, str]:
  """`--teacher` values ("TASK=SOURCE", several joined by commas) -> {task: source}, in the
  order given."""
  teachers: dict[str, str] = {}
  for spec in specs:
    for item in filter(None, (s.strip() for s in spec.split(","))):
      task, sep, source = item.partition("=")
      task, source = task.strip(), source.strip()
      if not sep or not task or not source:
        raise errors.ConfigError(f"--teacher {item!r}: write TASK=SOURCE (SOURCE: a run's "
                                 "workdir or a Marigold-format pipeline folder)")
      dataset_lib.label_format(task)  # a task that pseudo-labels cover
      if task in teachers and teachers[task] != source:
        raise errors.ConfigError(f"--teacher gives {task} two teachers, {teachers[task]} and "
                                 f"{source}; give one")
      teachers[task] = source
  if not teachers:
    raise errors.ConfigError("pseudo-label needs --teacher TASK=SOURCE (one per task)")
  return teachers


def open_teacher(source: str, *, batch_size: Optional[int] = None, steps: Optional[int] = None,
                 ensemble_size: int = 1, processing_resolution: Optional[int] = None):
  """The teacher in folder `source`: a pipeline (it has model_index.json) or a run's workdir."""
  if not os.path.isdir(source):
    raise errors.MissingError(f"--teacher: {source} is not a folder (a run's workdir or a "
                              "Marigold-format pipeline folder)")
  if os.path.isfile(os.path.join(source, "model_index.json")):
    return PipelineTeacher(source, steps=steps, ensemble_size=ensemble_size,
                           processing_resolution=processing_resolution)
  if ensemble_size != 1 or processing_resolution is not None:
    raise errors.ConfigError(f"--ensemble_size and --processing_resolution are for pipeline "
                             f"teachers; {source} is a trained run")
  return RunTeacher(source, batch_size=batch_size, steps=steps)


# --- images ----------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike) -> tuple[list[tuple[str, pathlib.Path]], list]:
  """([(key = path relative to `folder`, path)] of its image files, sorted, searched
  recursively; [other files left out]). Hidden files and folders are left out."""
  root = pathlib.Path(folder)
  if not root.is_dir():
    raise errors.MissingError(f"--input {folder} is not a folder of images")
  images, others = [], []
  for path in sorted(root.rglob("*")):
    rel = path.relative_to(root)
    if any(part.startswith(".") for part in rel.parts) or not path.is_file():
      continue
    if path.suffix.lower() in common.IMAGE_SUFFIXES:
      images.append((rel.as_posix(), path))
    else:
      others.append(path)
  if not images:
    raise errors.MissingError(f"no image files ({', '.join(common.IMAGE_SUFFIXES)}) in {folder}")
  return images, others


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return (f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600
          else f"{seconds // 60}m{seconds % 60:02d}s")


# --- the command -----------------------------------------------------------------------------------


def staging_dir(output: str | os.PathLike, name: str) -> pathlib.Path:
  """Where the answers of set `name` wait until it is built: TFDS's manual folder."""
  return pathlib.Path(output) / "downloads" / "manual" / dataset_lib.NAME / name


def dataset_dir(output: str | os.PathLike, name: str) -> pathlib.Path:
  """The folder of set `name` in data_dir `output` (what `configs/dmp.py:data=` takes)."""
  return pathlib.Path(output) / dataset_lib.NAME / name


def _check_setup(staging: pathlib.Path, setup: dict) -> int:
  """Records `setup` in a new staging folder, or checks it against the one there; returns the
  number of images already labelled."""
  path = staging / SETUP_FILE
  if path.is_file():
    found = json.loads(path.read_text())
    if found != setup:
      differ = sorted(k for k in set(found) | set(setup) if found.get(k) != setup.get(k))
      raise errors.ConfigError(
          f"{staging} holds labels made with other {', '.join(differ)} ({found}); rerun with "
          "the same flags to go on, or delete that folder to start over")
  else:
    staging.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(setup, indent=1))
  return len(list((staging / dataset_lib.EXAMPLES).glob("*.npz")))


class _Labeller:
  """Answers images batch by batch and stages each one's labels; counts and reports progress."""

  def __init__(self, sources: dict, assignment: dict[str, str], staging: pathlib.Path,
               total: int, done_before: int, todo: int, log: Callable[[str], None]):
    self.sources, self.assignment, self.staging = sources, assignment, staging
    self.task_objects = {t: sources[s].task_object(t) for t, s in assignment.items()}
    self.formats = {t: dataset_lib.label_format(t) for t in assignment}
    self.by_source = {src: [t for t, s in assignment.items() if s == src] for src in sources}
    self.total, self.done_before, self.todo, self.log = total, done_before, todo, log
    self.labelled = self.batches = 0
    self.bad: list[tuple[str, str]] = []  # (key, reason)
    self.start = self.last_log = time.time()
    self._shown = None  # (labelled, unreadable) of the last progress line

  def task_options(self) -> dict:
    """{task: the options its stored labels are in} (JSON values)."""
    return dataset_lib.json_value({t: self.formats[t].options(obj)
                                   for t, obj in self.task_objects.items()})

  def answer(self, batch: list[tuple[str, np.ndarray]]) -> None:
    """Every teacher's answers for `batch` [(key, u8[H, W, 3])], stored."""
    pixels = [img for _, img in batch]
    answers = [dict() for _ in batch]
    for source, tasks in self.by_source.items():
      for i, found in enumerate(self.sources[source].answer(pixels, tasks)):
        answers[i].update(found)
    for (key, img), found in zip(batch, answers):
      labels = {t: self.formats[t].store(found[t], self.task_objects[t]) for t in self.assignment}
      dataset_lib.write_example(self.staging, key, img, labels)
      self.labelled += 1
    self.batches += 1
    self.progress()

  def progress(self, final: bool = False) -> None:
    """A progress line after the first batch, then every PROGRESS_EVERY_S, and at the end."""
    now = time.time()
    if (not final and self.batches > 1 and now - self.last_log < PROGRESS_EVERY_S) or (
        self._shown == (self.labelled, len(self.bad))):
      return
    self.last_log, self._shown = now, (self.labelled, len(self.bad))
    rate = self.labelled / max(now - self.start, 1e-9)
    left = self.todo - self.labelled - len(self.bad)
    self.log(f"labelled {self.done_before + self.labelled}/{self.total} images ({rate:.2f} "
             f"images/s, ETA {_format_eta(left / rate if rate > 0 else 0)}), "
             f"{len(self.bad)} unreadable")


def _report_bad(bad: list[tuple[str, str]], total: int, err: Callable[[str], None]) -> None:
  if not bad:
    return
  err(f"{len(bad)} of {total} images could not be read and were skipped:")
  for key, reason in bad[:LISTED_BAD]:
    err(f"  {key} ({reason})")
  if len(bad) > LISTED_BAD:
    err(f"  ... and {len(bad) - LISTED_BAD} more (all in the set's metadata.json, 'skipped')")


def run(input_folder: str, teacher_specs: Sequence[str], output: str, *,
        dataset: Optional[str] = None, batch_size: Optional[int] = None,
        steps: Optional[int] = None, ensemble_size: int = 1,
        processing_resolution: Optional[int] = None,
        log: Callable[[str], None] = lambda s: print(s, flush=True),
        err: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)) -> int:
  """The `pseudo-label` command; returns the exit code."""
  assignment = parse_teachers(teacher_specs)
  images, others = list_images(input_folder)
  name = dataset or pathlib.Path(input_folder).resolve().name
  if not name.replace("_", "").replace("-", "").isalnum() or name[0] in "-_":
    raise errors.ConfigError(f"--dataset {name!r}: use letters, digits, _ and - (it names "
                             f"{dataset_lib.NAME}/NAME)")
  target = dataset_dir(output, name)
  if (target / str(dataset_lib.PseudoLabelled.VERSION) / "dataset_info.json").is_file():
    raise errors.ConfigError(f"{dataset_lib.NAME}/{name} already exists in {output} ({target}); "
                             "give another --dataset or delete that folder")
  if others:
    log(f"left out {len(others)} files without an image suffix, e.g. {others[0]}")
  sources = {source: open_teacher(source, batch_size=batch_size, steps=steps,
                                  ensemble_size=ensemble_size,
                                  processing_resolution=processing_resolution)
             for source in dict.fromkeys(assignment.values())}  # each source opened once

  staging = staging_dir(output, name)
  examples = staging / dataset_lib.EXAMPLES
  todo = [(k, p) for k, p in images if not (examples / dataset_lib.example_file(k)).is_file()]
  labeller = _Labeller(sources, assignment, staging, len(images), len(images) - len(todo),
                       len(todo), log)
  setup = {"images": str(pathlib.Path(input_folder).resolve()),
           "teachers": {t: str(pathlib.Path(s).resolve()) for t, s in assignment.items()},
           "task_options": labeller.task_options(), "steps": steps,
           "ensemble_size": ensemble_size, "processing_resolution": processing_resolution}
  if _check_setup(staging, setup):
    log(f"resuming: {labeller.done_before} of {len(images)} images already labelled in "
        f"{staging}")
  teachers_line = ", ".join(f"{t}={s}" for t, s in assignment.items())
  log(f"labelling {len(todo)} images of {input_folder} with {teachers_line}")

  per_call = batch_size or max(getattr(t, "batch_size", 1) for t in sources.values())
  pending: list[tuple[str, np.ndarray]] = []
  try:
    for key, path in todo:
      try:
        image = predict.load_rgb(path)
        if image.shape[0] < 1 or image.shape[1] < 1:
          raise ValueError("empty image")
      except Exception as e:  # pylint: disable=broad-except  # any unreadable file is skipped
        labeller.bad.append((key, f"{type(e).__name__}: {e}"))
        continue
      pending.append((key, image))
      if len(pending) == per_call:
        labeller.answer(pending)
        pending = []
    if pending:
      labeller.answer(pending)
  except KeyboardInterrupt:
    err(f"interrupted: {labeller.done_before + labeller.labelled} of {len(images)} images are "
        f"labelled in {staging}; rerun the same command to go on")
    raise
  labeller.progress(final=True)
  _report_bad(labeller.bad, len(images), err)
  staged = labeller.done_before + labeller.labelled
  if not staged:
    raise errors.UserError(f"none of the {len(images)} images in {input_folder} could be read")

  log(f"building {dataset_lib.NAME}/{name} in {output} from {staged} labelled images ...")
  config = dataset_lib.PseudoLabelledConfig(
      name=name, description=f"{input_folder} labelled by {teachers_line}",
      tasks=tuple(assignment), task_options=setup["task_options"], teachers=setup["teachers"],
      skipped=tuple(f"{k}: {r}" for k, r in labeller.bad))
  with _quiet():
    builder = dataset_lib.build(config, staging, output)
  shutil.rmtree(staging)
  count = builder.info.splits["train"].num_examples
  log(f"{dataset_lib.NAME}/{name}: {count} examples ({', '.join(assignment)}) in {target}; "
      f"{len(labeller.bad)} unreadable images skipped")
  log(f"train on it: --config configs/dmp.py:real=1,data={target}")
  return 0


@contextlib.contextmanager
def _quiet():
  """absl logging at ERROR while TFDS builds (its notice about a config it does not list)."""
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    yield
  finally:
    logging.set_verbosity(level)
