"""tf.data input pipeline: read TFDS splits, check, preprocess, mix tasks, shard per host, batch.

A config is a list of entries (dicts or ml_collections.ConfigDicts), one per (dataset, task):

    {"dataset": "synthetic_scenes/res128", "split": "train", "task": "depth",
     "task_options": {"max_depth": 8.0}, "pp": 'value_range(-1, 1)', "weight": 1.0}

and a list of task names; every example of the training stream is (DESIGN.md s.2)
`{"image": f32[B, R, R, 3] in [-1, 1], "target": f32[B, R, R, 3], "valid": bool[B, R, R, 1],
"task": i32[B]}` where `task` indexes the task list. An entry's `pp` must leave `image` (already
in [-1, 1]) and the task's answer under the task's `label_key`; the pipeline then encodes it with
the entry's task object (`tasks.from_entry`: `target` = `task.encode(answer)`, `valid` =
`task.valid_mask(answer)`, the pixels whose answer is known). A panoptic dataset is two entries,
`semantic` and `instance`, with two prompts (docs/data.md).

Before preprocessing, every example is checked: every image feature must decode and every image
and label map (rank >= 2) must share one height and width. A bad example is reported with the
dataset, split and example key; `on_bad_example="fail"` raises, `"skip"` drops, logs and counts
it (`bad_examples()`). An entry's `expect_metadata` (what its task options assume of the
dataset's TFDS metadata: a pseudo-labelled set records the options its labels are in) is
checked when the dataset is opened; a dataset that does not fit is a one-line ConfigError.
"""
from __future__ import annotations

import collections
import io
import json
import math
import threading
from typing import Any, Iterable, Mapping, Sequence

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

import dense_diffusion.datasets  # noqa: F401  (registers our builders with TFDS)
from dense_diffusion import errors
from dense_diffusion import pp as pp_lib
from dense_diffusion import tasks as tasks_lib

ON_BAD_EXAMPLE = ("fail", "skip")
EVAL_PREFIX = tasks_lib.LABEL_PREFIX  # keys kept by the eval stream besides image/target/task/mask

_ENTRY_DEFAULTS = {"split": "train", "weight": 1.0, "pp": "", "data_dir": None,
                   "check_keys": None, "features": None, "task_options": None,
                   "expect_metadata": None}


class BadExampleError(ValueError):
  """A corrupt image or mismatched label map, with dataset, split and example key."""


# -- Bad example bookkeeping ----------------------------------------------------------------------
_BAD_LOCK = threading.Lock()
_BAD: dict[tuple[str, str], list[str]] = collections.defaultdict(list)


def bad_examples() -> dict[tuple[str, str], list[str]]:
  """{(dataset, split): [example key: reason, ...]} of the examples skipped so far."""
  with _BAD_LOCK:
    return {k: list(v) for k, v in _BAD.items()}


def reset_bad_examples() -> None:
  with _BAD_LOCK:
    _BAD.clear()


# -- Entries ---------------------------------------------------------------------------------------
def _as_entry(entry: Any) -> dict:
  entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
  for key in ("dataset", "task"):
    if key not in entry:
      raise errors.ConfigError(f"input entry {entry} lacks {key!r}")
  unknown = set(entry) - set(_ENTRY_DEFAULTS) - {"dataset", "task", "pp_eval", "eval_split",
                                                 "pad_values", "eval_features"}
  if unknown:
    raise errors.ConfigError(f"input entry for {entry['dataset']} has unknown keys "
                             f"{sorted(unknown)}")
  return {**_ENTRY_DEFAULTS, **entry}


def _json(value: Any) -> Any:
  """`value` as JSON holds it (tuples as lists, ConfigDicts as dicts)."""
  value = value.to_dict() if hasattr(value, "to_dict") else value
  return json.loads(json.dumps(value))


def _missing_metadata(expected: Any, found: Any, path: str) -> list[str]:
  """The places where `found` lacks or differs from `expected` (dicts: only the keys
  `expected` has)."""
  if isinstance(expected, dict):
    if not isinstance(found, dict):
      return [f"{path} is {found!r}, expected {expected!r}"]
    return [m for k, v in expected.items()
            for m in _missing_metadata(v, found.get(k), f"{path}.{k}" if path else k)]
  return [] if expected == found else [f"{path} is {found!r}, expected {expected!r}"]


