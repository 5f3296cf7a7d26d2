"""Prediction on the user's own images: images in, task outputs and visualisations out.

    python -m dense_diffusion.main predict --workdir runs/demo --task depth \
        --input photos/ --output out/

The run's config (`<workdir>/config.json`) rebuilds the run (`experiment.Experiment`), the latest
checkpoint is restored (EMA parameters by default) and the paradigm's inference predicts the
RGB-encoded answer of every image, which the run's task object (with the options of its input
entry) decodes. Images of any size and of any PIL mode (grey, palette, RGBA, 16-bit) are
converted to RGB and fitted into the model's square keeping their aspect ratio (longer side to the
model resolution, the rest padded: `fit_square`), predicted in padded batches; the answer is
cropped to the image's part of the square, brought back to the original size by the task
(`Task.resize`) and written by the task (`Task.write`; docs/predict.md lists the files). A composite task (panoptic) is predicted as its
trained parts, each brought to the original size, then combined.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import time
from typing import Any, Callable, Optional, Sequence

from etils import epath
import numpy as np
from PIL import Image
from PIL import ImageOps

from dense_diffusion import errors
from dense_diffusion import sharding
from dense_diffusion import tasks as tasks_lib
from dense_diffusion.experiment import config as config_lib


# --- images ---------------------------------------------------------------------------------


def list_inputs(path: str | pathlib.Path) -> list[pathlib.Path]:
  """A file, or every non-hidden file of a folder (sorted; not recursive)."""
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
      raise errors.MissingError(f"no files in the input folder {path}")
    return files
  raise errors.MissingError(f"--input {path} is neither a file nor a folder")


def load_rgb(path: str | pathlib.Path) -> np.ndarray:
  """Reads any PIL-readable image as u8[H, W, 3] (grey/palette/RGBA/16-bit converted to RGB).

  EXIF orientation is applied. Alpha is dropped (the colour under it is kept); 16-bit and float
  grey images are scaled by their maximum. Raises (PIL.UnidentifiedImageError, OSError, ...) on
  unreadable files.
  """
  with Image.open(path) as img:
    img.load()
    img = ImageOps.exif_transpose(img)  # camera JPEGs: the orientation they are shown in
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
      grey = np.asarray(img, np.float32)
      top = float(grey.max()) if grey.size else 0.0
      grey = np.clip(grey / top * 255.0 if top > 0 else grey, 0, 255)
      return np.repeat(np.round(grey).astype(np.uint8)[..., None], 3, axis=-1)
    if img.mode == "P" and "transparency" in img.info:
      img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), np.uint8)


def fit_square(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """u8[H, W, 3] -> (f32[size, size, 3] in [-1, 1], (h, w) of the image inside it).

  The aspect ratio is kept, as Marigold processes images: the longer side is resized to `size`
  (the shorter one to `max(1, S * size // L)`, diffusers' rounding; antialiased bilinear with
  torch's weights, `pipelines.marigold_processing`), then the bottom and right are padded to a
  square by repeating the last row and column. `crop_answer` takes the padding off an answer.
  """
  from dense_diffusion.pipelines import marigold_processing as processing  # pylint: disable=g-import-not-at-top
  x = np.asarray(image, np.float32)[None] / 127.5 - 1.0
  longest = max(x.shape[1], x.shape[2])
  h, w = (max(1, n * size // longest) for n in x.shape[1:3])  # a 1-pixel sliver at least
  if (h, w) != x.shape[1:3]:
    x = processing.resize(x, (h, w), "bilinear", antialias=True)
  x = np.pad(x, ((0, 0), (0, size - h), (0, size - w), (0, 0)), mode="edge")
  return np.clip(x[0], -1.0, 1.0), (h, w)


def crop_answer(answer: Any, content: tuple[int, int]) -> Any:
  """The part of an answer (an array [S, S, ...], or a dict / tuple of them) that covers the
  image inside `fit_square`'s padded square."""
  h, w = content
  if isinstance(answer, dict):
    return {k: crop_answer(v, content) for k, v in answer.items()}
  if isinstance(answer, tuple):
    return tuple(crop_answer(v, content) for v in answer)
  return np.asarray(answer)[:h, :w]


# --- the predictor ------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
  written: int = 0  # images with all their outputs written
  failed: list = dataclasses.field(default_factory=list)  # (path, reason)
  outputs: list = dataclasses.field(default_factory=list)  # every file written

  @property
  def exit_code(self) -> int:
    """0 when at least one image was processed, 1 when none could be."""
    return 0 if self.written else 1


def check_task(config: Any, task: str, workdir: str = "") -> tasks_lib.Task:
  """The task object for `task`; a UserError naming what can be predicted when it cannot."""
  available = config_lib.available_tasks(config)
  if task in available:
    return available[task]
  trained = [n for n in config.tasks]
  composites = [n for n in available if n not in trained]
  also = f" (and {', '.join(composites)})" if composites else ""
  where = f" ({workdir})" if workdir else ""
  hint = ""
  if task in tasks_lib.composites():
    parts = tasks_lib.base.TASKS.get(task).parts
    hint = (f"; {task} combines {', '.join(parts)}: it needs a run trained on all of them"
            + (" whose tasks carry what it needs (docs/tasks.md)"
               if set(parts) <= {tasks_lib.family(n) for n in trained} else ""))
  raise errors.ConfigError(f"task {task!r} was not trained in this run{where}; trained tasks: "
                           f"{', '.join(trained)}{also}{hint}")


class Predictor:
  """A restored run that predicts tasks on batches of images.

  Args:
    workdir: a train run's folder (config.json + checkpoints/).
    batch_size: images per device batch (default: the config's eval.batch_size); must divide
      over the mesh's ("data", "fsdp") shards. The last batch is padded.
    steps: sampler steps (overrides diffusion.num_inference_steps).
    use_ema: predict with the EMA parameters (default) or the raw trained ones.
    seed: sampler noise seed.
  """

  def __init__(self, workdir: str, *, batch_size: Optional[int] = None,
               steps: Optional[int] = None, use_ema: bool = True, seed: int = 0):
    self.workdir = str(workdir)
    self.config = config_lib.load(workdir)
    if steps is not None:
      if steps < 1:
        raise errors.ConfigError(f"--steps must be >= 1, got {steps}")
      self.config.diffusion.num_inference_steps = int(steps)
    self.resolution = int(self.config.model.unet["sample_size"])
    self.use_ema = use_ema
    self.seed = seed
    self._requested_batch = batch_size
    self._setup = None
    self._batches = 0  # batches answered: each draws its own sampler noise

  def check_task(self, task: str) -> tasks_lib.Task:
    return check_task(self.config, task, self.workdir)

  def load(self) -> None:
    """Builds the run and restores the latest checkpoint (once)."""
    if self._setup is not None:
      return
    from dense_diffusion import experiment  # pylint: disable=g-import-not-at-top

    setup = experiment.Experiment(self.config)
    shards = math.prod(setup.mesh.shape[a] for a in sharding.BATCH_AXES)
    batch = self._requested_batch or int(self.config.eval.get("batch_size", shards))
    if batch < 1 or batch % shards:
      raise errors.ConfigError(f"batch size {batch} does not divide over the {shards} "
                               "data-parallel shards of the mesh; use a multiple of that")
    self.batch_size = batch
    self.step, state = setup.restore_latest(self.workdir, async_save=False)
    self.params = state.ema if self.use_ema else state.params
    self._predict = setup.make_predictor()
    self._setup = setup

  def predict_rgb(self, images: np.ndarray, task: str, batch_index: int = 0) -> np.ndarray:
    """f32[N, R, R, 3] model inputs in [-1, 1] (N <= batch size) -> f32[N, R, R, 3] answers."""
    import jax
    self.load()
    setup = self._setup
    n = len(images)
    if n > self.batch_size:
      raise ValueError(f"{n} images exceed the batch size {self.batch_size}")
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.float32)
    padded[:n] = images
    task_ids = np.full((self.batch_size,), setup.task_names.index(task), np.int32)
    key = jax.random.fold_in(jax.random.key(self.seed), batch_index)
    with jax.set_mesh(setup.mesh):
      image = sharding.global_array(padded, setup.batch_shardings["image"])
      task_index = sharding.global_array(task_ids, setup.batch_shardings["task"])
      pred = sharding.to_host(self._predict(self.params, setup.frozen, image, task_index, key))
    return np.clip(pred[:n], -1.0, 1.0)

  def answer(self, images: Sequence[np.ndarray], task: str) -> list[Any]:
    """`task`'s answers for images u8[H, W, 3] of any sizes (at most the batch size), each at
    its own image's size.

    Every image is fitted into the model's square keeping its aspect ratio (`fit_square`), the
    model answers (a composite task: its trained parts), each answer is decoded by its task,
    cropped to the image's part of the square (`crop_answer`) and resized back to the image's
    size by the task (`Task.resize`), then a composite combines its parts.
    """
    task_obj = self.check_task(task)
    trained = config_lib.available_tasks(self.config)
    # {part family (or the task itself): the trained task that answers it}
    names = task_obj.part_names() if task_obj.parts else {task: task}
    decoders = {key: trained[name] for key, name in names.items()}
    self.load()
    fitted = [fit_square(img, self.resolution) for img in images]
    model_in = np.stack([x for x, _ in fitted])
    answers = {key: dec.decode(self.predict_rgb(model_in, names[key], self._batches))
               for key, dec in decoders.items()}
    self._batches += 1
    out = []
    for i, (img, (_, content)) in enumerate(zip(images, fitted)):
      h, w = img.shape[:2]
      full = {key: dec.resize(crop_answer(answers[key][i], content), h, w)
              for key, dec in decoders.items()}
      out.append(task_obj.combine(full) if task_obj.parts else full[task])
    return out

  def run(self, task: str, inputs: Sequence[str | pathlib.Path], output: str | os.PathLike,
          *, log: Callable[[str], None] = lambda s: print(s, flush=True),
          err: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
          ) -> Summary:
    """Predicts `task` for every input file; writes the outputs into `output`."""
    task_obj = self.check_task(task)
    self.load()
    self._batches = 0  # the same noise for the same files, whatever ran before

    def answer_batch(images: list[np.ndarray]) -> list[list[tuple[Any, Any]]]:
      return [[(task_obj, a)] for a in self.answer(images, task)]

    return predict_files(task, inputs, output, self.batch_size, answer_batch, log=log, err=err)


