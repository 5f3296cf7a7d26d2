"""Sweeps: a Python file declares config overrides; each point becomes one run with its own workdir.

A sweep file lives next to the configs (configs/sweeps/*.py) and defines

    from dense_diffusion.launch.sweep import product, sweep, zip_

    CONFIG = "configs/demo.py"  # base config, relative to the repository root
    CONFIG_ARG = "res=32"       # optional: the config's get_config(arg)
    NAME = "demo_lr"            # optional: defaults to the file name

    def get_sweep():
      return product([
          sweep("optimizer.lr", [1e-3, 2e-3]),
          zip_([sweep("batch_size", [8, 16]), sweep("optimizer.warmup_steps", [50, 100])]),
      ])

`sweep(key, values)` is one axis, `product` every combination of its parts, `zip_` the parts
side by side (equal lengths), `chain` one part after another; they nest freely, and get_sweep()
may also return a plain list of {key: value} dicts. Keys are config paths (a leading "config." is
optional). Every key is checked against the base config and every value is passed through the
same ml_collections flag parser `main train` uses, so a typo or a value that cannot be written on
a command line fails here, before anything starts.

    python -m dense_diffusion.launch.sweep configs/sweeps/demo_lr.py --launcher local --dry-run
    python -m dense_diffusion.launch.sweep SWEEP --launcher tpu_pod \
        --workdir_root gs://BUCKET/runs -- --zone=us-west4-a --accelerator-type=v5litepod-16
    python -m dense_diffusion.launch.sweep SWEEP --launcher slurm -- --nodes=2 --partition=gpu

Options after `--` go to the launcher (tpu_pod.sh options, or sbatch options). Each run's workdir
is `<workdir_root>/<NAME>/<key>=<value>,...` over the keys that vary (e.g.
`runs/demo_lr/lr=0.001,batch_size=16`), and a `sweep.json` there lists the runs and their
overrides for `python -m dense_diffusion.launch.summary`.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import importlib.util
import itertools
import json
import os
import posixpath
import re
import shlex
import signal
import subprocess
import sys
from typing import Any, Callable, Iterable, Sequence

from dense_diffusion.launch import LAUNCH_DIR
from dense_diffusion.launch import REPO_ROOT

Point = dict  # config key (no "config." prefix) -> value
MANIFEST = "sweep.json"
# Characters left as they are in a workdir name; every other one becomes "_".
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_NAME = 160  # longer names are cut and end in a hash (file systems allow 255 bytes).


# ----------------------------------------------------------------------------------------------
# Declaring points.


def _key(key: str) -> str:
  if not isinstance(key, str) or not key.strip("."):
    raise ValueError(f"a sweep key must be a config path such as 'optimizer.lr', got {key!r}")
  return key[len("config."):] if key.startswith("config.") else key


def sweep(key: str, values: Iterable[Any]) -> list[Point]:
  """One axis: the points {key: v} for each v of `values`, in order."""
  values = list(values)
  if not values:
    raise ValueError(f"sweep({key!r}, ...) has no values")
  return [{_key(key): v} for v in values]


def _merge(parts: Sequence[Point], how: str) -> Point:
  out: Point = {}
  for part in parts:
    for k, v in part.items():
      if k in out:
        raise ValueError(f"{how}: key {k!r} is set by more than one of its parts")
      out[k] = v
  return out


def _check_parts(parts: Sequence[list[Point]], how: str) -> list[list[Point]]:
  """`parts` must be a list of sweeps, each a list of points (dicts)."""
  ok = isinstance(parts, (list, tuple)) and all(
      isinstance(part, (list, tuple)) and all(isinstance(p, dict) for p in part)
      for part in parts)
  if not ok:
    raise TypeError(f"{how} takes a list of sweeps, e.g. {how}([sweep(...), sweep(...)])")
  return [list(p) for p in parts]


def product(parts: Sequence[list[Point]]) -> list[Point]:
  """Every combination of the parts' points (the last part varies fastest)."""
  parts = _check_parts(parts, "product")
  return [_merge(combo, "product") for combo in itertools.product(*parts)]


