"""Prediction on the user's own images: images in, task outputs and visualisations out.

    python -m dense_diffusion.main predict --workdir runs/demo --task depth \
        --input photos/ --output out/

The run's config (`<workdir>/config.json`) rebuilds the model, the latest checkpoint is restored
(EMA parameters by default) and the configured sampler predicts the RGB-encoded answer of every
image, which the task object of the run (with the options of its input entry) decodes. Images of
any size and of any PIL mode (grey, palette, RGBA, 16-bit) are converted to RGB, resized to the
model resolution, predicted in padded batches, and the answer is resized back to the original
size (nearest for labels, bilinear for continuous maps). What is written per task is in
`WRITERS` and docs/predict.md.
"""
from __future__ import annotations

import dataclasses
import json
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

from dense_diffusion import tasks as tasks_lib
from dense_diffusion import workdir as workdir_lib

# Continuous maps are resized bilinearly, label maps with nearest neighbour.
LABEL_TASKS = ("semantic", "instance")
DEPTH_PNG_SCALE = 1000.0  # depth PNG: uint16 millimetres (metres * 1000), 0 = invalid/too far.
UINT16_MAX = 65535
DEPTH_COLORMAP = "Spectral_r"  # matplotlib colormap of the depth preview (near = blue).
OVERLAY_ALPHA = 0.5  # weight of the label colours in the overlays.


# --- images ---------------------------------------------------------------------------------


def list_inputs(path: str | pathlib.Path) -> list[pathlib.Path]:
  """A file, or every non-hidden file of a folder (sorted; not recursive)."""
  path = pathlib.Path(path)
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
      raise FileNotFoundError(f"no files in the input folder {path}")
    return files
  raise FileNotFoundError(f"--input {path} is neither a file nor a folder")


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


def to_model_input(image: np.ndarray, size: int) -> np.ndarray:
  """u8[H, W, 3] -> f32[size, size, 3] in [-1, 1] (bilinear, antialiased when shrinking)."""
  resized = Image.fromarray(image).resize((size, size), Image.BILINEAR)
  return np.asarray(resized, np.float32) / 127.5 - 1.0