def predict_files(label: str, inputs: Sequence[str | pathlib.Path], output: str | os.PathLike,
                  batch_size: int, answer_batch: Callable[[list[np.ndarray]], list],
                  *, log: Callable[[str], None], err: Callable[[str], None]) -> Summary:
    """Reads every input, answers them `batch_size` at a time and writes each answer's files.

    `answer_batch(images u8[H, W, 3] list)` returns, per image, the (task, answer at the
    image's size) pairs to write. Unreadable files and failed writes are reported and skipped.
    """
    out = epath.Path(output)  # a local folder or gs://
    out.mkdir(parents=True, exist_ok=True)
    stems = _unique_stems(list(inputs))
    summary = Summary()
    pending: list[tuple[pathlib.Path, str, np.ndarray]] = []
    batches = 0
    start = time.time()

    def flush():
      nonlocal batches
      if not pending:
        return
      answers = answer_batch([img for _, _, img in pending])
      for (path, stem, img), pairs in zip(pending, answers):
        try:
          for task_obj, answer in pairs:
            summary.outputs.extend(task_obj.write(out, stem, img, answer))
          summary.written += 1
        except OSError as e:
          summary.failed.append((path, f"cannot write its outputs: {e}"))
          err(f"error: {path}: cannot write its outputs ({e})")
      batches += 1
      log(f"batch {batches}: {len(pending)} images ({summary.written} written, "
          f"{len(summary.failed)} failed, {time.time() - start:.1f}s)")
      pending.clear()

    for path in inputs:
      path = pathlib.Path(path)
      try:
        image = load_rgb(path)
        if image.shape[0] < 1 or image.shape[1] < 1:
          raise ValueError("empty image")
      except Exception as e:  # pylint: disable=broad-except  # any unreadable file is reported
        summary.failed.append((path, f"{type(e).__name__}: {e}"))
        err(f"error: cannot read {path} ({type(e).__name__}: {e}); skipped")
        continue
      pending.append((path, stems[path], image))
      if len(pending) == batch_size:
        flush()
    flush()
    log(f"{label}: {summary.written} written, {len(summary.failed)} failed (of {len(inputs)} "
        f"files) -> {out}")
    return summary


