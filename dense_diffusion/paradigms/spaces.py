"""The space a paradigm's network works in: RGB pixels, or the latents of a frozen VAE.

Every paradigm runs in either space; `config.model.latent` is the one switch. The space turns
RGB arrays (the condition image, the task's RGB-encoded target) into what the UNet sees, and
the UNet's answers back into RGB for the task to decode:

  encode(model, rgb)      f32[B, H, W, 3] in [-1, 1] -> f32[B, h, w, C]
  decode(model, x)        f32[B, h, w, C] -> f32[B, H, W, 3]
  known(model, valid)     bool[B, H, W, 1] -> bool[B, h, w, 1] (a latent pixel is known when
                          every image pixel under it is: Marigold's max-pool of the unknown mask)

Pixel space is the identity (C = 3). Latent space uses `model.vae` (an `AutoencoderKL` the
experiment attaches; frozen unless the config trains it): the posterior mean, scaled by the
VAE's scaling factor, as Marigold and diffusers' pipelines encode; decoding inverts the scaling.
Gradients flow through the decoder (image-level losses train the UNet through it).
"""
from __future__ import annotations

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp


class PixelSpace:
  """The network works on RGB images (the generalist paper's choice: no VAE error)."""

  name = "pixel"

  def channels(self, model: Any) -> int:
    del model
    return 3

  def encode(self, model: Any, rgb: jax.Array) -> jax.Array:
    del model
    return rgb

  def decode(self, model: Any, x: jax.Array) -> jax.Array:
    del model
    return x

  def known(self, model: Any, valid: jax.Array | None) -> jax.Array | None:
    del model
    return valid


class LatentSpace:
  """The network works on `model.vae` latents (posterior mean x scaling factor).

  Args:
    remat_decoder: recompute the VAE decoder's activations in the backward pass instead of
      keeping them (image-level losses backpropagate through it: at 480x640 its activations
      are larger than the UNet's).
  """

  name = "latent"

  def __init__(self, remat_decoder: bool = False):
    self.remat_decoder = remat_decoder

  def channels(self, model: Any) -> int:
    return model.vae.config.latent_channels

  def encode(self, model: Any, rgb: jax.Array) -> jax.Array:
    """f32[B, H, W, 3] -> f32[B, H/f, W/f, C]: the VAE posterior's mean, scaled."""
    mean = model.vae.encode(rgb, scaled=True)
    return mean.astype(jnp.float32)

  def decode(self, model: Any, x: jax.Array) -> jax.Array:
    if not self.remat_decoder:
      return model.vae.decode(x, scaled=True).astype(jnp.float32)
    # A pure function of the VAE's state (jax.checkpoint, not nnx.remat, which writes the state
    # back into a module of the enclosing trace).
    graphdef, state = nnx.split(model.vae)
    decode = lambda state, z: nnx.merge(graphdef, state).decode(z, scaled=True)
    return jax.checkpoint(decode)(state, x).astype(jnp.float32)

  def known(self, model: Any, valid: jax.Array | None) -> jax.Array | None:
    if valid is None:
      return None
    factor = model.vae.config.downsample_factor
    b, h, w, c = valid.shape
    if h % factor or w % factor:
      raise ValueError(f"image size {h}x{w} is not a multiple of the VAE factor {factor}")
    blocks = valid.reshape(b, h // factor, factor, w // factor, factor, c)
    return jnp.all(blocks, axis=(2, 4))


def make(latent: bool, *, remat_decoder: bool = False):
  """The space of `config.model.latent` (`model.vae.remat_decoder` for the latent one)."""
  return LatentSpace(remat_decoder) if latent else PixelSpace()
