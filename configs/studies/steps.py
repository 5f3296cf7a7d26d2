"""How many sampler steps, and does ensembling help? One generalist model (trained once) sampled
with 1, 2, 4 and 10 DDIM steps, and with 4 steps x 4 samples averaged; depth, normals,
semantic. Arms that differ only in EVAL_KEYS share the first one's training.

    python -m dense_diffusion.main study --study steps --workdir runs/studies
"""
from dense_diffusion.launch.sweep import chain
from dense_diffusion.launch.sweep import sweep
from dense_diffusion.studies import spec

CONFIG = "configs/study.py"
CONFIG_ARG = "arm=generalist,tasks=depth+normals+semantic"
NAME = "steps"
EVAL_KEYS = ("diffusion.num_inference_steps", "diffusion.ensemble_size")
SCALES = spec.STANDARD_SCALES  # the shared CPU and accelerator budgets.


def get_sweep():
  return chain([
      [{"name": f"steps{n}", "diffusion.num_inference_steps": n} for n in (1, 2, 4, 10)],
      [{"name": "steps4_ensemble4", "diffusion.num_inference_steps": 4,
        "diffusion.ensemble_size": 4}],
  ])
