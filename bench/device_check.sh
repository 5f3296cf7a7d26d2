#!/usr/bin/env bash
# The GPU device check: one prepared command for a lent GPU machine (one H100 or H200, JAX with
# CUDA, no network, no TensorFlow). It runs bench/device_check.py: the flagship's train step
# (time, MFU, largest microbatch), its sampler's latency and a Marigold pipeline's images/s at
# 768 px, into $OUT/device_check_results.json. docs/benchmarks.md, "GPU device check", has the
# device tool call to make and the table to fill.
#
#   bash bench/device_check.sh --prepare   # here, once per checkout, before the call: wheels
#   bash bench/device_check.sh             # on the device machine (the call's command)
#   bash bench/device_check.sh --smoke     # here, on the CPU: tiny sizes (tests run this)
#
# Further flags go to bench/device_check.py (--skip train,sampler; --attention_gpu chunked; ...).
#
# --prepare downloads into .whl/ (ignored by git, so the call must name it in `carry`) the
# pure-Python packages the device machine lacks, as built for its Python 3.12 on x86-64:
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 flax==0.12.8
#
# On the machine, a carried wheel is installed (into $DEVICE_CHECK_SITE, /tmp/device_check_site,
# put first on PYTHONPATH; nothing else is touched) when its package is missing or older there:
# ml_collections always (the configs are ConfigDicts; it needs absl-py and PyYAML, both there),
# flax only if the machine's own is older than 0.12.8 (setup.py: flax >= 0.12). With
# DEVICE_CHECK_FORCE_WHEELS=1 every carried wheel is installed: flax 0.12.8, the version the tests
# run, instead of a newer one there.
#
# Then XLA may take 92% of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default is
# 75%), and the check runs under `timeout` ($DEVICE_CHECK_TIMEOUT, 540 s: the device tool stops a
# command at 600 s, and the results file is rewritten after every section), its output copied to
# $OUT/device_check.log ($OUT unset: the current folder). $PYTHON (default python3) runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=(ml_collections==1.1.0 flax==0.12.8)

if [[ "${1:-}" == "--prepare" ]]; then
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
  git check-ignore -q .whl/ || echo "warning: .whl/ is not ignored by git (.gitignore)" >&2
  du -sh .whl
  exit 0
fi

if compgen -G ".whl/*.whl" > /dev/null; then
  # The carried wheels whose package is missing here or older than the wheel.
  mapfile -t need < <("$PY" - .whl <<'EOF'
import importlib.metadata, os, pathlib, re, sys
version = lambda text: tuple(int(x) for x in re.findall(r"\d+", text)[:3])
force = os.environ.get("DEVICE_CHECK_FORCE_WHEELS") == "1"
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
  name, wanted = wheel.name.split("-")[:2]
  try:
    have = importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    have = None
  if force or have is None or version(have) < version(wanted):
    print(wheel)
EOF
  )
  if (( ${#need[@]} )); then
    site="${DEVICE_CHECK_SITE:-/tmp/device_check_site}"
    echo "installing carried wheels into $site: ${need[*]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${need[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi

export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export PYTHONUNBUFFERED=1
out_dir="${OUT:-.}"
mkdir -p "$out_dir"
: > "$out_dir/device_check.log"
if command -v nvidia-smi > /dev/null; then  # read-only queries: what the card is and its state
  nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
      --format=csv 2>&1 | tee -a "$out_dir/device_check.log" || true
fi
timeout -k 10 "${DEVICE_CHECK_TIMEOUT:-540}" "$PY" bench/device_check.py "$@" 2>&1 \
    | tee -a "$out_dir/device_check.log"
