"""Learning rate x batch size of the demo, shortened to 300 steps (4 runs).

    python -m dense_diffusion.launch.sweep configs/sweeps/demo_lr.py --launcher local --dry-run
    python -m dense_diffusion.launch.sweep configs/sweeps/demo_lr.py --launcher local
    python -m dense_diffusion.launch.summary runs/demo_lr

Runs go to runs/demo_lr/lr=0.001,batch_size=8 ... (only the keys that vary name a run).
"""
from dense_diffusion.launch.sweep import product
from dense_diffusion.launch.sweep import sweep

CONFIG = "configs/demo.py"  # base config, relative to the repository root.
CONFIG_ARG = None  # the config's argument, e.g. "res=64".
NAME = "demo_lr"  # runs go to <workdir_root>/demo_lr/...


def get_sweep():
  return product([
      sweep("total_steps", [300]),  # the same in every run, so it is not in the run names.
      sweep("optimizer.lr", [1e-3, 2e-3]),
      sweep("batch_size", [8, 16]),
  ])
