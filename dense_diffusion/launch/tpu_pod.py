"""Train on a Cloud TPU VM slice: create (or reuse) it, put the code on every worker, install, run.

    launch/tpu_pod.sh --name=dd-v5e --accelerator-type=v5litepod-16 --zone=us-west4-a \
        --project=MY_PROJECT --spot -- configs/generalist_pixel128.py gs://MY_BUCKET/runs/pixel128 \
        --config.input.data_dir=gs://MY_BUCKET/tensorflow_datasets

Steps, each one gcloud (or git) command that `--dry-run` prints instead of running:
  describe  `gcloud compute tpus tpu-vm describe NAME`: an existing READY slice of the same type
            is reused (a different type or a pre-empted slice is an error that says what to do)
  create    `gcloud compute tpus tpu-vm create NAME --accelerator-type=... --version=...`, only
            when describe found nothing
  archive   `git archive` of HEAD into a tarball (committed files only), and
  copy      `gcloud compute tpus tpu-vm scp --worker=all` of it to every worker; or, with
            --repo URL, every worker clones the repository itself (in the setup step)
  setup     on every worker: unpack (or clone) into ~/dense_diffusion,
            `pip install -e '.[tpu]'`, then --worker-setup if given (e.g. copy weights)
  train     on every worker at once (`ssh --worker=all`):
            `python3 -m dense_diffusion.main train --distributed --config=... --workdir=gs://...`;
            on a TPU VM jax.distributed.initialize() finds the coordinator, the process count and
            this worker's index by itself. With --detach it runs under nohup (log in
            ~/dense_diffusion_train.log on each worker) and this command returns at once.

The workdir must be a gs:// path: the workers share no disk, and orbax checkpoints, TensorBoard
events and eval_metrics.json are written there by the processes that own them.
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

from dense_diffusion.launch import REPO_ROOT

DEFAULT_NAME = "dense-diffusion"
DEFAULT_ACCELERATOR = "v5litepod-16"
# Accelerator-type prefix -> the TPU VM software version (`gcloud ... create --version`) that
# JAX's TPU wheels run on; `--version` overrides it.
RUNTIME_VERSIONS = {
    "v6e": "v2-alpha-tpuv6e",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v4": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v2": "tpu-ubuntu2204-base",
}
# On each worker, relative to the home directory (where gcloud ssh commands start).
REMOTE_DIR = "dense_diffusion"
REMOTE_TARBALL = "dense_diffusion.tar.gz"
REMOTE_LOG = "dense_diffusion_train.log"
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")  # GCE resource names.


@dataclasses.dataclass(frozen=True)
class Step:
  """One command of the plan; `note` is printed as a `# ...` line before it in a dry run."""
  name: str
  argv: list[str]
  note: str = ""


def vm_name(text: str) -> str:
  """A valid TPU VM name from free text (lower case; `_` and `.` become `-`)."""
  name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
  if not name or not name[0].isalpha():
    name = f"dd-{name}"
  return name[:63].rstrip("-")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="launch/tpu_pod.sh",
      usage="%(prog)s [options] -- CONFIG gs://WORKDIR [--config.key=value ...]",
      description="Create or reuse a Cloud TPU VM slice and train on all of its workers.")
  parser.add_argument("--name", default=DEFAULT_NAME, help="TPU VM name (default %(default)s)")
  parser.add_argument("--accelerator-type", default=DEFAULT_ACCELERATOR,
                      help="slice type, e.g. v5litepod-16, v4-32, v6e-64 (default %(default)s)")
  parser.add_argument("--zone", help="default: gcloud's compute/zone property")
  parser.add_argument("--project", help="default: gcloud's core/project property")
  parser.add_argument("--version", help="TPU software version (default: by accelerator type: "
                      + ", ".join(f"{k}: {v}" for k, v in RUNTIME_VERSIONS.items()) + ")")
  capacity = parser.add_mutually_exclusive_group()
  capacity.add_argument("--spot", action="store_true", help="a Spot slice (pre-emptible, cheap)")
  capacity.add_argument("--preemptible", action="store_true", help="a pre-emptible slice")
  parser.add_argument("--repo", help="git URL each worker clones, instead of copying the local "
                      "HEAD")
  parser.add_argument("--branch", help="with --repo: the branch or tag to check out")
  parser.add_argument("--python", default="python3", help="Python on the workers (%(default)s)")
  parser.add_argument("--worker-setup", help="a shell command every worker runs in "
                      "~/dense_diffusion after the install, e.g. copying pre-trained weights: "
                      "'gcloud storage cp -r gs://BUCKET/weights .' (weights are read from "
                      "local disk)")
  parser.add_argument("--detach", action="store_true",
                      help=f"start training under nohup (log: ~/{REMOTE_LOG}) and return")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print every command, one per line, and run nothing")
  return parser


def _gcloud(verb: str, args: argparse.Namespace, *rest: str) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB REST... [--zone] [--project]`."""
  scope = ([f"--zone={args.zone}"] if args.zone else []) + (
      [f"--project={args.project}"] if args.project else [])
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, *rest, *scope]


