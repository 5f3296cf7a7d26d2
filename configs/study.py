"""The arms of the shipped studies (configs/studies/*.py): each paradigm's own config on the same
synthetic tasks, scenes and budget.

    python -m dense_diffusion.main train --config configs/study.py:arm=dmp,tasks=depth+normals \
        --workdir runs/one_arm

`arm` names a recipe below (registry ARMS: the paradigm's own config, then the study's task
list); `tasks` ("+"-separated) is what every arm trains and is scored on; `res` the image size;
`data` the synthetic_scenes builder config (default res<res>); `vae` a trained VAE folder
(`main train-vae`) for latent arms.
"""
from configs import demo
from configs import dmp
from configs import onestep
from dense_diffusion.datasets import readers


def _generalist(res):
  return demo.get_config(f"res={res}")


def _no_image_tokens(res):
  c = demo.get_config(f"res={res}")
  c.model.image_encoder = None  # the image enters through the UNet's input alone.
  return c


def _no_class_label(res):
  c = demo.get_config(f"res={res}")  # the task reaches the UNet only as learned tokens.
  c.model.unet = {k: v for k, v in dict(c.model.unet).items() if k != "num_class_embeds"}
  return c


# arm name -> the config it starts from (the study's tasks and data are set after).
ARMS = {
    "generalist": _generalist,  # configs/demo.py: multi-step x0 diffusion, class label + tokens.
    "no_image_tokens": _no_image_tokens,
    "no_class_label": _no_class_label,
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
