"""The `sbatch` command of a run on a SLURM GPU cluster (launch/slurm.sbatch does the work).

    python -m dense_diffusion.launch.slurm [--dry-run] [SBATCH_OPTIONS...] -- CONFIG WORKDIR \
        [--config.key=value ...]

is `sbatch [SBATCH_OPTIONS...] launch/slurm.sbatch CONFIG WORKDIR [--config.key=value ...]`, run
in the repository root (the job runs where it was submitted). The sbatch script starts one
process per node with every GPU of the node visible to it (`srun python -m dense_diffusion.main
train --distributed --local_device_ids=0,...,G-1 ...`); jax.distributed.initialize() reads the
coordinator, the process count and the rank from SLURM's environment. `--dry-run` prints the
sbatch command and the command every node runs (from `launch/slurm.sbatch --dry-run`).
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Sequence

from dense_diffusion.launch import LAUNCH_DIR
from dense_diffusion.launch import REPO_ROOT

SBATCH_SCRIPT = os.path.relpath(LAUNCH_DIR / "slurm.sbatch", REPO_ROOT)


def sbatch_command(config: str, workdir: str, overrides: Sequence[str], *,
                   sbatch_options: Sequence[str] = (), job_name: str | None = None) -> list[str]:
  """argv of the submission, to run in the repository root; options given win over job_name."""
  bad = [o for o in overrides if not o.startswith("-")]
  if bad:
    raise ValueError(f"after CONFIG and WORKDIR only flags may follow (--config.key=value), got "
                     f"{bad}")
  name = [f"--job-name={job_name}"] if job_name else []
  return ["sbatch", *name, *sbatch_options, SBATCH_SCRIPT, config, workdir, *overrides]


def node_command(config: str, workdir: str, overrides: Sequence[str],
                 gpus_per_node: int = 8) -> list[str]:
  """What srun runs on every node, as launch/slurm.sbatch --dry-run prints it."""
  env = dict(os.environ, SLURM_GPUS_ON_NODE=str(gpus_per_node))
  printed = subprocess.run(["bash", str(LAUNCH_DIR / "slurm.sbatch"), "--dry-run", config,
                            workdir, *overrides], check=True, capture_output=True, text=True,
                           env=env, cwd=REPO_ROOT).stdout
  return shlex.split(printed)


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  usage = ("usage: python -m dense_diffusion.launch.slurm [--dry-run] [SBATCH_OPTIONS...] -- "
           "CONFIG WORKDIR [--config.key=value ...]")
  if "--" not in argv:
    print(usage, file=sys.stderr)
    return 2
  at = argv.index("--")
  options, run_args = argv[:at], argv[at + 1:]
  dry_run = "--dry-run" in options
  options = [o for o in options if o != "--dry-run"]
  if len(run_args) < 2:
    print(usage, file=sys.stderr)
    return 2
  command = sbatch_command(run_args[0], run_args[1], run_args[2:], sbatch_options=options)
  if dry_run:
    print(shlex.join(command))
    print("# every node runs:")
    print(shlex.join(node_command(run_args[0], run_args[1], run_args[2:])))
    return 0
  return subprocess.call(command, cwd=REPO_ROOT)


if __name__ == "__main__":
  sys.exit(main())
