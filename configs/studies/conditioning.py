"""Does the generalist need image-encoder tokens, or the task as a class label? The generalist
with everything (class label, learned task tokens, image tokens), without the image tokens,
and without the class label (the task as learned tokens alone); depth, normals, semantic.
(Text prompts need a pretrained text encoder folder, `model.text_encoder`: not offline.)

    python -m dense_diffusion.main study --study conditioning --workdir runs/studies
"""
from dense_diffusion.studies import spec

CONFIG = "configs/study.py"
CONFIG_ARG = "tasks=depth+normals+semantic"
NAME = "conditioning"
SCALES = spec.STANDARD_SCALES  # the shared CPU and accelerator budgets.


def get_sweep():
  return [{"name": arm, "arg": f"arm={arm}"}
          for arm in ("generalist", "no_image_tokens", "no_class_label")]