def resize_map(x: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
  """[h, w] or [h, w, C] -> [height, width(, C)]; nearest keeps the dtype (labels)."""
  x = np.asarray(x)
  h, w = x.shape[:2]
  if (h, w) == (height, width):
    return x
  if nearest:
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return x[rows[:, None], cols[None, :]]
  channels = x[..., None] if x.ndim == 2 else x
  out = np.stack([np.asarray(Image.fromarray(channels[..., c].astype(np.float32), "F").resize(
      (width, height), Image.BILINEAR)) for c in range(channels.shape[-1])], axis=-1)
  return out[..., 0] if x.ndim == 2 else out


# --- writers: one per task --------------------------------------------------------------------


def _u8(x01: np.ndarray) -> np.ndarray:
  return np.round(np.clip(x01, 0.0, 1.0) * 255.0).astype(np.uint8)


def _overlay(image: np.ndarray, colours: np.ndarray, mask: Optional[np.ndarray] = None
             ) -> np.ndarray:
  """Blends u8 colours over u8 image where `mask` (everywhere when None)."""
  blend = (1 - OVERLAY_ALPHA) * image.astype(np.float32) + OVERLAY_ALPHA * colours
  if mask is not None:
    blend = np.where(mask[..., None], blend, image)
  return np.round(blend).clip(0, 255).astype(np.uint8)


def _id_colours(ids: np.ndarray) -> np.ndarray:
  """u8[H, W, 3] colours of integer ids (fixed pseudo-random colour per id; 0 = black)."""
  top = int(ids.max(initial=0))
  table = np.random.default_rng(0).integers(40, 256, (top + 1, 3)).astype(np.uint8)
  table[0] = 0
  return table[ids]


def _save(path: epath.Path, array: np.ndarray) -> epath.Path:
  """u8[H, W, 3] -> RGB PNG, u16[H, W] -> 16-bit grey PNG."""
  _save_image(path, Image.fromarray(array))
  return path


def _save_image(path: epath.Path, img: Image.Image) -> None:
  # Through epath's file object, so that --output may be gs:// (PIL opens only local paths).
  with path.open("wb") as f:
    img.save(f, format="PNG")


def semantic_palette_png(labels: np.ndarray, task: Any) -> Image.Image:
  """i32[H, W] class indices (255 = ignore) -> PIL "P" image, index = class, task's colours."""
  colours = _u8((np.asarray(task.palette) + 1.0) * 0.5)  # row c + 1 is class c
  table = np.zeros((256, 3), np.uint8)
  table[:task.num_classes] = colours[1:task.num_classes + 1]
  table[tasks_lib.IGNORE_LABEL] = colours[0]
  img = Image.fromarray(np.asarray(labels).astype(np.uint8), "L").convert("P")
  img.putpalette(table.reshape(-1).tolist())
  return img


def _write_depth(out, stem, image, depth, task, **_):
  if task.affine_invariant:
    # Relative depth in [0, 1] (no metric scale): stored as v * 65535.
    coded = np.round(np.clip(depth, 0.0, 1.0) * UINT16_MAX)
  else:
    coded = np.round(np.clip(depth * DEPTH_PNG_SCALE, 0, UINT16_MAX))
  paths = [_save(out / f"{stem}_depth.png", coded.astype(np.uint16))]
  from matplotlib import colormaps
  lo, hi = float(np.min(depth)), float(np.max(depth))
  v = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
  rgb = colormaps[DEPTH_COLORMAP](v)[..., :3]
  paths.append(_save(out / f"{stem}_depth_color.png", _u8(rgb)))
  return paths


def _write_normals(out, stem, image, normals, task, **_):
  return [_save(out / f"{stem}_normals.png", _u8((normals + 1.0) * 0.5))]


def _write_semantic(out, stem, image, labels, task, **_):
  img = semantic_palette_png(labels, task)
  path = out / f"{stem}_semantic.png"
  _save_image(path, img)
  colours = np.asarray(img.convert("RGB"))
  overlay = _overlay(image, colours, mask=labels != tasks_lib.IGNORE_LABEL)
  return [path, _save(out / f"{stem}_semantic_overlay.png", overlay)]


def _write_instance(out, stem, image, ids, task, **_):
  ids = np.asarray(ids)
  if ids.max(initial=0) > UINT16_MAX:
    raise ValueError(f"{ids.max()} instances do not fit a 16-bit PNG")
  return [_save(out / f"{stem}_instance.png", ids.astype(np.uint16)),
          _save(out / f"{stem}_instance_overlay.png",
                _overlay(image, _id_colours(ids), mask=ids > 0))]


def _write_image(out, stem, image, rgb01, task, **_):
  return [_save(out / f"{stem}_{task.name}.png", _u8(rgb01))]


def _write_shading(out, stem, image, shading, task, **_):
  # s / max_shading in [0, 1] stored as uint16 0..65535.
  coded = np.round(np.clip(shading / task.max_shading, 0.0, 1.0) * UINT16_MAX)
  return [_save(out / f"{stem}_shading.png", coded.astype(np.uint16))]


def panoptic_id_rgb(ids: np.ndarray) -> np.ndarray:
  """i32[H, W] segment ids -> u8[H, W, 3] with id = R + 256 G + 256^2 B (COCO panoptic PNG)."""
  ids = np.asarray(ids, np.int64)
  return np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], -1).astype(np.uint8)


def _bbox(mask: np.ndarray) -> list[int]:
  ys, xs = np.nonzero(mask)
  if not len(ys):
    return [0, 0, 0, 0]
  return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _write_panoptic(out, stem, image, answer, task, **_):
  ids = np.asarray(answer["ids"])
  png = out / f"{stem}_panoptic.png"
  _save(png, panoptic_id_rgb(ids))
  names = {int(c["id"]): c.get("name", str(c["id"])) for c in task.categories}
  segments = [{"id": int(s["id"]), "category_id": int(s["category_id"]),
               "category_name": names[int(s["category_id"])], "iscrowd": 0,
               "isthing": int(bool(s["isthing"])), "area": int(np.sum(ids == s["id"])),
               "bbox": _bbox(ids == s["id"])} for s in answer["segments"]]
  record = {"image_id": stem, "file_name": png.name, "height": int(ids.shape[0]),
            "width": int(ids.shape[1]), "segments_info": segments,
            "categories": [dict(c) for c in task.categories]}
  js = out / f"{stem}_panoptic.json"
  js.write_text(json.dumps(record, indent=1))
  overlay = _overlay(image, _id_colours(ids), mask=ids > 0)
  return [png, js, _save(out / f"{stem}_panoptic_overlay.png", overlay)]


