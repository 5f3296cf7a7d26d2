"""Read diffusers / transformers safetensors checkpoints into our Flax NNX modules.

Public loaders are imported lazily so that `import dense_diffusion.convert` stays cheap and one
loader's module does not have to exist for another to work.
"""
import importlib

_LOADERS = {
    "load_diffusers_unet": "dense_diffusion.convert.unet",
    "load_transformers_clip_text": "dense_diffusion.convert.clip",
    "load_transformers_clip_vision": "dense_diffusion.convert.clip",
    "load_diffusers_vae": "dense_diffusion.convert.vae",
}

__all__ = sorted(_LOADERS)


def __getattr__(name):
  if name in _LOADERS:
    return getattr(importlib.import_module(_LOADERS[name]), name)
  raise AttributeError(f"module 'dense_diffusion.convert' has no attribute {name!r}")
