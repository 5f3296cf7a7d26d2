"""The round-trip ceiling of a space: each task's ground truth, encoded to RGB by the task, passed
through an autoencoder and back, decoded by the task and scored with the task's own evaluator.

For pixel space the autoencoder is the identity, and the score is what the task's encoding
itself keeps; for latent space it is the VAE (encode to the posterior mean, decode): no model
working in those latents can do better than the VAE lets it (the generalist paper's
"quantisation" argument). Nothing here is task-specific: the tasks encode, decode and score.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np

from dense_diffusion.evaluate import headline

Autoencoder = Callable[[np.ndarray], np.ndarray]  # f32[B, H, W, 3] in [-1, 1] -> the same.


def identity(rgb: np.ndarray) -> np.ndarray:
  return rgb


def vae_round_trip(vae: Any) -> Autoencoder:
  """encode (posterior mean) then decode with an `AutoencoderKL`, jitted."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(vae)

  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def trip(state, x):
    return nnx.merge(graphdef, state)(x)

  return lambda rgb: np.asarray(trip(state, np.asarray(rgb, np.float32)))


def _batches(items: Iterable, size: int, limit: Optional[int]):
  batch, count = [], 0
  for item in items:
    if limit is not None and count >= limit:
      break
    batch.append(item)
    count += 1
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


def measure(entries: Iterable[dict], autoencoders: Mapping[str, Autoencoder], *,
            data_dir: Optional[str] = None, max_examples: Optional[int] = None,
            batch_size: int = 8) -> dict:
  """{autoencoder name: {task: the task's evaluator result (headline, baseline)}} on the
  round-tripped truths of every entry's evaluation split (its first `max_examples` examples);
  each split is read once for all the autoencoders."""
  from dense_diffusion.datasets import eval_tfds  # pylint: disable=g-import-not-at-top
  from dense_diffusion.experiment import config as config_lib  # pylint: disable=g-import-not-at-top
  entries = [dict(e) for e in entries]
  results = {name: {} for name in autoencoders}
  for entry, task in zip(entries, config_lib.entry_tasks(entries)):
    evaluators = {name: task.evaluator() for name in autoencoders}
    seen = 0
    examples = eval_tfds.examples(entry, task, data_dir=data_dir)
    for chunk in _batches(examples, batch_size, max_examples):
      encoded = np.stack([task.encode(ex.truth) for ex in chunk])
      truths = [ex.truth for ex in chunk]
      inputs = [ex.image.astype(np.float32) / 127.5 - 1.0 for ex in chunk]
      for name, autoencoder in autoencoders.items():
        back = np.clip(np.asarray(autoencoder(encoded), np.float32), -1.0, 1.0)
        answers = task.decode(back)
        evaluators[name].update(
            [task.resize(a, *task.answer_size(gt)) for a, gt in zip(answers, truths)],
            truths, inputs)
      seen += len(chunk)
    for name, evaluator in evaluators.items():
      results[name][task.name] = {**evaluator.result(), "num_examples": seen, **headline(task)}
  return results


def main(argv=None) -> int:
  """`python -m dense_diffusion.studies.ceiling --vae DIR`: any diffusers AutoencoderKL folder
  (or pipeline folder, or one `main convert` / `main train-vae` wrote) on synthetic_scenes."""
  import argparse  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  from dense_diffusion.datasets import readers  # pylint: disable=g-import-not-at-top
  from dense_diffusion.studies import vae_training  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m dense_diffusion.studies.ceiling")
  parser.add_argument("--vae", required=True, help="a diffusers AutoencoderKL / pipeline folder")
  parser.add_argument("--data", default="res32", help="synthetic_scenes builder config")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir")
  parser.add_argument("--max_examples", type=int, default=64, help="scenes per task")
  parser.add_argument("--output", default=None, help="write the result as JSON here too")
  args = parser.parse_args(argv)
  entries = readers.synthetic_mixture(readers.SYNTHETIC_TASKS, config=args.data)
  from dense_diffusion.datasets import prepare  # pylint: disable=g-import-not-at-top
  prepare.ensure_prepared(entries, args.data_dir)
  result = measure(entries, {"pixels": identity,
                             "vae": vae_round_trip(vae_training.load(args.vae))},
                   data_dir=args.data_dir, max_examples=args.max_examples)
  print(vae_training.format_ceiling(result))
  if args.output:
    with open(args.output, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2, sort_keys=True, default=float)
  return 0


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  sys.exit(main())
