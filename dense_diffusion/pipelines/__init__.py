"""Inference pipelines for pretrained diffusers-format checkpoints, in JAX (no torch at run time).

`MarigoldDepthPipeline`, `MarigoldNormalsPipeline`, `MarigoldIntrinsicsPipeline`: load a folder
written by the diffusers pipeline of the same name (`from_pretrained(folder)`) and call it as
diffusers' pipeline is called; see `pipelines/marigold.py`.
"""
from dense_diffusion.pipelines.marigold import (MarigoldDepthOutput, MarigoldDepthPipeline,
                                                MarigoldIntrinsicsOutput,
                                                MarigoldIntrinsicsPipeline, MarigoldNormalsOutput,
                                                MarigoldNormalsPipeline)

__all__ = [
    "MarigoldDepthPipeline", "MarigoldNormalsPipeline", "MarigoldIntrinsicsPipeline",
    "MarigoldDepthOutput", "MarigoldNormalsOutput", "MarigoldIntrinsicsOutput",
]
