#!/usr/bin/env bash
# Trains with N processes on this machine, one per GPU: what one multi-GPU host needs when each
# process should own one device (or to try multi-process training on one CPU).
#
#   launch/multiprocess.sh [--dry-run] [--port=PORT] [--gpus-per-process=K] \
#       NUM_PROCESSES CONFIG WORKDIR [--config.key=value ...]
#
# Process i runs `python -m dense_diffusion.main train --distributed
# --coordinator_address=127.0.0.1:PORT --num_processes=N --process_id=i
# --local_device_ids=<its K GPUs>` (K=0: no --local_device_ids, e.g. on CPU). Output lines carry
# a [i] prefix. The script waits for all of them: if one fails the others are stopped and its
# exit status is returned; SIGTERM or SIGINT is passed on to every process (the train loop
# saves a checkpoint and exits 0), so the script exits 0 after a clean pre-emption.
set -euo pipefail

usage() {
  echo "usage: $0 [--dry-run] [--port=PORT] [--gpus-per-process=K] NUM_PROCESSES CONFIG" \
    "WORKDIR [--config.key=value ...]" >&2
  exit 2
}

dry_run=0
port=${DENSE_DIFFUSION_COORDINATOR_PORT:-12355}
gpus_per_process=1
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --port=*) port=${1#*=} ;;
    --gpus-per-process=*) gpus_per_process=${1#*=} ;;
    -h | --help) usage ;;
    -*) echo "unknown option $1 (options come before NUM_PROCESSES)" >&2; usage ;;
    *) break ;;
  esac
  shift
done
if (($# < 3)) || ! [[ $1 =~ ^[1-9][0-9]*$ && $port =~ ^[0-9]+$ && $gpus_per_process =~ ^[0-9]+$ ]]
then
  usage
fi
num_processes=$1
config=$2
workdir=$3
shift 3

# shellcheck source=launch/_common.sh
source "$(dirname "${BASH_SOURCE[0]}")/_common.sh"

command_of() {  # command_of I OVERRIDES...: the argv of process I, in the array `command`.
  local i=$1 first ids
  shift
  command=("$dd_python" -m dense_diffusion.main train --config="$config" --workdir="$workdir"
    --distributed --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes"
    --process_id="$i")
  if ((gpus_per_process > 0)); then
    first=$((i * gpus_per_process))
    ids=$(seq -s, "$first" $((first + gpus_per_process - 1)))
    command+=(--local_device_ids="$ids")
  fi
  command+=("$@")
}

if ((dry_run)); then
  for ((i = 0; i < num_processes; i++)); do
    command_of "$i" "$@"
    dd_print_command "${command[@]}"
  done
  exit 0
fi

pids=()
stopping=0
# After a failure the others get SIGTERM; one stuck in a collective with the dead process never
# reaches its next step to act on it, so it gets SIGKILL this many seconds later.
grace=${DENSE_DIFFUSION_KILL_AFTER:-120}
kill_at=-1
stop_all() {  # SIGTERM to every process still running (each saves and exits).
  stopping=1
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap stop_all TERM INT

for ((i = 0; i < num_processes; i++)); do
  command_of "$i" "$@"
  # Process substitution keeps $! the Python process's pid (not a pipeline's last stage).
  "${command[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
  pids+=("$!")
done

# Poll rather than `wait`: a trapped signal interrupts `wait`, and `wait -n` cannot say which
# process ended on every bash version. Bash reaps finished children, so `kill -0` fails for them
# and `wait PID` then returns their exit status.
status=0
running=("${!pids[@]}")
while ((${#running[@]})); do
  still=()
  for i in "${running[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    rc=0
    wait "${pids[$i]}" || rc=$?
    if ((rc != 0)); then
      echo "multiprocess.sh: process $i exited with status $rc" >&2
      if ((status == 0)); then
        status=$rc
      fi
      if ((!stopping)); then
        echo "multiprocess.sh: stopping the other processes" >&2
        stop_all
        kill_at=$((SECONDS + grace))
      fi
    fi
  done
  running=(${still[@]+"${still[@]}"})
  if ((kill_at >= 0 && SECONDS >= kill_at)); then
    for i in ${running[@]+"${running[@]}"}; do
      echo "multiprocess.sh: process $i did not stop within ${grace}s; killing it" >&2
      kill -KILL "${pids[$i]}" 2>/dev/null || true
    done
    kill_at=-1
  fi
  if ((${#running[@]})); then
    sleep 0.2
  fi
done
exit "$status"