class PretrainedPredictor:
  """A pretrained diffusers-format pipeline folder (Marigold depth / normals / intrinsics, and
  their E2E-FT fine-tunes) predicting on image files, written as a trained run's files.

  Args:
    folder: what the diffusers pipeline's `save_pretrained` wrote.
    steps: denoising steps (default: the folder's `default_denoising_steps`).
    ensemble_size: predictions per image, combined as the pipeline does.
    batch_size: latents per device call.
    seed: the initial noise.
    processing_resolution: the longer side the pipeline works at (default: the folder's
      default_processing_resolution).
  """

  def __init__(self, folder: str, *, steps: Optional[int] = None, ensemble_size: int = 1,
               batch_size: Optional[int] = None, seed: int = 0,
               processing_resolution: Optional[int] = None):
    from dense_diffusion.pipelines import answers  # pylint: disable=g-import-not-at-top
    self._answers = answers
    self.pipeline = answers.load(folder)
    self.steps, self.ensemble_size = steps, ensemble_size
    self.batch_size = batch_size or ensemble_size
    self.seed = seed
    self.processing_resolution = processing_resolution
    self._calls = 0

  def tasks(self) -> list[str]:
    return [t.name for t in self._answers.tasks(self.pipeline)]

  def check_task(self, task: Optional[str]) -> None:
    if task is not None and task not in self.tasks():
      raise errors.ConfigError(f"the pretrained {type(self.pipeline).__name__} answers "
                               f"{', '.join(self.tasks())}, not {task!r}; leave out --task or "
                               "name one of those")

  def run(self, task: Optional[str], inputs: Sequence[str | pathlib.Path],
          output: str | os.PathLike, *,
          log: Callable[[str], None] = lambda s: print(s, flush=True),
          err: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
          ) -> Summary:
    """Predicts every input (its task(s): all the pipeline answers, or `task`)."""
    self.check_task(task)
    self._calls = 0

    def answer_batch(images: list[np.ndarray]) -> list:
      return [[(t, a) for t, a in self.task_answers(image) if task is None or t.name == task]
              for image in images]

    label = task or "+".join(self.tasks())
    return predict_files(label, inputs, output, 1, answer_batch, log=log, err=err)

  def task_answers(self, image: np.ndarray) -> list[tuple[tasks_lib.Task, Any]]:
    """[(task, its answer at the image's size)] for one image u8[H, W, 3]: one pipeline call
    (the pipeline keeps the aspect ratio: longer side to its processing resolution, answer
    resized back to the input's size)."""
    import jax  # pylint: disable=g-import-not-at-top
    output = self.pipeline(image, num_inference_steps=self.steps,
                           ensemble_size=self.ensemble_size, batch_size=self.batch_size,
                           processing_resolution=self.processing_resolution,
                           key=jax.random.fold_in(jax.random.key(self.seed), self._calls))
    self._calls += 1
    return [(t, a[0]) for t, a in self._answers.task_answers(self.pipeline, output)]

  def answer(self, images: Sequence[np.ndarray], task: str) -> list[Any]:
    """`task`'s answers for images u8[H, W, 3] of any sizes, each at its image's size."""
    self.check_task(task)
    return [next(a for t, a in self.task_answers(image) if t.name == task) for image in images]

  def task_object(self, task: str) -> tasks_lib.Task:
    """The task object of the pipeline's answers called `task`."""
    self.check_task(task)
    return next(t for t in self._answers.tasks(self.pipeline) if t.name == task)


