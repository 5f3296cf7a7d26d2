"""The task unit: everything the rest of the code asks about a dense task.

A task is a frozen dataclass registered under its name (`tasks.get(name, **options)`); its
dataclass fields are its options, which travel as data in a config's input entry
(`{"task": "depth", "task_options": {"max_depth": 8.0}}`). What the train loop, the evaluator,
the predictor and the demo need of it:

  prompt                      the text naming the task ("Perform depth estimation")
  encode(answer) -> rgb       f32[H, W, 3] in [-1, 1], the image the model learns to paint
  valid_mask(answer)          bool[H, W]: pixels whose answer is known (the loss skips others)
  decode(rgb) -> answer       (H, W, 3) or (N, H, W, 3) floats -> the answer (batched alike)
  label_key                   the example feature that holds the answer after a dataset's pp
  answer(example, prefix)     the answer read from an example's (label) features
  resize(answer, h, w)        the answer brought to another size (labels nearest, maps bilinear)
  image_loss(pred, target, valid)  a differentiable loss on RGB answers (jax), for paradigms
                              trained on the decoded image (GenPercept / E2E-FT)
  evaluator()                 accumulates the task's metrics and its trivial baseline
  headline, higher_is_better  the metric of the summary table, and which way is better
  write(out, stem, image, answer)  the prediction files of one image
  synthetic_source            which `synthetic_scenes` features hold its input and answer
  head                        the kind of dense head that answers it from backbone features

A composite task (`parts`, e.g. panoptic = semantic + instance) is not trained itself: its answer
is combined from the answers of its trained parts (`from_parts`, `combine`). Its parts are named
by family (`family`): variants of one task that differ in their label space, one per dataset
(`semantic`, `semantic_ade20k`, `semantic_coco`), are distinct tasks (own name, prompt, classes)
of one family, and a composite takes whichever of them carries what it needs
(`compose`; `part_names` says which trained tasks it combines).

`decode` accepts any float array of shape (H, W, 3) or (N, H, W, 3); values outside [-1, 1] are
clipped first, because a sampler's output is not guaranteed to stay in range.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dense_diffusion import registry

LABEL_PREFIX = "label/"  # evaluation examples keep the raw labels for the metrics under it.


class Evaluator:
  """Accumulates one task's metrics, and its trivial baseline, over an evaluation split.

  `update` takes, for the real examples of a batch, the decoded predictions already resized to
  their ground truth's size, the ground-truth answers (`Task.answer` of the example) and the
  model inputs f32[h, w, 3] in [-1, 1]. `result` returns {metric: value, "baseline": {...}}.
  """

  def __init__(self, task: "Task"):
    self.task = task

  def update(self, answers: Sequence[Any], truths: Sequence[Any],
             inputs: Sequence[np.ndarray]) -> None:
    raise NotImplementedError

  def result(self) -> dict:
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Task:
  """Base class. Subclasses set the class declarations below and implement `_encode` and
  `_decode_batch` (and, where they differ from the defaults, the other hooks)."""

  name: str = ""
  prompt: str = ""
  # True where the model's input image is already a rough answer (restoration: the degraded
  # image): a model may then predict a correction to its input (`model.input_residual`).
  input_is_estimate: bool = False

  # --- Declarations of the task kind (class attributes, not options). ---
  # The example feature holding the answer after a dataset's pp (e.g. "depth", "clean").
  label_key: ClassVar[str] = ""
  # How answers and label maps are resized: "nearest" (labels, ids) or "bilinear".
  interpolation: ClassVar[str] = "bilinear"
  # A horizontal flip of the answer also negates its x component (surface normals).
  flip_negates_x: ClassVar[bool] = False
  # The metric the summary table shows, and its direction.
  headline: ClassVar[str] = ""
  higher_is_better: ClassVar[bool] = True
  # How `synthetic_scenes` provides this task: copy(src, dst) renames applied in order to its
  # features before the shared pp, e.g. denoise: (("image", "clean"), ("noisy", "image")) (the
  # clean render is the answer, the noisy one the input).
  synthetic_source: ClassVar[tuple[tuple[str, str], ...]] = ()
  # Composite tasks: the families of the trained tasks whose answers `combine` merges.
  parts: ClassVar[tuple[str, ...]] = ()
  # The kind of answer, shared by a task's variants (one label space per dataset: the
  # `semantic_coco` task is of family "semantic"); "" = the task's own registered name.
  family: ClassVar[str] = ""
  # The kind of dense head that answers this task directly from backbone features (the VPD
  # paradigm, paradigms/backbone.py): "rgb" (the RGB encoding itself), "depth" (a sigmoid code
  # in [0, 1], scale-invariant log loss), "normals" (unit vectors, angular loss) or "classes"
  # (logits over the task's classes, cross-entropy).
  head: ClassVar[str] = "rgb"

  # --- Encoding. ---
  def encode(self, answer: Any) -> np.ndarray:
    """answer (task-specific, one example) -> f32[H, W, 3] in [-1, 1]."""
    rgb = np.asarray(self._encode(answer), np.float32)
    return np.clip(rgb, -1.0, 1.0)

  def valid_mask(self, answer: Any) -> np.ndarray:
    """bool[H, W]: where the answer is known. Default: everywhere."""
    return np.ones(np.shape(answer)[:2], bool)

  def decode(self, rgb: Any) -> Any:
    """f32[H, W, 3] or f32[N, H, W, 3] -> the answer (batched like the input)."""
    rgb, batched = as_rgb_batch(rgb, self.name)
    out = self._decode_batch(rgb)
    return out if batched else _first(out)

  def _encode(self, answer: Any) -> np.ndarray:
    raise NotImplementedError

  def _decode_batch(self, rgb: np.ndarray) -> Any:
    """f32[N, H, W, 3] clipped to [-1, 1] -> batched answer."""
    raise NotImplementedError

  # --- Reading and resizing answers. ---
  def answer(self, example: Mapping[str, Any], prefix: str = LABEL_PREFIX) -> Any:
    """The ground-truth answer held by an example (its `prefix + label_key` feature)."""
    return np.asarray(example[prefix + self.label_key])

  def answer_size(self, answer: Any) -> tuple[int, int]:
    """(H, W) of an answer."""
    shape = np.shape(answer)
    return int(shape[0]), int(shape[1])

  def resize(self, answer: Any, height: int, width: int) -> Any:
    """The answer at (height, width), with the task's interpolation."""
    return resize_map(answer, height, width, nearest=self.interpolation == "nearest")

  # --- Training on the decoded answer. ---
  def image_loss(self, pred: jax.Array, target: jax.Array, valid: jax.Array | None
                 ) -> jax.Array:
    """f32[B]: a loss of predicted RGB answers f32[B, H, W, 3] against the encoded targets, over
    the known pixels (`valid` bool[B, H, W, 1]). Default: mean squared error in RGB (for labels
    the RGB equivalent of a classification loss). Differentiable (jax), runs inside the step."""
    return masked_mean(jnp.square(pred - target), valid)

  # --- Evaluation and prediction files. ---
  def evaluator(self) -> Evaluator:
    raise NotImplementedError(f"task {self.name!r} has no evaluator")

  def write(self, out: Any, stem: str, image: np.ndarray, answer: Any) -> list:
    """Writes the prediction files of one input (u8[H, W, 3]) into `out` (an epath.Path
    folder); returns their paths."""
    raise NotImplementedError(f"task {self.name!r} has no prediction writer")

  # --- Composite tasks. ---
  @classmethod
  def from_parts(cls, parts: Mapping[str, "Task"]) -> Optional["Task"]:
    """The composite built from its trained parts' task objects, or None when the parts lack
    what it needs (e.g. panoptic without the category list)."""
    del parts
    return None

  def combine(self, part_answers: Mapping[str, Any]) -> Any:
    """The composite's answer from its parts' answers (all at one size), keyed by part family."""
    raise NotImplementedError(f"task {self.name!r} is not composite")

  def part_names(self) -> dict[str, str]:
    """Composite tasks: {part family: the trained task answering it} (default: the family's
    own task)."""
    return {p: p for p in self.parts}

  def options(self) -> dict:
    """The task's options (its dataclass fields other than name and prompt)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in ("name", "prompt", "input_is_estimate")}


def _first(out):
  if isinstance(out, (np.ndarray, list)):
    return out[0]
  if isinstance(out, tuple):
    return tuple(_first(o) for o in out)
  if isinstance(out, dict):
    return {k: _first(v) for k, v in out.items()}
  return out


def as_rgb_batch(rgb: Any, task_name: str, channels: int = 3) -> tuple[np.ndarray, bool]:
  """Validates a decoder input and returns (f32[N, H, W, C] clipped to [-1, 1], was_batched)."""
  rgb = np.asarray(rgb)
  if rgb.ndim not in (3, 4) or rgb.shape[-1] != channels:
    raise ValueError(
        f"{task_name}.decode expects an array of shape (H, W, {channels}) or "
        f"(N, H, W, {channels}), got shape {rgb.shape}")
  if not np.issubdtype(rgb.dtype, np.floating):
    raise ValueError(
        f"{task_name}.decode expects floats in [-1, 1], got dtype {rgb.dtype}; convert uint8 "
        "images with x / 127.5 - 1 first")
  nonfinite = int(np.size(rgb) - np.count_nonzero(np.isfinite(rgb)))
  if nonfinite:
    raise ValueError(f"{task_name}.decode got {nonfinite} non-finite values (NaN or inf)")
  batched = rgb.ndim == 4
  rgb = np.clip(rgb.astype(np.float32), -1.0, 1.0)
  return (rgb if batched else rgb[None]), batched


def grey(value01: np.ndarray) -> np.ndarray:
  """f32[..., H, W] in [0, 1] -> f32[..., H, W, 3] grey in [-1, 1]."""
  v = np.clip(np.asarray(value01, np.float32), 0.0, 1.0) * 2.0 - 1.0
  return np.repeat(v[..., None], 3, axis=-1)


def channel_mean01(rgb: np.ndarray) -> np.ndarray:
  """f32[..., 3] in [-1, 1] -> f32[...] in [0, 1]: the inverse of `grey`."""
  return (rgb.mean(axis=-1) + 1.0) * 0.5


def check_map(x: Any, task_name: str, what: str, ndim: int = 2) -> np.ndarray:
  """Checks that an answer map has `ndim` dimensions (a trailing singleton channel is dropped)."""
  x = np.asarray(x)
  if x.ndim == ndim + 1 and x.shape[-1] == 1:
    x = x[..., 0]
  if x.ndim != ndim:
    raise ValueError(f"{task_name}.encode expects {what}, got shape {x.shape}")
  return x


def masked_mean(values: jax.Array, valid: jax.Array | None) -> jax.Array:
  """f32[B]: per-example mean of values f32[B, H, W, C] over the known pixels (all if None)."""
  axes = tuple(range(1, values.ndim))
  if valid is None:
    return jnp.mean(values, axis=axes)
  m = jnp.broadcast_to(jnp.asarray(valid, values.dtype), values.shape)
  return jnp.sum(values * m, axis=axes) / jnp.maximum(jnp.sum(m, axis=axes), 1.0)


def resize_map(x: np.ndarray, height: int, width: int, nearest: bool) -> np.ndarray:
  """[h, w] or [h, w, C] -> [height, width(, C)]; nearest keeps the dtype (labels), bilinear
  (PIL, antialiased when shrinking) gives float32."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
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