def zip_(parts: Sequence[list[Point]]) -> list[Point]:
  """The i-th points of all parts merged into one point; the parts must be equally long."""
  parts = _check_parts(parts, "zip_")
  lengths = [len(p) for p in parts]
  if len(set(lengths)) > 1:
    described = "; ".join(f"{'/'.join(sorted(p[0])) if p else '(empty)'}: {len(p)} values"
                          for p in parts)
    raise ValueError(f"zip_ of sweeps of unequal lengths ({described}); give every zipped "
                     "sweep the same number of values, or use product")
  return [_merge(combo, "zip_") for combo in zip(*parts)]


def chain(parts: Sequence[list[Point]]) -> list[Point]:
  """The parts' points one after another (e.g. a baseline point plus a grid)."""
  return [dict(point) for part in _check_parts(parts, "chain") for point in part]


# ----------------------------------------------------------------------------------------------
# Loading a sweep file, naming and validating its runs.


@dataclasses.dataclass(frozen=True)
class Run:
  """One point of a sweep: its overrides, the workdir named after them, its command-line flags."""
  index: int
  name: str
  workdir: str
  overrides: Point

  @property
  def flags(self) -> list[str]:
    return [override_flag(k, v) for k, v in self.overrides.items()]


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  path: str  # the sweep file
  config: str  # base config file, relative to the repository root
  config_arg: str | None
  points: list[Point]

  @property
  def config_flag(self) -> str:
    """The value of `--config`: the file and, after a colon, its argument."""
    return f"{self.config}:{self.config_arg}" if self.config_arg else self.config


def load(path: str) -> Sweep:
  """Imports a sweep file and expands its points (not yet validated against the config)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"sweep file {path} does not exist (sweeps live in configs/sweeps/)")
  spec = importlib.util.spec_from_file_location(f"_sweep_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for attr in ("CONFIG", "get_sweep"):
    if not hasattr(module, attr):
      raise ValueError(f"sweep file {path} defines no {attr}; a sweep file sets CONFIG (the base "
                       "config, e.g. 'configs/demo.py') and get_sweep() (its points)")
  points = module.get_sweep()
  if not isinstance(points, (list, tuple)) or not all(isinstance(p, dict) for p in points):
    raise TypeError(f"{path}: get_sweep() must return a list of {{key: value}} points (what "
                    "sweep/product/zip_/chain build)")
  if not points:
    raise ValueError(f"{path}: get_sweep() returned no points")
  points = [{_key(k): v for k, v in p.items()} for p in points]
  name = getattr(module, "NAME", None) or os.path.splitext(os.path.basename(path))[0]
  if _UNSAFE.search(name):
    raise ValueError(f"{path}: NAME {name!r} may only use letters, digits and . _ + -")
  return Sweep(name=name, path=path, config=module.CONFIG,
               config_arg=getattr(module, "CONFIG_ARG", None), points=points)


def _format_for_name(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return "-".join(_format_for_name(v) for v in value)
  if isinstance(value, dict):
    return "-".join(f"{k}_{_format_for_name(v)}" for k, v in value.items())
  return str(value).lower() if isinstance(value, bool) else str(value)


def _digest(point: Point) -> str:
  text = json.dumps(point, sort_keys=True, default=repr)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def run_names(points: Sequence[Point]) -> list[str]:
  """Workdir names: `label=value,...` over the keys whose value differs between points.

  The label is the last part of the key (`lr` for optimizer.lr) unless two varying keys share
  it. Characters other than letters, digits and `. _ + -` become `_`; names that would still
  coincide (or are too long) end in a hash of the whole point, so distinct points never share a
  workdir. Identical points are an error (they would write into one workdir).
  """
  seen: dict[str, int] = {}
  for i, p in enumerate(points):
    digest = json.dumps(p, sort_keys=True, default=repr)
    if digest in seen:
      raise ValueError(f"points {seen[digest]} and {i} of the sweep are identical ({p}); every "
                       "point needs its own workdir")
    seen[digest] = i
  keys = list(dict.fromkeys(k for p in points for k in p))
  # A key varies when its value (or its absence, after a chain) is not the same in every point.
  varying = [k for k in keys
             if len({json.dumps(p[k], default=repr) if k in p else None for p in points}) > 1]
  short = {k: k.rsplit(".", 1)[-1] for k in varying}
  clashing = {s for s in short.values() if list(short.values()).count(s) > 1}
  labels = {k: (k if short[k] in clashing else short[k]) for k in varying}
  names = []
  for p in points:
    parts = [f"{labels[k]}={_UNSAFE.sub('_', _format_for_name(p[k])) or '_'}"
             for k in varying if k in p]
    names.append(",".join(parts) or "base")
  plain = list(names)
  for i, (name, p) in enumerate(zip(plain, points)):
    if plain.count(name) > 1 or len(name) > _MAX_NAME:
      names[i] = f"{name[:_MAX_NAME]}-{_digest(p)}"
  return names


def override_flag(key: str, value: Any) -> str:
  """`--config.<key>=<value>` as ml_collections' flag parsers read it back."""
  if isinstance(value, bool):
    text = "true" if value else "false"
  elif isinstance(value, str):
    text = value
  elif isinstance(value, (list, tuple)):
    text = repr(tuple(value))  # the tuple parser reads a Python literal.
  else:
    text = repr(value)
  return f"--config.{key}={text}"


