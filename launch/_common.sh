# shellcheck shell=bash
# shellcheck disable=SC2034  # dd_repo and dd_python are for the scripts that source this file.
# Shared by the launch/*.sh scripts (sourced, not run): the repository root and its Python.
#
# The repository is this file's parent folder unless DENSE_DIFFUSION_DIR says otherwise (under
# sbatch the script runs from a copy in SLURM's spool, so slurm.sbatch sets it first). Python is
# $DENSE_DIFFUSION_PYTHON, else the repository's .venv (the README's set-up), else python3.

dd_repo=${DENSE_DIFFUSION_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
if [[ ! -f $dd_repo/dense_diffusion/main.py ]]; then
  echo "error: $dd_repo is not a dense_diffusion checkout; run from the repository root or set" \
    "DENSE_DIFFUSION_DIR" >&2
  exit 2
fi
if [[ -n ${DENSE_DIFFUSION_PYTHON:-} ]]; then
  dd_python=$DENSE_DIFFUSION_PYTHON
elif [[ -x $dd_repo/.venv/bin/python ]]; then
  dd_python=$dd_repo/.venv/bin/python
else
  dd_python=python3
fi
# The package imports from the checkout even where it was not pip-installed.
export PYTHONPATH="$dd_repo${PYTHONPATH:+:$PYTHONPATH}"

# Prints a command, one shell-quoted line (what --dry-run shows).
dd_print_command() {
  local out
  printf -v out '%q ' "$@"
  printf '%s\n' "${out% }"
}