def runtime_version(args: argparse.Namespace) -> str:
  if args.version:
    return args.version
  for prefix, version in RUNTIME_VERSIONS.items():
    if args.accelerator_type.startswith(prefix):
      return version
  raise ValueError(f"no default TPU software version for --accelerator-type="
                   f"{args.accelerator_type}; give --version (`gcloud compute tpus tpu-vm "
                   "versions list --zone=...` lists them)")


def _git(*args: str) -> str:
  try:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], check=True,
                          capture_output=True, text=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError) as e:
    raise ValueError(f"{REPO_ROOT} is not a git checkout ({e}); give --repo URL so the workers "
                     "clone the code") from None


def train_command(args: argparse.Namespace, config: str, workdir: str,
                  overrides: Sequence[str]) -> str:
  """The shell command every worker runs (the same on all of them)."""
  train = shlex.join([args.python, "-m", "dense_diffusion.main", "train", "--distributed",
                      f"--config={config}", f"--workdir={workdir}", *overrides])
  if args.detach:
    # setsid + nohup: the run outlives the ssh session that started it.
    return (f"cd {REMOTE_DIR} && (setsid nohup {train} > ../{REMOTE_LOG} 2>&1 < /dev/null &)")
  return f"cd {REMOTE_DIR} && {train}"


def plan(args: argparse.Namespace, config: str, workdir: str,
         overrides: Sequence[str]) -> list[Step]:
  """The commands that bring up the slice and start training, in order."""
  if not workdir.startswith("gs://"):
    raise ValueError(f"workdir {workdir!r} is not a gs:// path: the workers of a TPU slice share "
                     "no disk, so checkpoints and metrics must go to a bucket, e.g. "
                     "gs://MY_BUCKET/runs/NAME")
  if not _NAME.match(args.name):
    raise ValueError(f"--name={args.name!r} is not a valid TPU VM name (lower-case letters, "
                     f"digits and -, starting with a letter), e.g. {vm_name(args.name)!r}")
  bad = [o for o in overrides if not o.startswith("-")]
  if bad:
    raise ValueError(f"after CONFIG and WORKDIR only flags may follow (--config.key=value), got "
                     f"{bad}")
  if args.branch and not args.repo:
    raise ValueError("--branch only applies with --repo")
  capacity = ["--spot"] if args.spot else ["--preemptible"] if args.preemptible else []
  steps = [
      Step("describe", _gcloud("describe", args, args.name,
                               "--format=value(state,acceleratorType)"),
           note=f"reuse the TPU VM {args.name} if it exists"),
      Step("create", _gcloud("create", args, args.name,
                             f"--accelerator-type={args.accelerator_type}",
                             f"--version={runtime_version(args)}", *capacity),
           note="only when describe found no such TPU VM"),
  ]
  install = f"cd {REMOTE_DIR} && {shlex.quote(args.python)} -m pip install -q -e '.[tpu]'"
  if args.repo:
    branch = [f"--branch={args.branch}"] if args.branch else []
    fetch = shlex.join(["git", "clone", "--depth=1", *branch, args.repo, REMOTE_DIR])
    setup = f"rm -rf {REMOTE_DIR} && {fetch} && {install}"
  else:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    tarball = f"{tempfile.gettempdir()}/dense_diffusion-{commit[:12]}.tar.gz"
    steps += [
        Step("archive", ["git", "-C", str(REPO_ROOT), "archive", "--format=tar.gz",
                         f"--output={tarball}", "HEAD"],
             note=f"the committed code at {commit[:12]}" + (
                 "; WARNING: the checkout has uncommitted changes, they are not copied"
                 if dirty else "")),
        Step("copy", _gcloud("scp", args, tarball, f"{args.name}:{REMOTE_TARBALL}",
                             "--worker=all")),
    ]
    setup = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
             f"tar -xzf {REMOTE_TARBALL} -C {REMOTE_DIR} && {install}")
  if args.worker_setup:
    setup += f" && {args.worker_setup}"
  steps.append(Step("setup", _gcloud("ssh", args, args.name, "--worker=all",
                                     f"--command={setup}"),
                    note="every worker: the code in ~/dense_diffusion, installed with jax[tpu]"))
  steps.append(Step("train", _gcloud("ssh", args, args.name, "--worker=all",
                                     f"--command={train_command(args, config, workdir, overrides)}"),
                    note="every worker, the same command: one JAX process per host"))
  return steps


