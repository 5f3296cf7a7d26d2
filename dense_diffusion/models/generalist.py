"""The generalist: one UNet that turns an image into any task's RGB-encoded answer.

Conditioning (DESIGN.md s.4):
  UNet input  = concat(x_t, cond) over channels      [B, h, w, C_target + C_cond]
  context     = concat(task tokens, image tokens)    [B, L_task + L_image, cross_attention_dim]
`cond` is the condition image in the space the UNet works in: the RGB image itself in pixel
space (C_cond = 3), its VAE latent in latent space (C_cond = 4, Marigold's 8 input channels);
image tokens always come from the RGB image.
Task tokens are the cached last hidden states of a frozen text encoder on each task's prompt
(`PromptCache`, not trained), or, when no text encoder weights are given, a learned embedding per
task (`num_task_tokens` tokens each). Image tokens come from a CLIP-layout ViT (`ImageEncoder`).

The prompt's pooled embedding (optional; SD-2-style conditioning of the whole network): a UNet
config with `class_embed_type="projection"` projects a vector per example
(`projection_class_embeddings_input_dim` wide) into the timestep embedding: the generalist
passes its task prompt's pooled embedding (the text encoder's hidden state at the prompt's
end-of-text token; for learned task tokens, their mean), so every ResNet block is told the task
through its timestep projection, not only the cross-attention levels, and the task still
reaches the network only through its prompt.

Task as a class label (optional, an alternative to the above): a UNet config with
`num_class_embeds` = the number of tasks adds a learned embedding of the task index to the
timestep embedding.

Input residual (optional, for x0 / `sample` prediction): the answer estimate is
  unet(...) + gate[task] * cond,    gate f32[num_tasks, C_target] learned,
initialised to 1 for tasks whose input is already a rough answer (restoration) and 0 elsewhere.
Restoration networks learn the correction to their input rather than the whole image (DnCNN,
Restormer, NAFNet all add the input back); without it a small UNet must carry every pixel of
the input through its GroupNorm'd blocks and, in the demo's budget, reproduces them less
accurately than the degraded input already is (docs/training.md).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dense_diffusion.models import image_encoder as image_encoder_lib
from dense_diffusion.models import initializers
from dense_diffusion.models import unet as unet_lib


class PromptCache(nnx.Variable):
  """Frozen prompt embeddings [num_tasks, L, D] (and pooled, [num_tasks, D']): part of the
  model state, never trained."""


class GeneralistModel(nnx.Module):
  """UNet denoiser of RGB-encoded answers, conditioned on the input image and the task.

  Args:
    unet_config: diffusers-style UNet config; `in_channels` = target channels +
      `condition_channels`.
    num_tasks: size of the task list (the `task` index of a batch).
    image_encoder_config: `CLIPVisionConfig` of the image tower, or None for no image tokens.
    image_encoder_options: keyword options of `ImageEncoder` (layer, tokens, trainable, ...).
    prompt_embeddings: f32[num_tasks, L, D] from a frozen text encoder, or None for learned
      task embeddings.
    pooled_prompt_embeddings: f32[num_tasks, D'] the prompts' pooled text embeddings, needed with
      prompt_embeddings when the UNet has class_embed_type "projection".
    num_task_tokens: tokens per task of the learned embedding.
    task_token_init_std: standard deviation of the learned tokens' initialisation.
    input_residual_init: per-task initial gate of the input residual (length num_tasks, e.g.
      1.0 for restoration tasks, 0.0 elsewhere), or None for no input residual.
    dtype: compute dtype (None = float32; bfloat16 on accelerators). remat: what the UNet keeps
      for the backward pass (UNet's `remat`: False, True or a name of `unet.remat_names()`).
    condition_channels: channels of the condition concatenated to x_t (3: RGB; 4: a latent).
  """

  def __init__(self, unet_config: Mapping[str, Any], *, num_tasks: int,
               image_encoder_config: Optional[image_encoder_lib.CLIPVisionConfig] = None,
               image_encoder_options: Optional[Mapping[str, Any]] = None,
               prompt_embeddings: Optional[np.ndarray] = None,
               pooled_prompt_embeddings: Optional[np.ndarray] = None, num_task_tokens: int = 4,
               task_token_init_std: float = 0.02,
               input_residual_init: Optional[Sequence[float]] = None, dtype=None,
               remat: bool | str = False, rngs: nnx.Rngs, unet: Optional[unet_lib.UNet] = None,
               condition_channels: int = 3):
    self.unet = unet if unet is not None else unet_lib.UNet(
        unet_config, dtype=dtype, remat=remat, rngs=rngs)
    context_dim = self.unet.config["cross_attention_dim"]
    if not isinstance(context_dim, int):
      raise ValueError("the generalist needs one cross_attention_dim for all blocks, got "
                       f"{context_dim}")
    self.num_tasks = num_tasks
    self.class_conditioning = unet_lib.class_conditioning(self.unet.config)
    num_class_embeds = self.unet.config["num_class_embeds"]
    if self.class_conditioning == "labels" and num_class_embeds != num_tasks:
      raise ValueError(f"UNet num_class_embeds={num_class_embeds} must equal the number of tasks "
                       f"({num_tasks}): the generalist uses the task index as class label")
    self.target_channels = self.unet.config["in_channels"] - condition_channels
    if self.target_channels <= 0:
      raise ValueError(f"UNet in_channels={self.unet.config['in_channels']} leaves no room for "
                       f"the target next to the {condition_channels}-channel condition")
    if self.unet.config["out_channels"] != self.target_channels:
      raise ValueError(f"UNet out_channels={self.unet.config['out_channels']} must equal the "
                       f"target channels, in_channels - {condition_channels} = "
                       f"{self.target_channels}")
    if prompt_embeddings is not None:
      prompt_embeddings = np.asarray(prompt_embeddings, np.float32)
      if prompt_embeddings.ndim != 3 or prompt_embeddings.shape[0] != num_tasks:
        raise ValueError(f"prompt_embeddings must be [num_tasks={num_tasks}, L, D], got "
                         f"{prompt_embeddings.shape}")
      if prompt_embeddings.shape[-1] != context_dim:
        raise ValueError(f"prompt embedding width {prompt_embeddings.shape[-1]} != UNet "
                         f"cross_attention_dim {context_dim}")
      self.prompts = PromptCache(jnp.asarray(prompt_embeddings))
      self.task_embedding = None
      pooled_width = None
      if pooled_prompt_embeddings is not None:
        pooled = np.asarray(pooled_prompt_embeddings, np.float32)
        if pooled.ndim != 2 or pooled.shape[0] != num_tasks:
          raise ValueError(f"pooled_prompt_embeddings must be [num_tasks={num_tasks}, D], got "
                           f"{pooled.shape}")
        self.pooled_prompts = PromptCache(jnp.asarray(pooled))
        pooled_width = pooled.shape[1]
      else:
        self.pooled_prompts = None
    else:
      self.prompts = None
      self.pooled_prompts = None
      init = initializers.normal(task_token_init_std)
      self.task_embedding = nnx.Param(
          init(rngs.params(), (num_tasks, num_task_tokens, context_dim), jnp.float32),
          out_sharding=(None, None, "embed"), eager_sharding=False)
      pooled_width = context_dim  # the mean of the task's tokens.
    if self.class_conditioning == "vectors":
      want = self.unet.config["projection_class_embeddings_input_dim"]
      if pooled_width is None:
        raise ValueError("the UNet projects a pooled prompt embedding (class_embed_type "
                         "'projection'): pass pooled_prompt_embeddings with prompt_embeddings")
      if pooled_width != want:
        raise ValueError(f"UNet projection_class_embeddings_input_dim={want} must equal the "
                         f"width of the pooled prompt embedding ({pooled_width})")
    if input_residual_init is not None:
      init_gate = np.asarray(input_residual_init, np.float32)
      if init_gate.shape != (num_tasks,):
        raise ValueError(f"input_residual_init needs one value per task ({num_tasks}), got "
                         f"shape {init_gate.shape}")
      if self.target_channels != condition_channels:
        raise ValueError("the input residual adds the condition to the answer, which needs as "
                         f"many target channels ({self.target_channels}) as condition channels "
                         f"({condition_channels})")
      self.input_residual_gate = nnx.Param(
          jnp.repeat(jnp.asarray(init_gate)[:, None], self.target_channels, axis=1),
          out_sharding=(None, None), eager_sharding=False)
    else:
      self.input_residual_gate = None
    if image_encoder_config is not None:
      self.image_encoder = image_encoder_lib.ImageEncoder(
          image_encoder_config, context_dim=context_dim, dtype=dtype, rngs=rngs,
          **dict(image_encoder_options or {}))
    else:
      self.image_encoder = None

  def context(self, image: jax.Array, task: jax.Array) -> jax.Array:
    """[B, H, W, 3] images, i32[B] task indices -> [B, L, D] cross-attention tokens."""
    table = self.prompts[...] if self.prompts is not None else self.task_embedding[...]
    tokens = [jnp.take(table, task, axis=0)]
    if self.image_encoder is not None:
      tokens.append(self.image_encoder(image).astype(jnp.float32))
    return jnp.concatenate(tokens, axis=1)

  def pooled_prompt(self, task: jax.Array) -> jax.Array:
    """i32[B] task indices -> f32[B, D'] the pooled embedding of each task's prompt (the cached
    text embedding, or the mean of the learned task tokens)."""
    if self.prompts is not None:
      if self.pooled_prompts is None:
        raise ValueError("this model has no pooled prompt embeddings")
      return jnp.take(self.pooled_prompts[...], task, axis=0)
    return jnp.take(jnp.mean(self.task_embedding[...], axis=1), task, axis=0)

  def class_labels(self, task: jax.Array) -> Optional[jax.Array]:
    """What the UNet's class embedding gets for tasks i32[B]: the task index, the prompt's
    pooled embedding, or None (the UNet has no class embedding)."""
    if self.class_conditioning == "labels":
      return task
    if self.class_conditioning == "vectors":
      return self.pooled_prompt(task)
    return None

  def __call__(self, x_t: jax.Array, t: jax.Array, image: jax.Array, task: jax.Array,
               cond: Optional[jax.Array] = None) -> jax.Array:
    """The network's output f32[B, h, w, C_target].

    Args:
      x_t: f32[B, h, w, C_target]. t: i32[B]. image: f32[B, H, W, 3] in [-1, 1] (image tokens).
      task: i32[B]. cond: f32[B, h, w, C_cond], the condition in the UNet's space (None: the
        image itself, pixel space).
    """
    cond = image if cond is None else cond
    if x_t.shape[:3] != cond.shape[:3]:
      raise ValueError(f"x_t {x_t.shape} and the condition {cond.shape} differ in batch or size")
    sample = jnp.concatenate([x_t, cond.astype(x_t.dtype)], axis=-1)
    out = self.unet(sample, t, self.context(image, task), class_labels=self.class_labels(task))
    if self.input_residual_gate is not None:
      gate = jnp.take(self.input_residual_gate[...], task, axis=0)[:, None, None, :]
      out = out + gate.astype(out.dtype) * cond.astype(out.dtype)
    return out