def _plain(value: Any) -> Any:
  """Lists as tuples, ConfigDicts as dicts: how a value read back compares to the intended one."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _parse_config(config_flag: str, flags_: Sequence[str]):
  """The config `main train --config=... <flags>` would build (a fresh absl flag set)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["sweep", f"--config={config_flag}", *flags_]
  values = flags.FlagValues()
  # sys_argv: the override flags are defined from the command line they will parse.
  config_flags.DEFINE_config_file("config", None, "base config", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def _all_keys(config: Any, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    out.append(prefix + k)
    if hasattr(v, "items"):
      out.extend(_all_keys(v, f"{prefix}{k}."))
  return out


def _get(config: Any, key: str) -> Any:
  node = config
  for part in key.split("."):
    if not hasattr(node, "items") or part not in node:
      raise KeyError(key)
    node = node[part]
  return node


def validate(spec: Sweep, repo_root: str | os.PathLike = REPO_ROOT) -> None:
  """Fails (ValueError naming the key) unless every point reaches the base config as written."""
  config_path = os.path.join(repo_root, spec.config)
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"{spec.path}: CONFIG {spec.config!r} is not a file under the "
                            f"repository root {repo_root}")
  local_flag = config_path + (f":{spec.config_arg}" if spec.config_arg else "")
  base = _parse_config(local_flag, [])
  known = _all_keys(base)
  for key in dict.fromkeys(k for p in spec.points for k in p):
    try:
      current = _get(base, key)
    except KeyError:
      close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
      hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
      raise ValueError(f"{spec.path}: unknown config key {key!r} (not in {spec.config}){hint}"
                       ) from None
    if isinstance(current, list):
      raise ValueError(f"{spec.path}: config key {key!r} is a list ({current!r}); ml_collections "
                       "cannot set lists from a command line (numbers, strings, bools and tuples "
                       "it can): change it in the config file or through its argument")
  for i, point in enumerate(spec.points):
    flags_ = [override_flag(k, v) for k, v in point.items()]
    try:
      config = _parse_config(local_flag, flags_)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"{spec.path}: point {i} {point} cannot be passed as command-line "
                       f"overrides {flags_}: {type(e).__name__}: {e}") from None
    for key, value in point.items():
      got = _get(config, key)
      if _plain(got) != _plain(value):
        raise ValueError(f"{spec.path}: {key}={value!r} reaches the config as {got!r} "
                         f"({type(got).__name__}); use a value of the config's type")


