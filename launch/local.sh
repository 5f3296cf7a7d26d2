#!/usr/bin/env bash
# Trains on this machine with all its devices (CPU, one GPU host, or a single-host TPU VM).
#
#   launch/local.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]
#
# is `python -m dense_diffusion.main train --config=CONFIG --workdir=WORKDIR [overrides...]`
# with the repository's .venv Python when there is one (else python3; DENSE_DIFFUSION_PYTHON
# overrides). The Python process replaces this shell, so SIGTERM reaches the train loop, which
# saves a checkpoint and exits 0; the same command resumes. --dry-run prints the command.
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
}

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
if (($# < 2)); then
  usage
fi
config=$1
workdir=$2
shift 2

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

command=("$dd_python" -m dense_diffusion.main train --config="$config" --workdir="$workdir" "$@")
if ((dry_run)); then
  dd_print_command "${command[@]}"
  exit 0
fi
exec "${command[@]}"
