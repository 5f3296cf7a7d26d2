"""A pretrained pipeline's outputs as the project's task answers (for `predict --pretrained`).

`load(folder)` picks the pipeline class from `model_index.json`; `task_answers(pipeline,
output)` turns its output into (task, per-image answers) pairs that the tasks' own writers
(`Task.write`) store exactly as they store a trained run's answers:

  MarigoldDepthPipeline       depth, affine-invariant: relative depth in [0, 1] (near = 0)
  MarigoldNormalsPipeline     normals, unit vectors in the checkpoint's own camera frame
  MarigoldIntrinsicsPipeline  one RGB image in [0, 1] per target of `target_properties` (a
                              target named like a registered image task, albedo, is that task;
                              the others are written as images under their own names)
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from dense_diffusion import errors
from dense_diffusion import tasks as tasks_lib
from dense_diffusion.pipelines import marigold
from dense_diffusion.registry import Registry
from dense_diffusion.tasks import images as image_tasks

PIPELINES: Registry = Registry("pretrained pipeline")
for _cls in (marigold.MarigoldDepthPipeline, marigold.MarigoldNormalsPipeline,
             marigold.MarigoldIntrinsicsPipeline):
  PIPELINES.register(_cls.pipeline_class, _cls)


def load(folder) -> Any:
  """The pipeline in a diffusers-format folder (its class from model_index.json)."""
  index = pathlib.Path(folder) / "model_index.json"
  if not index.is_file():
    raise errors.MissingError(f"{index} does not exist: --pretrained takes a folder written by "
                              "a diffusers Marigold pipeline's save_pretrained")
  name = json.loads(index.read_text()).get("_class_name", "")
  return PIPELINES.get(name).from_pretrained(folder)


def _target_names(pipeline) -> list[str]:
  properties = getattr(pipeline, "target_properties", None) or {}
  names = list(properties.get("target_names") or [])
  return names or [f"target{i}" for i in range(pipeline.n_targets)]


def tasks(pipeline) -> list[tasks_lib.Task]:
  """The task objects whose answers `pipeline` gives, in its output order."""
  if isinstance(pipeline, marigold.MarigoldDepthPipeline):
    return [tasks_lib.get("depth", affine_invariant=True)]
  if isinstance(pipeline, marigold.MarigoldNormalsPipeline):
    return [tasks_lib.get("normals")]
  # A target that is a registered image task (albedo) is that task; others write as images.
  return [tasks_lib.get(n) if n in tasks_lib.names()
          and issubclass(tasks_lib.base.TASKS.get(n), image_tasks.ImageTask)
          else image_tasks.ImageTask(name=n) for n in _target_names(pipeline)]


def task_answers(pipeline, output) -> list[tuple[tasks_lib.Task, list[np.ndarray]]]:
  """[(task, answers per input image)] of one pipeline call's output."""
  prediction = np.asarray(output.prediction)
  objects = tasks(pipeline)
  if isinstance(pipeline, marigold.MarigoldDepthPipeline):
    return [(objects[0], list(prediction[..., 0]))]
  if isinstance(pipeline, marigold.MarigoldNormalsPipeline):
    return [(objects[0], list(prediction))]
  n = len(objects)
  per_image = prediction.reshape((-1, n) + prediction.shape[1:])  # image-major [N, T, H, W, 3]
  return [(task, list(per_image[:, j])) for j, task in enumerate(objects)]
