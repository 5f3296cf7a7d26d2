"""Tasks: everything about a dense task in one unit (base.py says what a task provides).

    from dense_diffusion import tasks
    depth = tasks.get("depth", max_depth=10.0)
    rgb = depth.encode(depth_map)          # f32[H, W, 3] in [-1, 1]
    depth_map = depth.decode(rgb)          # also batched: (N, H, W, 3) -> (N, H, W)

Adding a task: a module with a `Task` subclass registered by `@tasks.register("name")`
(docs/architecture.md has a worked example).
"""
from dense_diffusion.tasks.base import (LABEL_PREFIX, Evaluator, Task, compose, composites,
                                        family, from_entry, get, names, register, resize_map)
# Importing the task modules registers their tasks.
from dense_diffusion.tasks import (geometry, images, instance, matting, panoptic,  # noqa: F401
                                   referring, segmentation)
from dense_diffusion.tasks.instance import UNKNOWN_INSTANCE
from dense_diffusion.tasks.segmentation import IGNORE_LABEL, palette

__all__ = ["Task", "Evaluator", "get", "names", "register", "composites", "compose", "family",
           "from_entry",
           "resize_map", "LABEL_PREFIX", "IGNORE_LABEL", "UNKNOWN_INSTANCE", "palette"]
