"""Read diffusers / transformers safetensors checkpoints into our Flax NNX modules (and write
and read diffusers / peft LoRA files of our UNet's adapters).

Public loaders are imported lazily so that `import dense_diffusion.convert` stays cheap and one
loader's module does not have to exist for another to work.
"""
import importlib

_LOADERS = {
    "load_diffusers_unet": "dense_diffusion.convert.unet",
    "load_transformers_clip_text": "dense_diffusion.convert.clip",
    "load_transformers_clip_vision": "dense_diffusion.convert.clip",
    "load_diffusers_vae": "dense_diffusion.convert.vae",
    # diffusers / peft LoRA files <-> our UNet's adapters (and folding them into the kernels).
    "save_diffusers_lora": "dense_diffusion.convert.lora",
    "load_diffusers_lora": "dense_diffusion.convert.lora",
    "read_diffusers_lora": "dense_diffusion.convert.lora",
    "fold_lora": "dense_diffusion.convert.lora",
}

__all__ = sorted(_LOADERS)


def __getattr__(name):
  if name in _LOADERS:
    return getattr(importlib.import_module(_LOADERS[name]), name)
  raise AttributeError(f"module 'dense_diffusion.convert' has no attribute {name!r}")
