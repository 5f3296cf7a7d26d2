"""Paradigms: the ways of re-using a diffusion prior, one unit each (base.py: the contract).

  generalist  conditional diffusion of the RGB-encoded answer from noise, multi-step
  onestep     one deterministic pass at a fixed t (GenPercept, Lotus)
  dmp         interpolation diffusion: the image takes the place of the noise (DMP)
  vpd         the UNet once at a small t as a backbone feeding dense heads (VPD)

`config.diffusion.mode` names the paradigm of a run. Adding one: a module with a `Paradigm`
subclass registered by `@paradigms.register("name")` (docs/architecture.md has an example).
"""
from dense_diffusion.paradigms.base import (PARADIGMS, DiffusionConfig, Paradigm, TrainingBatch,
                                            get, make, make_config, masked_mse, masked_target,
                                            register)
# Importing the paradigm modules registers them.
from dense_diffusion.paradigms import backbone, dmp, generalist, onestep  # noqa: F401

__all__ = ["PARADIGMS", "DiffusionConfig", "Paradigm", "TrainingBatch", "get", "make",
           "make_config", "masked_mse", "masked_target", "register"]
