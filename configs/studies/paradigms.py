"""Which paradigm learns most from the same data and budget? The generalist (multi-step x0
diffusion, configs/demo.py), one-step with image-level losses (GenPercept / E2E-FT,
configs/onestep.py:loss=image), DMP's interpolation (configs/dmp.py) and a UNet backbone with
dense heads (GenPercept's head / VPD, configs/onestep.py:head=1); pixel space; depth, normals,
semantic on synthetic_scenes.

    python -m dense_diffusion.main study --study paradigms --workdir runs/studies
    python -m dense_diffusion.main study --study paradigms --workdir runs/studies --scale accelerator
"""
CONFIG = "configs/study.py"  # the arms' recipes (arm=...).
CONFIG_ARG = "tasks=depth+normals+semantic"
NAME = "paradigms"
SCALES = {
    "cpu": dict(steps=400),  # ~4-6 min per arm on 2 CPU cores at 32x32.
    # 64x64 scenes, 20k steps at batch 64, 256 evaluation scenes per task.
    "accelerator": dict(steps=20000, arg="res=64",
                        overrides={"batch_size": 64, "eval.max_examples": 256,
                                   "eval.batch_size": 64}),
}


def get_sweep():
  return [{"name": arm, "arg": f"arm={arm}"}
          for arm in ("generalist", "onestep_image", "dmp", "vpd_head")]