def expand(spec: Sweep, workdir_root: str) -> list[Run]:
  """One Run per point, with workdirs `<workdir_root>/<sweep name>/<run name>`."""
  names = run_names(spec.points)
  root = posixpath.join(workdir_root, spec.name)  # posixpath keeps the // of gs:// intact.
  return [Run(index=i, name=n, workdir=posixpath.join(root, n), overrides=dict(p))
          for i, (n, p) in enumerate(zip(names, spec.points))]


def write_manifest(spec: Sweep, runs: Sequence[Run], workdir_root: str, launcher: str) -> str:
  """`<workdir_root>/<name>/sweep.json`: the runs and their overrides, for the summary."""
  from etils import epath  # local paths and gs:// alike.
  directory = epath.Path(workdir_root) / spec.name
  directory.mkdir(parents=True, exist_ok=True)
  manifest = {"name": spec.name, "sweep_file": spec.path, "config": spec.config_flag,
              "launcher": launcher,
              "runs": [{"name": r.name, "overrides": r.overrides, "flags": r.flags}
                       for r in runs]}
  path = directory / MANIFEST
  path.write_text(json.dumps(manifest, indent=2, default=repr))
  return str(path)


# ----------------------------------------------------------------------------------------------
# Launchers: what a run's command is, and how it is started.


def repo_relative(path: str) -> str:
  """A workdir for a command that runs in the repository root: relative ones are made absolute
  unless the current directory is that root (URLs such as gs://... stay as they are)."""
  if "://" in path or os.path.isabs(path) or os.path.realpath(os.getcwd()) == str(REPO_ROOT):
    return path
  return os.path.abspath(path)


@dataclasses.dataclass(frozen=True)
class Command:
  argv: list[str]
  note: str = ""  # printed as a `# ...` line before the command in a dry run


class LocalLauncher:
  """The runs one after another on this machine, through launch/local.sh."""

  stop_requested = False  # set by SIGTERM: the current run saves, no further run starts.

  def commands(self, spec: Sweep, run: Run, options: Sequence[str]) -> list[Command]:
    if options:
      raise ValueError(f"the local launcher takes no options after --, got {list(options)}")
    return [Command([os.path.relpath(LAUNCH_DIR / "local.sh", REPO_ROOT), spec.config_flag,
                     run.workdir, *run.flags])]

  def launch(self, commands: list[Command]) -> int:
    """Runs in the foreground; SIGTERM to the sweep goes to the run (which saves and exits)."""
    (command,) = commands
    proc = subprocess.Popen(command.argv, cwd=REPO_ROOT)

    def forward(signum, _):
      proc.send_signal(signum)
      self.stop_requested = True

    previous = signal.signal(signal.SIGTERM, forward)
    try:
      return proc.wait()
    finally:
      signal.signal(signal.SIGTERM, previous)


class TpuPodLauncher:
  """Each run on its own TPU VM slice (`<name>-<index>`), detached; launch/tpu_pod.sh's plan."""

  stop_requested = False

  def _options(self, spec: Sweep, run: Run, options: Sequence[str]):
    from dense_diffusion.launch import tpu_pod
    args = tpu_pod.build_parser().parse_args(list(options))
    if args.dry_run:
      raise ValueError("give --dry-run to the sweep, not after --")
    base = args.name if args.name != tpu_pod.DEFAULT_NAME else spec.name
    args.name = tpu_pod.vm_name(f"{base}-{run.index}")
    args.detach = True  # start every run, then return; the slices train in parallel.
    return tpu_pod, args

  def commands(self, spec: Sweep, run: Run, options: Sequence[str]) -> list[Command]:
    tpu_pod, args = self._options(spec, run, options)
    # tpu_pod.Step has the argv and note of a Command, plus the step name execute() needs.
    return tpu_pod.plan(args, spec.config_flag, run.workdir, run.flags)

  def launch(self, commands: list[Any]) -> int:
    from dense_diffusion.launch import tpu_pod
    return tpu_pod.execute(commands)


