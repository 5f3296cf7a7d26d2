"""Preprocessing ops composed by strings, big_vision style.

    from dense_diffusion import pp
    fn = pp.get_preprocess_fn('random_crop(128, keys=("image", "depth"))|value_range(-1, 1)')
    example = fn(example)

Every op is a registered factory (`pp.registry.register`); `pp.names()` lists them.
"""
# Importing the op modules registers their ops.
from dense_diffusion.pp import ops_general, ops_image, ops_labels  # noqa: F401
from dense_diffusion.pp.builder import get_preprocess_fn, split_ops
from dense_diffusion.pp.registry import build_op, names, parse, register

__all__ = ["get_preprocess_fn", "split_ops", "build_op", "names", "parse", "register"]