def _check_existing(step: Step, output: str, create: Step) -> None:
  """An existing VM is reused only when READY and of the requested type."""
  fields = output.split()
  state = fields[0] if fields else "?"
  kind = fields[1] if len(fields) > 1 else "?"
  name = step.argv[5]
  wanted = next(a.split("=", 1)[1] for a in create.argv if a.startswith("--accelerator-type="))
  if kind != wanted:
    raise RuntimeError(f"TPU VM {name} exists with accelerator type {kind}, not {wanted}: use "
                       "another --name, or delete it (gcloud compute tpus tpu-vm delete "
                       f"{name})")
  if state != "READY":
    raise RuntimeError(f"TPU VM {name} exists but is {state} (a pre-empted Spot slice cannot "
                       f"restart): delete it (gcloud compute tpus tpu-vm delete {name}) and run "
                       "this again; training resumes from the last checkpoint in the workdir")


def execute(steps: Sequence[Step]) -> int:
  """Runs a plan; returns the exit status of the first failing command (0 when all pass)."""
  if shutil.which("gcloud") is None:
    raise RuntimeError("gcloud is not on PATH: install the Google Cloud SDK "
                       "(https://cloud.google.com/sdk/docs/install), or use --dry-run")
  by_name = {s.name: s for s in steps}
  exists = False
  for step in steps:
    if step.name == "describe":
      found = subprocess.run(step.argv, capture_output=True, text=True)
      exists = found.returncode == 0
      if exists:
        _check_existing(step, found.stdout, by_name["create"])
        print(f"reusing the TPU VM {step.argv[5]}", flush=True)
      continue
    if step.name == "create" and exists:
      continue
    print("+ " + shlex.join(step.argv), flush=True)
    status = subprocess.call(step.argv)
    if status:
      print(f"tpu_pod: step {step.name} failed with exit status {status}", file=sys.stderr)
      return status
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  if "--" not in argv:
    parser.error("put CONFIG, the gs:// WORKDIR and the overrides after --")
  at = argv.index("--")
  args = parser.parse_args(argv[:at])
  run_args = argv[at + 1:]
  if len(run_args) < 2:
    parser.error("after -- give CONFIG and a gs:// WORKDIR, then any --config.key=value")
  config, workdir, overrides = run_args[0], run_args[1], run_args[2:]
  try:
    steps = plan(args, config, workdir, overrides)
  except ValueError as e:
    parser.error(str(e))
  if args.dry_run:
    for step in steps:
      if step.note:
        print(f"# {step.note}")
      print(shlex.join(step.argv))
    return 0
  return execute(steps)


def run() -> int:
  """main() for the command line: a mistake in the input is one line, not a traceback."""
  try:
    return main()
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run())