def check_metadata(entry: dict, builder: Any) -> None:
  """The entry's `expect_metadata` (what its task options assume of the dataset, e.g. the
  options a pseudo-labelled set's labels were made in) against the dataset's metadata."""
  expected = _json(entry.get("expect_metadata") or {})
  if not expected:
    return
  found = _json(dict(builder.info.metadata or {}))
  wrong = _missing_metadata(expected, found, "")
  if wrong:
    raise errors.ConfigError(
        f"input entry {_entry_name(entry)} does not fit the dataset in {builder.data_dir}: its "
        f"metadata {'; '.join(wrong)} (make the entry from the dataset itself, e.g. "
        "readers.pseudo_labelled(task, path=...))")


def encode_answer(task: tasks_lib.Task, name: str):
  """Example fn: the task's answer (`task.label_key`) -> `target` f32[H, W, 3] (its encoding)
  and `valid` bool[H, W, 1] (where the answer is known), through the task object itself."""
  key = task.label_key

  def np_encode(answer):
    return task.encode(answer).astype(np.float32), task.valid_mask(answer)[..., None]

  def encode(ex):
    if key not in ex:
      raise errors.ConfigError(f"the pp of {name} must leave the {task.name} answer under "
                               f"{key!r}; it leaves {sorted(ex)}")
    answer = ex[key]
    target, valid = tf.numpy_function(np_encode, [answer], [tf.float32, tf.bool],
                                      stateful=False)
    target.set_shape(answer.shape[:2].concatenate([3]))
    valid.set_shape(answer.shape[:2].concatenate([1]))
    return {**ex, "target": target, "valid": valid}
  return encode


