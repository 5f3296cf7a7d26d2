"""Tasks: a prompt and an exact answer <-> RGB encoding for every dense task (DESIGN.md s.3).

    from dense_diffusion import tasks
    depth = tasks.get("depth", max_depth=10.0)
    rgb = depth.encode(depth_map)          # f32[H, W, 3] in [-1, 1]
    depth_map = depth.decode(rgb)          # also batched: (N, H, W, 3) -> (N, H, W)
"""
from dense_diffusion.tasks.base import Task, get, names, register
# Importing the task modules registers their tasks.
from dense_diffusion.tasks import geometry, images, panoptic, segmentation  # noqa: F401
from dense_diffusion.tasks.segmentation import IGNORE_LABEL, palette

__all__ = ["Task", "get", "names", "register", "IGNORE_LABEL", "palette"]
