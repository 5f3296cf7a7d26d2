"""Launchers and sweeps: one training command on this machine, a TPU pod slice or a SLURM cluster.

Modules (none imports JAX or TensorFlow, so they run on a laptop that only launches):
  sweep    declare a product / zip of config overrides; expand, name, validate, launch, dry run
  tpu_pod  create or reuse a Cloud TPU VM slice, copy the code, install, train on every worker
  slurm    the `sbatch launch/slurm.sbatch ...` command of a run
  summary  one table (markdown, CSV) of the latest eval_metrics.json of every run of a sweep

The shell entry points live in `launch/` at the repository root; docs/launch.md covers them all.
"""
import pathlib

# The repository checkout these modules belong to: launch/*.sh and configs/ are found from here.
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH_DIR = REPO_ROOT / "launch"