def _process(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # Only for the defaults: the pipeline itself does not need jax.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _image_features(builder) -> dict[str, int]:
  """{top-level key: channels} of the builder's Image features (read undecoded, checked first)."""
  out = {}
  for key, feature in builder.info.features.items():
    if isinstance(feature, tfds.features.Image):
      out[key] = int(feature.shape[-1] or 3)
  return out


def _inspect_image(data: bytes) -> tuple[bool, int, int, str]:
  """Header-level check of encoded image bytes with PIL: (ok, height, width, reason)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as im:
      width, height = im.size
      im.verify()
    return True, height, width, ""
  except Exception as e:  # noqa: BLE001  (any PIL failure means a corrupt file)
    return False, -1, -1, f"{type(e).__name__}: {e}"


def _check(ds: tf.data.Dataset, *, name: str, split: str, image_keys: Mapping[str, int],
           check_keys: Sequence[str] | None, on_bad_example: str) -> tf.data.Dataset:
  """Validates every example (see module doc) while its images are still encoded."""
  if on_bad_example not in ON_BAD_EXAMPLE:
    raise ValueError(f"on_bad_example must be one of {ON_BAD_EXAMPLE}, got {on_bad_example!r}")
  spec = ds.element_spec
  if check_keys is None:
    check_keys = [k for k, s in spec.items()
                  if k in image_keys or (isinstance(s, tf.TensorSpec) and s.shape.rank
                                         and s.shape.rank >= 2)]
  check_keys = list(check_keys)
  img_keys = [k for k in check_keys if k in image_keys]
  tensor_keys = [k for k in check_keys if k not in image_keys]

  def inspect(*blobs):
    oks, hws, reasons = [], [], []
    for key, blob in zip(img_keys, blobs):
      ok, h, w, why = _inspect_image(bytes(blob))
      oks.append(ok)
      hws.append((h, w))
      if not ok:
        reasons.append(f"{key} does not decode ({why})")
    return (np.array(oks, bool), np.array(hws, np.int32).reshape(-1, 2),
            "; ".join(reasons).encode())

  def report(ok, example_id, reason):
    if ok:
      return np.bool_(True)
    msg = (f"bad example in dataset {name!r} split {split!r} key "
           f"{example_id.decode(errors='replace')}: {reason.decode(errors='replace')}")
    if on_bad_example == "fail":
      raise BadExampleError(msg)
    logging.warning("skipping %s", msg)
    with _BAD_LOCK:
      _BAD[(name, split)].append(f"{example_id.decode(errors='replace')}: "
                                 f"{reason.decode(errors='replace')}")
    return np.bool_(False)

  def check(ex):
    if img_keys:
      oks, hws, reason = tf.numpy_function(inspect, [ex[k] for k in img_keys],
                                           [tf.bool, tf.int32, tf.string], stateful=False)
      oks.set_shape([len(img_keys)])
      hws.set_shape([len(img_keys), 2])
    else:
      oks, hws, reason = tf.ones([0], tf.bool), tf.zeros([0, 2], tf.int32), tf.constant("")
    sizes = tf.concat([hws] + [tf.shape(ex[k])[None, :2] for k in tensor_keys], 0)
    decodes = tf.reduce_all(oks)
    same = tf.reduce_all(sizes == sizes[:1]) if check_keys else tf.constant(True)
    # (No keys to check, e.g. only `features=["key"]` read: an empty list is no string tensor.)
    size_msg = tf.strings.reduce_join(
        [tf.strings.format("{}={}", (k, s)) for k, s in
         zip(img_keys + tensor_keys, tf.unstack(sizes, num=len(check_keys)))], separator=", "
    ) if check_keys else tf.constant("")
    reason = tf.where(decodes, tf.where(same, tf.constant(""),
                                        "label/image sizes differ: " + size_msg), reason)
    example_id = ex.get("tfds_id", tf.constant("<no tfds_id>"))
    for key_feature in ("key", "image/filename"):  # the builder's own example key, if stored
      if key_feature in ex and ex[key_feature].dtype == tf.string:
        example_id = tf.strings.join([ex[key_feature], " (", example_id, ")"])
        break
    ok = tf.numpy_function(report, [decodes & same, example_id, reason], tf.bool, stateful=True)
    ok.set_shape([])
    return ok

  return ds.filter(check)


def _decode_images(image_keys: Mapping[str, int]):
  """Example fn decoding the (checked) encoded image features to uint8 [H, W, C]."""
  def decode(ex):
    ex = dict(ex)
    for key, channels in image_keys.items():
      if key in ex and ex[key].dtype == tf.string:
        img = tf.io.decode_image(ex[key], channels=channels, expand_animations=False)
        img.set_shape([None, None, channels])
        ex[key] = img
    return ex
  return decode


def read_split(dataset: str, split: str, *, data_dir: str | None = None,
               process_index: int | None = None, process_count: int | None = None,
               shuffle_files: bool = False, seed: int = 0, on_bad_example: str = "fail",
               check_keys: Sequence[str] | None = None, features: Sequence[str] | None = None,
               drop_remainder: bool = False, shuffle_buffer: int = 0,
               repeat: bool = False) -> tuple[tf.data.Dataset, Any]:
  """This host's share of a TFDS split: read, checked, (shuffled, repeated,) images decoded.

  Args:
    features: top-level features to read (default all); others are never parsed.
    shuffle_buffer: > 0 shuffles the examples (seeded) while images are still encoded, which
      keeps the buffer small.
    repeat: repeat forever (after the shuffle, before decoding).

  Returns (dataset of example dicts incl. `tfds_id`, builder).
  """
  process_index, process_count = _process(process_index, process_count)
  builder = tfds.builder(dataset, data_dir=data_dir)
  host_split = tfds.split_for_jax_process(split, process_index=process_index,
                                          process_count=process_count,
                                          drop_remainder=drop_remainder)
  image_keys = _image_features(builder)
  if features is not None:
    unknown = set(features) - set(builder.info.features)
    if unknown:
      raise ValueError(f"{dataset} has no features {sorted(unknown)}; it has "
                       f"{sorted(builder.info.features)}")
    image_keys = {k: v for k, v in image_keys.items() if k in features}
    decoders = tfds.decode.PartialDecoding(
        {k: True for k in features}, decoders={k: tfds.decode.SkipDecoding() for k in image_keys})
  else:
    decoders = {k: tfds.decode.SkipDecoding() for k in image_keys}
  ds = builder.as_dataset(
      split=host_split, shuffle_files=shuffle_files, decoders=decoders,
      read_config=tfds.ReadConfig(add_tfds_id=True, shuffle_seed=seed,
                                  shuffle_reshuffle_each_iteration=True))
  ds = _check(ds, name=dataset, split=split, image_keys=image_keys, check_keys=check_keys,
              on_bad_example=on_bad_example)
  if shuffle_buffer:
    ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ds = ds.map(_decode_images(image_keys), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds, builder


def _add_rng(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
  """Adds `_rng` = (seed, running index): the per-example seed of the random pp ops."""
  def add(index, ex):
    return {**ex, "_rng": tf.stack([tf.constant(seed, tf.int64), index])}
  return ds.enumerate().map(add)


def _finalize_train(task_index: int, dataset: str):
  def fin(ex):
    if "image" not in ex:
      raise errors.ConfigError(f"the pp of {dataset} must leave 'image'; it leaves {sorted(ex)}")
    return {"image": tf.cast(ex["image"], tf.float32), "target": ex["target"],
            "valid": ex["valid"], "task": tf.constant(task_index, tf.int32)}
  return fin


def _task_index(entry: dict, task_names: Sequence[str]) -> int:
  if entry["task"] not in task_names:
    raise errors.ConfigError(f"entry task {entry['task']!r} of {entry['dataset']} is not in the "
                             f"task list {list(task_names)}")
  return list(task_names).index(entry["task"])


def _entry_name(entry: dict) -> str:
  return f"{entry['dataset']}/{entry['task']}"


def get_train_dataset(entries: Iterable[Any], task_names: Sequence[str], batch_size: int, *,
                      seed: int = 0, data_dir: str | None = None,
                      process_index: int | None = None, process_count: int | None = None,
                      shuffle_buffer: int = 2_000, on_bad_example: str = "fail",
                      prefetch: int = 2, num_parallel_calls: int | None = None) -> tf.data.Dataset:
  """The mixed training stream of this host: infinite, shuffled, batched to `batch_size`.

  Args:
    entries: one dict / ConfigDict per (dataset, task): dataset, split, task, pp, weight
      (relative sampling weight), optional data_dir, check_keys and features (top-level
      features to read; default all).
    task_names: the config's task list; `task` in the batch indexes it.
    batch_size: per-host batch size B.
    seed: makes the stream deterministic (file order, shuffling, mixing, random pp ops).
    data_dir: TFDS data directory (an entry's own data_dir wins).
    process_index, process_count: this host's slice (default: jax.process_index/count()).
    shuffle_buffer: examples in each entry's shuffle buffer (held with images still encoded,
      and only the entry's `features` parsed).
    on_bad_example: "fail" or "skip" (see module doc).

  Returns:
    tf.data.Dataset of {"image": f32[B, R, R, 3], "target": f32[B, R, R, 3],
    "valid": bool[B, R, R, 1], "task": i32[B]}.
  """
  entries = [_as_entry(e) for e in entries]
  if not entries:
    raise ValueError("get_train_dataset needs at least one entry")
  process_index, process_count = _process(process_index, process_count)
  streams, weights = [], []
  parallel = num_parallel_calls or tf.data.AUTOTUNE
  for i, entry in enumerate(entries):
    task_index = _task_index(entry, task_names)
    task = tasks_lib.from_entry(entry)
    if entry["weight"] <= 0:
      raise errors.ConfigError(f"entry {_entry_name(entry)} has weight {entry['weight']}")
    entry_seed = seed * 1000 + i
    ds, builder = read_split(entry["dataset"], entry["split"],
                             data_dir=entry["data_dir"] or data_dir,
                             process_index=process_index, process_count=process_count,
                             shuffle_files=True, seed=entry_seed,
                             on_bad_example=on_bad_example, check_keys=entry["check_keys"],
                             features=entry["features"], drop_remainder=True,
                             shuffle_buffer=shuffle_buffer, repeat=True)
    check_metadata(entry, builder)
    ds = _add_rng(ds, entry_seed)
    ds = ds.map(pp_lib.get_preprocess_fn(entry["pp"]), num_parallel_calls=parallel,
                deterministic=True)
    ds = ds.map(encode_answer(task, _entry_name(entry)), num_parallel_calls=parallel,
                deterministic=True)
    ds = ds.map(_finalize_train(task_index, entry["dataset"]))
    streams.append(ds)
    weights.append(float(entry["weight"]))
  total = sum(weights)
  if len(streams) == 1:
    mixed = streams[0]
  else:
    mixed = tf.data.Dataset.sample_from_datasets(streams, [w / total for w in weights], seed=seed)
  mixed = mixed.batch(batch_size, drop_remainder=True)
  options = tf.data.Options()
  options.deterministic = True
  return mixed.with_options(options).prefetch(prefetch)


def _pad_batch(batch_size: int):
  """Pads a (possibly short) batch to `batch_size` with zeros and a `mask` of real examples."""
  def pad(batch):
    n = tf.shape(batch["image"])[0]
    out = {}
    for key, x in batch.items():
      paddings = [[0, batch_size - n]] + [[0, 0]] * (x.shape.rank - 1)
      out[key] = tf.pad(x, paddings)
      out[key].set_shape([batch_size] + x.shape[1:].as_list())
    out["mask"] = tf.pad(tf.ones([n], tf.bool), [[0, batch_size - n]])
    out["mask"].set_shape([batch_size])
    return out
  return pad


def get_eval_dataset(entry: Any, task_names: Sequence[str], batch_size: int, *,
                     data_dir: str | None = None, process_index: int | None = None,
                     process_count: int | None = None, on_bad_example: str = "fail",
                     num_parallel_calls: int | None = None) -> tuple[tf.data.Dataset, int]:
  """One pass over an evaluation split for one (dataset, task), every example exactly once.

  The entry's `pp_eval` (default: its `pp`) runs on each example, then the task encodes its
  answer (`target`, for the picture of predictions); keys starting with "label/" (raw labels
  for the metrics, e.g. `copy("depth", "label/depth")`) are kept next to image, target and
  task. Batches hold `batch_size` examples; the last one is padded with zeros and
  `mask` (bool[B]) says which rows are real. Raw labels of different sizes are zero-padded to
  the largest in the batch (entry `pad_values` overrides per key, e.g. {"label/semantic": 255})
  and `<key>_shape` (i32[B, rank]) keeps every true shape. Every host gets the same number of
  batches (fully masked ones at the end where its share is smaller).

  Returns:
    (dataset, number of batches per host).
  """
  entry = _as_entry(entry)
  task_index = _task_index(entry, task_names)
  process_index, process_count = _process(process_index, process_count)
  split = entry.get("eval_split") or entry["split"]
  ds, builder = read_split(entry["dataset"], split, data_dir=entry["data_dir"] or data_dir,
                           process_index=process_index, process_count=process_count,
                           on_bad_example=on_bad_example, check_keys=entry["check_keys"],
                           features=entry.get("eval_features") or entry["features"])
  check_metadata(entry, builder)
  ds = _add_rng(ds, 0)
  parallel = num_parallel_calls or tf.data.AUTOTUNE
  ds = ds.map(pp_lib.get_preprocess_fn(entry.get("pp_eval") or entry["pp"]),
              num_parallel_calls=parallel, deterministic=True)
  ds = ds.map(encode_answer(tasks_lib.from_entry(entry), _entry_name(entry)),
              num_parallel_calls=parallel, deterministic=True)

  def fin(ex):
    out = {k: v for k, v in ex.items() if k.startswith(EVAL_PREFIX)}
    out["image"] = tf.cast(ex["image"], tf.float32)
    out["target"] = ex["target"]
    out["task"] = tf.constant(task_index, tf.int32)
    for k in list(out):
      if k.startswith(EVAL_PREFIX) and out[k].shape.rank:
        out[f"{k}_shape"] = tf.shape(out[k])
    return out

  ds = ds.map(fin)
  pad_values = dict(entry.get("pad_values") or {})
  spec = ds.element_spec
  padding_values = {k: tf.constant(pad_values[k], s.dtype) if k in pad_values
                    else tf.zeros([], s.dtype) for k, s in spec.items()}
  ds = ds.padded_batch(batch_size, padding_values=padding_values).map(_pad_batch(batch_size))
  try:
    total = builder.info.splits[split].num_examples
  except (KeyError, ValueError, TypeError):  # unknown split size (e.g. mocked builders)
    total = 0
  num_batches = math.ceil(math.ceil(total / process_count) / batch_size) if total else None
  if num_batches:
    spec = ds.element_spec
    empty = {k: tf.zeros([d if d is not None else 0 for d in s.shape.as_list()], s.dtype)
             for k, s in spec.items()}
    ds = ds.concatenate(tf.data.Dataset.from_tensors(empty).repeat()).take(num_batches)
  return ds.prefetch(2), num_batches