class SlurmLauncher:
  """Each run submitted as its own job (`sbatch ... launch/slurm.sbatch`)."""

  stop_requested = False

  def commands(self, spec: Sweep, run: Run, options: Sequence[str]) -> list[Command]:
    from dense_diffusion.launch import slurm
    return [Command(slurm.sbatch_command(spec.config_flag, run.workdir, run.flags,
                                         sbatch_options=options,
                                         job_name=f"{spec.name}-{run.index}"))]

  def launch(self, commands: list[Command]) -> int:
    (command,) = commands
    return subprocess.call(command.argv, cwd=REPO_ROOT)


LAUNCHERS: dict[str, Any] = {
    "local": LocalLauncher(),
    "tpu_pod": TpuPodLauncher(),
    "slurm": SlurmLauncher(),
}


# ----------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m dense_diffusion.launch.sweep",
      description="Expand a sweep file into runs and print (--dry-run) or start them.",
      epilog="Options after -- go to the launcher: launch/tpu_pod.sh options for tpu_pod (e.g. "
             "--zone=... --accelerator-type=...), sbatch options for slurm (e.g. --nodes=2).")
  parser.add_argument("sweep_file", help="a sweep file, e.g. configs/sweeps/demo_lr.py")
  parser.add_argument("--launcher", required=True, choices=sorted(LAUNCHERS))
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print every command, one per line, and start nothing")
  parser.add_argument("--workdir_root", "--workdir-root", dest="workdir_root", default="runs",
                      help="runs go to WORKDIR_ROOT/<sweep name>/<run name> (gs:// for TPU pods)")
  return parser


def main(argv: Sequence[str] | None = None, out: Callable[[str], None] = print) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  launcher_options: list[str] = []
  if "--" in argv:
    at = argv.index("--")
    argv, launcher_options = argv[:at], argv[at + 1:]
  args = _parser().parse_args(argv)
  spec = load(args.sweep_file)
  validate(spec)
  root = repo_relative(args.workdir_root)
  runs = expand(spec, root)
  launcher = LAUNCHERS[args.launcher]
  # Every command is built before anything starts: a bad option fails with nothing launched.
  planned = [(run, launcher.commands(spec, run, launcher_options)) for run in runs]
  out(f"# sweep {spec.name}: {len(runs)} runs of {spec.config_flag}, launcher {args.launcher}")
  if os.path.realpath(os.getcwd()) != str(REPO_ROOT):
    out(f"# commands run in the repository root {REPO_ROOT}")
  if args.dry_run:
    for run, commands in planned:
      out(f"# run {run.index + 1}/{len(runs)}: {run.workdir}")
      for command in commands:
        if command.note:
          out(f"# {command.note}")
        out(shlex.join(command.argv))
    return 0
  out(f"# wrote {write_manifest(spec, runs, root, args.launcher)}")
  failed = []
  for run, commands in planned:
    out(f"# run {run.index + 1}/{len(runs)}: {run.workdir}")
    status = launcher.launch(commands)
    if status:
      failed.append(run.name)
      out(f"# run {run.name} failed with status {status}")
    if launcher.stop_requested:
      out("# SIGTERM: the current run saved and stopped; the remaining runs were not started")
      return 0 if not failed else 1
  if failed:
    out(f"# {len(failed)} of {len(runs)} runs failed: {', '.join(failed)}")
    return 1
  return 0


def run() -> int:
  """main() for the command line: a mistake in the input is one line, not a traceback."""
  try:
    return main()
  except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(run())
