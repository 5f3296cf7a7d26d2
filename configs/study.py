"""The arms of the shipped studies (configs/studies/*.py): each paradigm's own config on the same
synthetic tasks, scenes and budget.

    python -m dense_diffusion.main train --config configs/study.py:arm=dmp,tasks=depth+normals \
        --workdir runs/one_arm

`arm` names a recipe below (registry ARMS: the paradigm's own config, then the study's task
list); `tasks` ("+"-separated) is what every arm trains and is scored on; `res` the image size;
`data` the synthetic_scenes builder config (default res<res>); `vae` a trained VAE folder
(`main train-vae`) for latent arms.
"""
import functools

from configs import demo
from configs import dmp
from configs import onestep
from dense_diffusion.datasets import readers


def _generalist(res):
  return demo.get_config(f"res={res}")  # configs/demo.py as it is.


def _conditioned(res, *, class_label: bool, pooled_prompt: bool, token_std: float,
                 image_tokens: bool = True):
  """configs/demo.py told the task one way: learned task tokens (N(0, token_std^2)) in the 8x8
  cross-attention, plus the task as a class label and / or the tokens' pooled embedding
  projected into the timestep embedding; with or without the tiny ViT's image tokens."""
  c = demo.get_config(f"res={res}")
  unet = demo.without_task_embedding(c.model.unet)
  if class_label:
    unet["num_class_embeds"] = len(c.tasks)  # the task index (set to the study's count below).
  if pooled_prompt:
    unet["class_embed_type"] = "projection"  # the prompt's pooled embedding, projected.
  c.model.unet = unet
  c.model.task_token_init_std = token_std
  if not image_tokens:
    c.model.image_encoder = None  # the image enters through the UNet's input alone.
  return c


# arm name -> the config it starts from (the study's tasks and data are set after).
ARMS = {
    "generalist": _generalist,  # configs/demo.py: multi-step x0 diffusion.
    # The `conditioning` study: the task as a class label beside task tokens at std 0.02 (the
    # demo until 2026-12-07), the same without image tokens, the tokens alone, and the prompt
    # alone (unit-scale tokens + their pooled embedding projected, configs/demo.py since).
    "class_label": functools.partial(_conditioned, class_label=True, pooled_prompt=False,
                                     token_std=0.02),
    "no_image_tokens": functools.partial(_conditioned, class_label=True, pooled_prompt=False,
                                         token_std=0.02, image_tokens=False),
    "no_class_label": functools.partial(_conditioned, class_label=False, pooled_prompt=False,
                                        token_std=0.02),
    "prompt_only": functools.partial(_conditioned, class_label=False, pooled_prompt=True,
                                     token_std=1.0),
    "onestep_image": lambda res: onestep.get_config(f"res={res},loss=image"),  # GenPercept.
    "dmp": lambda res: dmp.get_config(f"res={res}"),
    "vpd_head": lambda res: onestep.get_config(f"res={res},head=1"),  # UNet + dense heads.
}


def get_config(arg=None):
  arg = demo.parse_arg(arg, arm="generalist", tasks="depth+normals+semantic", res=32, data="",
                       vae="")
  if arg.arm not in ARMS:
    raise ValueError(f"unknown arm {arg.arm!r}; known: {sorted(ARMS)}")
  c = ARMS[arg.arm](arg.res)
  tasks = tuple(arg.tasks.split("+"))
  c.tasks = tasks
  c.input.entries = readers.synthetic_mixture(tasks, config=arg.data or f"res{arg.res}")
  c.task_loss_weights = {}  # equal weights: the tasks compared are all dense predictions.
  if "num_class_embeds" in c.model.unet:
    c.model.unet["num_class_embeds"] = len(tasks)  # the task as a class label.
  if arg.vae:
    c.model.vae.pretrained = arg.vae  # a VAE trained on these scenes (main train-vae).
  c.diffusion.ensemble_size = c.diffusion.get("ensemble_size", 1)  # samples averaged per answer.
  c.model.allow_frozen_fresh = ("vae",)  # without a trained VAE, latent arms show plumbing.
  return c
