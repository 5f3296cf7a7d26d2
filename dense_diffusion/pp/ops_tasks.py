"""Task encoding: the answer in data[key] -> data[outkey] = task.encode(answer), f32[H, W, 3].

The encoders are the task objects of `dense_diffusion.tasks` called through `tf.numpy_function`,
so there is one implementation of every encoding (see docs/data.md for the cost).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from dense_diffusion.pp.registry import register


@register("encode_task")
def get_encode_task(task: str, key: str, outkey: str = "target", **options):
  """Encodes data[key] with `tasks.get(task, **options)` into data[outkey] (float32 [H, W, 3]).

  Example: `encode_task("depth", key="depth", max_depth=10.0)`,
  `encode_task("semantic", key="semantic", num_classes=150)`.
  """
  from dense_diffusion import tasks
  task_obj = tasks.get(task, **options)

  def _np_encode(x):
    return np.asarray(task_obj.encode(x), np.float32)

  def _encode(data):
    x = data[key]
    rgb = tf.numpy_function(_np_encode, [x], tf.float32, stateful=False)
    rgb.set_shape(x.shape[:2].concatenate([3]))
    return {**data, outkey: rgb}
  return _encode