TASKS: registry.Registry = registry.Registry("task")


def register(name: str):
  """Class decorator: makes `tasks.get(name, **options)` build this task."""
  return TASKS.register(name)


def get(name: str, **options) -> Task:
  """Builds the task called `name` with its options (e.g. `get("semantic", num_classes=150)`)."""
  return registry.call_with_options("task", name, TASKS.get(name), options)


def names() -> list[str]:
  return TASKS.names()


def family(name: str) -> str:
  """The family of the registered task `name` (its own name unless it declares one)."""
  return TASKS.get(name).family or name


def compose(name: str, trained: Sequence[Task]) -> Optional[Task]:
  """The composite task `name` built from trained tasks (in their order), or None.

  Each part family may be answered by several trained tasks (variants with their own label
  spaces); the first combination, in the order of `trained`, whose `from_parts` gives a task
  wins (e.g. panoptic takes the semantic variant that carries thing / stuff categories).
  """
  import itertools  # pylint: disable=g-import-not-at-top
  cls = TASKS.get(name)
  options = [[t for t in trained if family(t.name) == p] for p in cls.parts]
  for chosen in itertools.product(*options):
    composite = cls.from_parts(dict(zip(cls.parts, chosen)))
    if composite is not None:
      return composite
  return None


def composites() -> list[str]:
  """Names of the composite tasks (combined from trained parts, not trained themselves)."""
  return [n for n, cls in TASKS.items() if cls.parts]


def from_entry(entry: Mapping[str, Any]) -> Task:
  """The task object of an input entry: `tasks.get(entry["task"], **entry["task_options"])`."""
  options = entry.get("task_options") or {}
  options = options.to_dict() if hasattr(options, "to_dict") else dict(options)
  return get(entry["task"], **options)