# task name -> writer(out_dir, stem, image u8[H,W,3], answer at full size, task) -> paths.
WRITERS: dict[str, Callable[..., list[epath.Path]]] = {
    "depth": _write_depth,
    "normals": _write_normals,
    "semantic": _write_semantic,
    "instance": _write_instance,
    "panoptic": _write_panoptic,
    "albedo": _write_image,
    "denoise": _write_image,
    "derain": _write_image,
    "lowlight": _write_image,
    "shading": _write_shading,
}


def _unit_normals(full: dict, task: Any) -> np.ndarray:
  n = full["normals"]  # bilinear resizing shortens the vectors between pixels
  return n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-6)


# task -> f(answers resized to the original size by decoded task name, writer task) -> answer;
# tasks not listed take their own decoded map as it is.
FULL_SIZE_ANSWER: dict[str, Callable[[dict, Any], Any]] = {
    "normals": _unit_normals,
    "panoptic": lambda full, task: task.merge(full["semantic"], full["instance"]),
}


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


def _entry_task(config: Any, name: str) -> tasks_lib.Task:
  from dense_diffusion import evaluate
  for entry in config.input.entries:
    entry = dict(entry)
    task = evaluate.task_from_pp(entry.get("pp_eval") or entry["pp"])
    if task.name == name:
      return task
  raise ValueError(f"no input entry of the config encodes task {name!r}, so its decoding "
                   "options are unknown")


def _panoptic_categories(config: Any) -> Optional[list[dict]]:
  categories = config.get("eval", {}).get("panoptic_categories")
  if categories:
    return [dict(c) for c in categories]
  if any(dict(e)["dataset"].startswith("synthetic_scenes") for e in config.input.entries):
    from dense_diffusion.datasets.synthetic_scenes import renderer
    return [dict(c) for c in renderer.CATEGORIES]
  return None


