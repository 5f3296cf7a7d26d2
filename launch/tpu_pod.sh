#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: creates it (or reuses it), copies the code to every worker,
# installs the package with the TPU extra, and starts the same training command on all workers.
#
#   launch/tpu_pod.sh [--name=NAME] [--accelerator-type=v5litepod-16] [--zone=ZONE]
#       [--project=PROJECT] [--version=RUNTIME] [--spot | --preemptible] [--repo=URL
#       [--branch=REF]] [--detach] [--dry-run] -- CONFIG gs://BUCKET/WORKDIR [--config.key=value ...]
#
# --dry-run prints every command (gcloud, git), one per line, and runs nothing (no gcloud
# needed). The steps are in dense_diffusion/launch/tpu_pod.py (Python, for exact shell quoting
# of the overrides); this script only finds the checkout's Python and runs it, which needs
# nothing beyond the standard library. docs/launch.md has the details.
set -euo pipefail

if (($# == 0)); then
  echo "usage: $0 [options] -- CONFIG gs://BUCKET/WORKDIR [--config.key=value ...]" \
    "(--help lists the options)" >&2
  exit 2
fi

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

exec "$dd_python" -m dense_diffusion.launch.tpu_pod "$@"