def _unique_stems(paths: list) -> dict:
  """Output name prefix per input: its stem, or stem_ext when two inputs share a stem."""
  paths = [pathlib.Path(p) for p in paths]
  counts: dict[str, int] = {}
  for p in paths:
    counts[p.stem] = counts.get(p.stem, 0) + 1
  return {p: p.stem if counts[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}"
          for p in paths}


def run(workdir: Optional[str], task: Optional[str], input_path: str, output: str, *,
        batch_size: Optional[int] = None, steps: Optional[int] = None,
        pretrained: Optional[str] = None, ensemble_size: int = 1,
        processing_resolution: Optional[int] = None) -> int:
  """The `predict` command: a trained run (`workdir`) or a pretrained pipeline folder
  (`pretrained`); returns the exit code (non-zero only if no image was processed)."""
  if (workdir is None) == (pretrained is None):
    raise errors.ConfigError("predict needs either --workdir (a trained run) or --pretrained "
                             "(a diffusers Marigold-format folder), not both")
  if pretrained is not None:
    predictor = PretrainedPredictor(pretrained, steps=steps, ensemble_size=ensemble_size,
                                    batch_size=batch_size,
                                    processing_resolution=processing_resolution)
  else:
    if task is None:
      raise errors.ConfigError("predict --workdir needs --task (a task the run was trained on)")
    if ensemble_size != 1 or processing_resolution is not None:
      raise errors.ConfigError("--ensemble_size and --processing_resolution are for --pretrained "
                               "pipelines; a trained run answers at its model resolution")
    predictor = Predictor(workdir, batch_size=batch_size, steps=steps)
  predictor.check_task(task)  # before the (slow) model build
  summary = predictor.run(task, list_inputs(input_path), output)
  if not summary.written:
    print(f"error: none of the {len(summary.failed)} input files could be processed",
          file=sys.stderr)
  return summary.exit_code
