"""How must the generalist be told its task, and does it need image-encoder tokens? The task as
a class label beside learned task tokens (std 0.02, with and without the image tokens), the
task tokens alone (std 0.02), and the prompt alone (task tokens at unit scale plus their pooled
embedding projected into the timestep embedding, no class label: how configs/demo.py and the
flagship condition); depth, normals, semantic. (Text prompts from a pretrained text encoder need
its folder, `model.text_encoder`: not offline.)

    python -m dense_diffusion.main study --study conditioning --workdir runs/studies
"""
from dense_diffusion.studies import spec

CONFIG = "configs/study.py"
CONFIG_ARG = "tasks=depth+normals+semantic"
NAME = "conditioning"
SCALES = spec.STANDARD_SCALES  # the shared CPU and accelerator budgets.


def get_sweep():
  return [{"name": arm, "arg": f"arm={arm}"}
          for arm in ("class_label", "no_image_tokens", "no_class_label", "prompt_only")]