def check_task(config: Any, task: str, workdir: str = "") -> None:
  """Raises a ValueError naming the trained tasks when `task` cannot be predicted by this run."""
  trained = list(config.tasks)
  available = trained + (["panoptic"] if {"semantic", "instance"} <= set(trained) else [])
  if task not in available:
    hint = ("; panoptic needs a run trained on both semantic and instance"
            if task == "panoptic" else "")
    where = f" ({workdir})" if workdir else ""
    also = " (and panoptic)" if "panoptic" in available else ""
    raise ValueError(f"task {task!r} was not trained in this run{where}; trained tasks: "
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
    from dense_diffusion import train
    self.workdir = str(workdir)
    self.config = train.load_config(workdir)
    if steps is not None:
      if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
      self.config.diffusion.num_inference_steps = int(steps)
    self.resolution = int(self.config.model.unet["sample_size"])
    self.use_ema = use_ema
    self.seed = seed
    self._requested_batch = batch_size
    self._setup = None

  def check_task(self, task: str) -> None:
    check_task(self.config, task, self.workdir)

  def _load(self) -> None:
    """Builds the model and restores the latest checkpoint (once)."""
    if self._setup is not None:
      return
    import jax
    from dense_diffusion import checkpointing
    from dense_diffusion import train

    setup = train.Setup(self.config)
    shards = math.prod(setup.mesh.shape[a] for a in ("data", "fsdp"))
    batch = self._requested_batch or int(self.config.eval.get("batch_size", shards))
    if batch < 1 or batch % shards:
      raise ValueError(f"batch size {batch} does not divide over the {shards} data-parallel "
                       "shards of the mesh; use a multiple of that")
    self.batch_size = batch
    checkpointer = checkpointing.Checkpointer(
        os.fspath(workdir_lib.WorkdirPaths(self.workdir).checkpoints), async_save=False)
    with jax.set_mesh(setup.mesh):
      step, state = checkpointer.restore_latest(setup.state)
    checkpointer.close()
    if state is None:
      raise FileNotFoundError(f"no checkpoint in {self.workdir}/checkpoints")
    self.step = int(step)
    self.params = state.ema if self.use_ema else state.params
    self._sample = setup.make_sampler()
    self._setup = setup

  def predict_rgb(self, images: np.ndarray, task: str, batch_index: int = 0) -> np.ndarray:
    """f32[N, R, R, 3] model inputs in [-1, 1] (N <= batch size) -> f32[N, R, R, 3] answers."""
    import jax
    self._load()
    setup = self._setup
    n = len(images)
    if n > self.batch_size:
      raise ValueError(f"{n} images exceed the batch size {self.batch_size}")
    padded = np.zeros((self.batch_size,) + images.shape[1:], np.float32)
    padded[:n] = images
    task_ids = np.full((self.batch_size,), setup.task_names.index(task), np.int32)
    key = jax.random.fold_in(jax.random.key(self.seed), batch_index)
    with jax.set_mesh(setup.mesh):
      batch = setup.device_batch({"image": padded, "target": padded, "task": task_ids})
      pred = self._sample(self.params, setup.frozen, batch["image"], batch["task"], key)
      pred = np.asarray(jax.device_get(pred))
    return np.clip(pred[:n], -1.0, 1.0)

  def _decoders(self, task: str) -> list[tuple[str, Any]]:
    names = ["semantic", "instance"] if task == "panoptic" else [task]
    return [(n, _entry_task(self.config, n)) for n in names]

  def run(self, task: str, inputs: Sequence[str | pathlib.Path], output: str | os.PathLike,
          *, log: Callable[[str], None] = lambda s: print(s, flush=True),
          err: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
          ) -> Summary:
    """Predicts `task` for every input file; writes the outputs into `output`."""
    self.check_task(task)
    decoders = self._decoders(task)
    writer_task = decoders[0][1]
    if task == "panoptic":
      categories = _panoptic_categories(self.config)
      if not categories:
        raise ValueError("panoptic needs the categories: set config.eval.panoptic_categories")
      if len(categories) != decoders[0][1].num_classes:
        raise ValueError(f"{len(categories)} panoptic categories but the semantic task has "
                         f"{decoders[0][1].num_classes} classes; set "
                         "config.eval.panoptic_categories to the semantic classes in order")
      writer_task = tasks_lib.get("panoptic", categories=categories,
                                  instance_options=_task_options(decoders[1][1]))
    self._load()
    out = epath.Path(output)  # a local folder or gs://
    out.mkdir(parents=True, exist_ok=True)
    stems = _unique_stems(list(inputs))
    summary = Summary()
    pending: list[tuple[pathlib.Path, str, np.ndarray]] = []
    batch_index = 0
    total = len(inputs)
    start = time.time()

    def flush():
      nonlocal batch_index
      if not pending:
        return
      model_in = np.stack([to_model_input(img, self.resolution) for _, _, img in pending])
      answers = {}
      for name, dec in decoders:
        rgb = self.predict_rgb(model_in, name, batch_index)
        answers[name] = dec.decode(rgb)
      for i, (path, stem, img) in enumerate(pending):
        h, w = img.shape[:2]
        full = {name: resize_map(answers[name][i], h, w, nearest=name in LABEL_TASKS)
                for name, _ in decoders}
        answer = FULL_SIZE_ANSWER.get(task, lambda f, _: f[task])(full, writer_task)
        try:
          summary.outputs.extend(WRITERS[task](out, stem, img, answer, writer_task))
          summary.written += 1
        except OSError as e:
          summary.failed.append((path, f"cannot write its outputs: {e}"))
          err(f"error: {path}: cannot write its outputs ({e})")
      batch_index += 1
      log(f"batch {batch_index}: {len(pending)} images ({summary.written} written, "
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
      if len(pending) == self.batch_size:
        flush()
    flush()
    log(f"{task}: {summary.written} written, {len(summary.failed)} failed (of {total} files) "
        f"-> {out}")
    return summary


def _task_options(task: Any) -> dict:
  return {f.name: getattr(task, f.name) for f in dataclasses.fields(task)
          if f.name not in ("name", "prompt")}


def _unique_stems(paths: list) -> dict:
  """Output name prefix per input: its stem, or stem_ext when two inputs share a stem."""
  paths = [pathlib.Path(p) for p in paths]
  counts: dict[str, int] = {}
  for p in paths:
    counts[p.stem] = counts.get(p.stem, 0) + 1
  return {p: p.stem if counts[p.stem] == 1 else f"{p.stem}_{p.suffix.lstrip('.')}"
          for p in paths}


def run(workdir: str, task: str, input_path: str, output: str, *,
        batch_size: Optional[int] = None, steps: Optional[int] = None) -> int:
  """The `predict` command; returns the exit code (non-zero only if no image was processed)."""
  predictor = Predictor(workdir, batch_size=batch_size, steps=steps)
  predictor.check_task(task)  # before the (slow) model build
  summary = predictor.run(task, list_inputs(input_path), output)
  if not summary.written:
    print(f"error: none of the {len(summary.failed)} input files could be processed",
          file=sys.stderr)
  return summary.exit_code
