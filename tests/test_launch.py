"""Launchers and sweeps: dry runs parsed back argument by argument, the shell scripts' process
handling (with a stand-in Python), sweep expansion and validation, workdir names, the summary.

No JAX, no network, no gcloud / sbatch: every command is printed (--dry-run) or run against a
fake interpreter (DENSE_DIFFUSION_PYTHON), so these run in a few seconds.
"""
import csv
import io
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import time

import pytest

from dense_diffusion.launch import slurm
from dense_diffusion.launch import summary
from dense_diffusion.launch import sweep as sweep_lib
from dense_diffusion.launch import tpu_pod
from dense_diffusion.launch.sweep import chain, product, sweep, zip_

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 60  # seconds a launcher script (a dry run, or fake processes) may take
DEMO = "configs/demo.py"

# A 4-point sweep whose values need quoting: spaces, commas, quotes, $ and backticks, tuples.
TRICKY_SWEEP = '''
from dense_diffusion.launch.sweep import product, sweep, zip_
CONFIG = "configs/demo.py"
NAME = "tricky"
def get_sweep():
  return product([
      sweep("config.optimizer.lr", [1e-3, 2.5e-4]),
      zip_([sweep("input.data_dir", ["/data/my dir", "it's, \\"quoted\\" $HOME `x`"]),
            sweep("tasks", [("depth", "normals"), ["semantic"]])]),
  ])
'''
TRICKY_POINTS = [
    {"optimizer.lr": lr, "input.data_dir": d, "tasks": t}
    for lr in (1e-3, 2.5e-4)
    for d, t in (("/data/my dir", ("depth", "normals")),
                 ("it's, \"quoted\" $HOME `x`", ("semantic",)))]
TRICKY_FLAGS = [
    ["--config.optimizer.lr=" + repr(p["optimizer.lr"]),
     "--config.input.data_dir=" + p["input.data_dir"],
     "--config.tasks=" + repr(tuple(p["tasks"]))] for p in TRICKY_POINTS]


def _write(tmp_path, text, name="tricky.py"):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def _sweep_dry_run(args):
  lines = []
  assert sweep_lib.main(args, out=lines.append) == 0
  return lines


def _commands_by_run(lines):
  """{run number: [argv, ...]} from a sweep dry run (comment lines separate the runs)."""
  runs, current = {}, None
  for line in lines:
    match = re.match(r"# run (\d+)/\d+: ", line)
    if match:
      current = int(match.group(1))
      runs[current] = []
    elif not line.startswith("#"):
      runs[current].append(shlex.split(line))
  return runs


def _config_values(flags):
  """What `main train` makes of the overrides: the parsed config's values of the swept keys."""
  config = sweep_lib._parse_config(str(REPO / DEMO), flags)
  return {"optimizer.lr": config.optimizer.lr, "input.data_dir": config.input.data_dir,
          "tasks": tuple(config.tasks)}


def _option(argv, name):
  values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
  assert len(values) == 1, (name, argv)
  return values[0]


# ------------------------------------------------------------------------------------------
# Sweep expansion.


def test_product_zip_and_nesting():
  points = product([sweep("a", [1, 2]), zip_([sweep("config.b", ["x", "y"]),
                                              sweep("c.d", [True, False])])])
  assert points == [{"a": 1, "b": "x", "c.d": True}, {"a": 1, "b": "y", "c.d": False},
                    {"a": 2, "b": "x", "c.d": True}, {"a": 2, "b": "y", "c.d": False}]
  # zip of products, and chain of a single point with a grid.
  zipped = zip_([product([sweep("a", [1, 2]), sweep("b", [3, 4])]), sweep("c", "wxyz")])
  assert [p["c"] for p in zipped] == list("wxyz")
  assert [(p["a"], p["b"]) for p in zipped] == [(1, 3), (1, 4), (2, 3), (2, 4)]
  assert chain([[{"a": 0}], sweep("a", [1, 2])]) == [{"a": 0}, {"a": 1}, {"a": 2}]


def test_zip_of_unequal_lengths_and_repeated_keys_fail():
  with pytest.raises(ValueError, match=r"unequal lengths \(a: 2 values; b: 3 values\)"):
    zip_([sweep("a", [1, 2]), sweep("b", [1, 2, 3])])
  with pytest.raises(ValueError, match="'a' is set by more than one"):
    product([sweep("a", [1]), sweep("config.a", [2])])
  with pytest.raises(ValueError, match="no values"):
    sweep("a", [])
  with pytest.raises(TypeError, match="takes a list of sweeps"):
    product(sweep("a", [1, 2]))  # one sweep, not a list of them


def test_unknown_key_fails_before_anything_launches(tmp_path):
  path = _write(tmp_path, 'CONFIG = "configs/demo.py"\n'
                'from dense_diffusion.launch.sweep import sweep\n'
                'def get_sweep():\n  return sweep("optimizer.lrr", [1e-3, 2e-3])\n')
  printed = []
  with pytest.raises(ValueError, match=r"unknown config key 'optimizer.lrr'.*did you mean "
                                       r"'optimizer.lr'"):
    sweep_lib.main([path, "--launcher", "local"], out=printed.append)
  assert printed == []  # nothing was started or even announced.


@pytest.mark.parametrize("body, message", [
    ('sweep("batch_size", ["sixteen"])', "'sixteen'.* cannot be passed.*invalid literal"),
    ('sweep("model.unet.block_out_channels", [[8, 16, 32]])', "'model.unet.block_out_channels' is a "
     "list"),
])
def test_values_the_command_line_cannot_carry_fail(tmp_path, body, message):
  path = _write(tmp_path, 'CONFIG = "configs/demo.py"\n'
                'from dense_diffusion.launch.sweep import sweep\n'
                f'def get_sweep():\n  return {body}\n')
  with pytest.raises(ValueError, match=message):
    sweep_lib.validate(sweep_lib.load(path))


def test_workdir_names():
  names = sweep_lib.run_names(product([sweep("total_steps", [300]),
                                       sweep("optimizer.lr", [1e-3, 2e-3]),
                                       sweep("batch_size", [8, 16])]))
  # Only the varying keys, by their last component; the brief's example name.
  assert names[1] == "lr=0.001,batch_size=16"
  assert len(set(names)) == 4
  # Two varying keys ending in the same word keep their full paths.
  assert sweep_lib.run_names(zip_([sweep("model.dtype", ["float32", "bfloat16"]),
                                   sweep("input.dtype", ["a", "b"])])) == [
                                       "model.dtype=float32,input.dtype=a",
                                       "model.dtype=bfloat16,input.dtype=b"]
  # Unsafe characters become "_"; names that then coincide get a hash of the whole point.
  odd = sweep_lib.run_names(sweep("input.data_dir", ["a b", "a/b", "x, 'y'", ("p", 1)]))
  assert all(re.fullmatch(r"[A-Za-z0-9._+=,-]+", n) for n in odd), odd
  assert len(set(odd)) == 4
  assert odd[0].startswith("data_dir=a_b-") and odd[1].startswith("data_dir=a_b-")
  assert odd[3] == "data_dir=p-1"
  long = sweep_lib.run_names(sweep("k", ["v" * 300, "w" * 300]))
  assert all(len(n) <= 170 for n in long) and long[0] != long[1]
  assert sweep_lib.run_names([{"a": 1}]) == ["base"]
  with pytest.raises(ValueError, match="identical"):
    sweep_lib.run_names([{"a": 1}, {"a": 1}])


def test_repository_sweep_file_expands_and_validates():
  spec = sweep_lib.load(str(REPO / "configs/sweeps/demo_lr.py"))
  sweep_lib.validate(spec)
  runs = sweep_lib.expand(spec, "runs")
  assert [r.workdir for r in runs] == [
      "runs/demo_lr/lr=0.001,batch_size=8", "runs/demo_lr/lr=0.001,batch_size=16",
      "runs/demo_lr/lr=0.002,batch_size=8", "runs/demo_lr/lr=0.002,batch_size=16"]
  assert runs[3].flags == ["--config.total_steps=300", "--config.optimizer.lr=0.002",
                           "--config.batch_size=16"]


# ------------------------------------------------------------------------------------------
# Dry runs of the launchers, for the 4-point sweep.


def test_tpu_pod_dry_run_of_a_sweep(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  path = _write(tmp_path, TRICKY_SWEEP)
  lines = _sweep_dry_run([path, "--launcher", "tpu_pod", "--dry-run", "--workdir_root",
                          "gs://bucket/runs", "--", "--zone=us-west4-a", "--project=proj",
                          "--accelerator-type=v5litepod-16", "--spot"])
  runs = _commands_by_run(lines)
  assert sorted(runs) == [1, 2, 3, 4]
  workdirs, names, skeletons = [], [], []
  for number, commands in runs.items():
    verbs = [argv[4] if argv[0] == "gcloud" else argv[0] for argv in commands]
    assert verbs == ["describe", "create", "git", "scp", "ssh", "ssh"]
    describe, create, archive, copy, setup, train = commands
    name = describe[5]
    names.append(name)
    assert name == f"tricky-{number - 1}"
    assert _option(create, "--accelerator-type") == "v5litepod-16"
    assert _option(create, "--version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in create and "--preemptible" not in create
    for argv in (describe, create, copy, setup, train):
      assert _option(argv, "--zone") == "us-west4-a" and _option(argv, "--project") == "proj"
    assert archive[-1] == "HEAD" and _option(archive, "--output") == copy[5]
    for argv in (copy, setup, train):  # every worker gets the code, the install, the command
      assert "--worker=all" in argv
    assert "pip install -q -e '.[tpu]'" in _option(setup, "--command")
    # The training command, as the remote shell splits it.
    remote = shlex.split(_option(train, "--command"))
    assert remote[:3] == ["cd", "dense_diffusion", "&&"]
    body = remote[remote.index("python3"):remote.index(">")]  # detached: nohup ... > log
    assert body[:6] == ["python3", "-m", "dense_diffusion.main", "train", "--distributed",
                        "--config=configs/demo.py"]
    workdir = _option(body, "--workdir")
    assert workdir.startswith("gs://bucket/runs/tricky/")
    workdirs.append(workdir)
    overrides = body[7:]
    assert overrides == TRICKY_FLAGS[number - 1]
    assert _config_values(overrides) == TRICKY_POINTS[number - 1]
    skeletons.append([c for c in commands[4:] for c in c if name not in c and workdir not in c
                      and not c.startswith("--command")])
  assert len(set(workdirs)) == 4 and len(set(names)) == 4
  assert all(s == skeletons[0] for s in skeletons)  # the runs differ only where they should
  # Slice names derive from the sweep name, made valid for GCE.
  assert tpu_pod.vm_name("demo_lr-3") == "demo-lr-3" and tpu_pod.vm_name("3x") == "dd-3x"


def test_tpu_pod_script(tmp_path):
  overrides = ["--config.input.data_dir=gs://b/my data", "--config.tasks=('depth',)"]
  out = subprocess.run(
      ["bash", str(REPO / "launch/tpu_pod.sh"), "--dry-run", "--accelerator-type=v4-32",
       "--preemptible", "--repo=https://example.com/dd.git", "--branch=main",
       "--worker-setup=gcloud storage cp -r gs://b/weights .", "--",
       "configs/generalist_pixel128.py", "gs://b/runs/x", *overrides],
      capture_output=True, text=True, check=True, timeout=TIMEOUT).stdout
  commands = [shlex.split(l) for l in out.splitlines() if not l.startswith("#")]
  assert [c[4] for c in commands] == ["describe", "create", "ssh", "ssh"]  # no scp: it clones
  create, setup, train = commands[1], commands[2], commands[3]
  assert _option(create, "--version") == "tpu-ubuntu2204-base" and "--preemptible" in create
  assert "--zone" not in " ".join(create)  # left to gcloud's configured default
  assert shlex.split(_option(setup, "--command"))[4:10] == [
      "git", "clone", "--depth=1", "--branch=main", "https://example.com/dd.git",
      "dense_diffusion"]
  assert _option(setup, "--command").endswith(
      " && python3 -m pip install -q -e '.[tpu]' && gcloud storage cp -r gs://b/weights .")
  remote = shlex.split(_option(train, "--command"))
  assert remote[3:] == ["python3", "-m", "dense_diffusion.main", "train", "--distributed",
                        "--config=configs/generalist_pixel128.py", "--workdir=gs://b/runs/x",
                        *overrides]
  for bad, message in ((["--", "configs/demo.py", "runs/local"], "not a gs:// path"),
                       (["--name=Bad_Name", "--", "c", "gs://b/x"], "not a valid TPU VM name"),
                       (["configs/demo.py", "gs://b/x"], "after --"),
                       (["--accelerator-type=v9-8", "--", "c", "gs://b/x"], "give --version")):
    failed = subprocess.run(["bash", str(REPO / "launch/tpu_pod.sh"), "--dry-run", *bad],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert failed.returncode == 2 and message in failed.stderr, failed.stderr


def test_slurm_dry_run_of_a_sweep(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  path = _write(tmp_path, TRICKY_SWEEP)
  lines = _sweep_dry_run([path, "--launcher", "slurm", "--dry-run", "--workdir_root",
                          "/shared/runs", "--", "--nodes=2", "--partition=gpu"])
  runs = _commands_by_run(lines)
  workdirs = []
  for number, (argv,) in runs.items():
    assert argv[:4] == ["sbatch", f"--job-name=tricky-{number - 1}", "--nodes=2",
                        "--partition=gpu"]
    assert argv[4:6] == ["launch/slurm.sbatch", "configs/demo.py"]
    workdirs.append(argv[6])
    assert argv[7:] == TRICKY_FLAGS[number - 1]
    # What srun then runs on every node: the sbatch script's own dry run of those arguments.
    node = subprocess.run(["bash", argv[4], "--dry-run", *argv[5:]], cwd=REPO, check=True,
                          capture_output=True, text=True,
                          env=dict(os.environ, SLURM_GPUS_ON_NODE="8"), timeout=TIMEOUT).stdout
    node = shlex.split(node)
    assert node[:3] == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    at = node.index("-m")
    assert node[at:] == ["-m", "dense_diffusion.main", "train", "--distributed",
                         "--local_device_ids=0,1,2,3,4,5,6,7", "--config=configs/demo.py",
                         f"--workdir={argv[6]}", *TRICKY_FLAGS[number - 1]]
    assert _config_values(node[at + 7:]) == TRICKY_POINTS[number - 1]
  assert len(set(workdirs)) == 4 and all(w.startswith("/shared/runs/tricky/") for w in workdirs)
  # One task per node with every GPU of it: the script's own SBATCH header.
  header = (REPO / "launch/slurm.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --gpus-per-node=8" in header


def test_slurm_module_dry_run(capsys):
  assert slurm.main(["--dry-run", "--nodes=2", "--", DEMO, "/shared/x", "--config.seed=3"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert shlex.split(lines[0]) == ["sbatch", "--nodes=2", "launch/slurm.sbatch", DEMO,
                                   "/shared/x", "--config.seed=3"]
  node = shlex.split(lines[2])
  assert node[node.index("--distributed"):] == [
      "--distributed", "--local_device_ids=0,1,2,3,4,5,6,7", f"--config={DEMO}",
      "--workdir=/shared/x", "--config.seed=3"]


def test_local_dry_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  path = _write(tmp_path, TRICKY_SWEEP)
  runs = _commands_by_run(_sweep_dry_run([path, "--launcher", "local", "--dry-run"]))
  for number, (argv,) in runs.items():
    assert argv[:2] == ["launch/local.sh", DEMO]
    assert argv[2].startswith("runs/tricky/") and argv[3:] == TRICKY_FLAGS[number - 1]
    printed = subprocess.run(["bash", argv[0], "--dry-run", *argv[1:]], cwd=REPO, check=True,
                             capture_output=True, text=True, timeout=TIMEOUT).stdout
    python, *rest = shlex.split(printed)
    assert rest == ["-m", "dense_diffusion.main", "train", f"--config={DEMO}",
                    f"--workdir={argv[2]}", *TRICKY_FLAGS[number - 1]]
  assert len({argv[2] for (argv,) in runs.values()}) == 4
  usage = subprocess.run(["bash", str(REPO / "launch/local.sh"), DEMO], capture_output=True,
                         text=True, timeout=TIMEOUT)
  assert usage.returncode == 2 and "usage:" in usage.stderr


def test_multiprocess_dry_run():
  out = subprocess.run(["bash", str(REPO / "launch/multiprocess.sh"), "--dry-run",
                        "--port=4321", "--gpus-per-process=2", "2", DEMO, "runs/x",
                        "--config.input.data_dir=/a b"],
                       capture_output=True, text=True, check=True, timeout=TIMEOUT).stdout.splitlines()
  assert len(out) == 2
  for i, line in enumerate(out):
    argv = shlex.split(line)
    assert argv[1:] == ["-m", "dense_diffusion.main", "train", f"--config={DEMO}",
                        "--workdir=runs/x", "--distributed",
                        "--coordinator_address=127.0.0.1:4321", "--num_processes=2",
                        f"--process_id={i}", f"--local_device_ids={2 * i},{2 * i + 1}",
                        "--config.input.data_dir=/a b"]


# ------------------------------------------------------------------------------------------
# The scripts' process handling, with a stand-in interpreter.

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for `python -m dense_diffusion.main train ...`: records, fails or waits for SIGTERM.
for a in "$@"; do
  case $a in
    --process_id=*) i=${a#*=} ;;
    --workdir=*) workdir=${a#*=} ;;
    --config.optimizer.lr=*) lr=${a#*=} ;;
  esac
done
i=${i:-0}
if [[ -n ${FAKE_METRICS:-} ]]; then  # a finished run: its eval_metrics.json
  mkdir -p "$workdir"
  echo "{\"20\": {\"depth\": {\"abs_rel\": $lr, \"baseline\": {\"abs_rel\": 0.4}}}}" \
    > "$workdir/eval_metrics.json"
  exit 0
fi
# The train loop's answer to SIGTERM: save, exit 0.
trap 'kill "${sleeper:-}" 2>/dev/null; touch "$FAKE_DIR/saved_$i"; exit 0' TERM
touch "$FAKE_DIR/started_$i"
if [[ ${FAKE_FAIL:-} == "$i" ]]; then
  # Fail once every process is up (and has its SIGTERM handler, as a training run would).
  for _ in $(seq 200); do
    (($(find "$FAKE_DIR" -name 'started_*' | wc -l) >= FAKE_N)) && break
    sleep 0.05
  done
  exit 3
fi
sleep 60 > /dev/null 2>&1 &
sleeper=$!
wait "$sleeper"
"""


@pytest.fixture
def fake_python(tmp_path):
  path = tmp_path / "fake_python"
  path.write_text(FAKE_PYTHON)
  path.chmod(0o755)
  return dict(os.environ, DENSE_DIFFUSION_PYTHON=str(path), FAKE_DIR=str(tmp_path))


def test_multiprocess_propagates_a_failure(tmp_path, fake_python):
  done = subprocess.run(["bash", str(REPO / "launch/multiprocess.sh"), "3", DEMO, "runs/x"],
                        env=dict(fake_python, FAKE_FAIL="1", FAKE_N="3"), capture_output=True,
                        text=True,
                        timeout=50)
  assert done.returncode == 3, done.stderr
  assert "process 1 exited with status 3" in done.stderr
  # The others were stopped (they would sleep 60 s past the timeout), each saving on SIGTERM.
  assert {p.name for p in tmp_path.glob("saved_*")} == {"saved_0", "saved_2"}


def test_multiprocess_forwards_sigterm(tmp_path, fake_python):
  proc = subprocess.Popen(["bash", str(REPO / "launch/multiprocess.sh"), "2", DEMO, "runs/x"],
                          env=fake_python, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 30
  while len(list(tmp_path.glob("started_*"))) < 2 and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=30) == 0  # every process saved and exited 0: a clean pre-emption
  assert {p.name for p in tmp_path.glob("saved_*")} == {"saved_0", "saved_1"}


def test_local_sweep_runs_then_summary(tmp_path, fake_python, monkeypatch, capsys):
  """Sequential local runs write the manifest and (fake) metrics; the summary collects them."""
  for k, v in fake_python.items():
    monkeypatch.setenv(k, v)
  monkeypatch.setenv("FAKE_METRICS", "1")
  path = _write(tmp_path, TRICKY_SWEEP)
  root = tmp_path / "runs"
  assert sweep_lib.main([path, "--launcher", "local", "--workdir_root", str(root)],
                        out=lambda _: None) == 0
  manifest = json.loads((root / "tricky/sweep.json").read_text())
  assert [r["flags"] for r in manifest["runs"]] == TRICKY_FLAGS
  assert summary.main([str(root / "tricky")]) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[0] == "| run | optimizer.lr | input.data_dir | tasks | status | step | depth/abs_rel |"
  assert len(table) == 2 + 4 + 1  # header, rule, 4 runs, the baseline row
  assert table[2].endswith("| 0.001 | /data/my dir | depth,normals | evaluated | 20 | 0.001 |")
  assert table[-1] == "| trivial baseline |  |  |  |  |  | 0.4 |"


# ------------------------------------------------------------------------------------------
# Summary.


def _fake_tree(root: pathlib.Path):
  """A sweep of 4 runs (2 evaluated at steps 100 and 300, 1 without metrics, 1 not started)
  and an unrelated run found by its eval_metrics.json."""
  names = ["lr=0.001,batch_size=8", "lr=0.002,batch_size=8", "lr=0.001,batch_size=16",
           "lr=0.002,batch_size=16"]
  overrides = [{"optimizer.lr": float(n[3:8]), "batch_size": int(n.rsplit("=", 1)[1])}
               for n in names]
  (root / "demo_lr").mkdir(parents=True)
  (root / "demo_lr/sweep.json").write_text(json.dumps(
      {"name": "demo_lr", "runs": [{"name": n, "overrides": o}
                                   for n, o in zip(names, overrides)]}))
  for i, name in enumerate(names[:3]):
    run = root / "demo_lr" / name
    (run / "checkpoints/300").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    if i < 2:
      metrics = {str(step): {
          "depth": {"abs_rel": 0.5 - i / 10 - step / 1000, "rmse": 1.0, "num_examples": 64,
                    "baseline": {"abs_rel": 0.4, "rmse": 1.2}},
          "semantic": {"miou": 0.25 + i / 10, "pixel_accuracy": 0.7, "num_examples": 64,
                       "baseline": {"miou": 0.11, "pixel_accuracy": 0.5}}}
                 for step in (100, 300)}
      (run / "eval_metrics.json").write_text(json.dumps(metrics))
  (root / "other/solo").mkdir(parents=True)
  (root / "other/solo/eval_metrics.json").write_text(json.dumps(
      {"50": {"denoise": {"psnr": 20.5, "ssim": 0.5, "num_examples": 8,
                          "baseline": {"psnr": 21.0, "ssim": 0.6}}}}))


def test_summary_markdown_and_csv(tmp_path, capsys):
  _fake_tree(tmp_path)
  out_csv, out_md = tmp_path / "s.csv", tmp_path / "s.md"
  assert summary.main([str(tmp_path), "--csv", str(out_csv), "--markdown", str(out_md)]) == 0
  printed = capsys.readouterr().out
  assert out_md.read_text() == printed
  lines = printed.splitlines()
  assert lines[0] == ("| run | optimizer.lr | batch_size | status | step | depth/abs_rel | "
                      "depth/rmse | semantic/miou | semantic/pixel_accuracy | denoise/psnr | "
                      "denoise/ssim |")
  assert lines[2:] == [
      "| demo_lr/lr=0.001,batch_size=8 | 0.001 | 8 | evaluated | 300 | 0.2 | 1 | 0.25 | 0.7 "
      "|  |  |",
      "| demo_lr/lr=0.002,batch_size=8 | 0.002 | 8 | evaluated | 300 | 0.1 | 1 | 0.35 | 0.7 "
      "|  |  |",
      "| demo_lr/lr=0.001,batch_size=16 | 0.001 | 16 | no metrics yet |  |  |  |  |  |  |  |",
      "| demo_lr/lr=0.002,batch_size=16 | 0.002 | 16 | not started |  |  |  |  |  |  |  |",
      "| other/solo |  |  | evaluated | 50 |  |  |  |  | 20.5 | 0.5 |",
      "| trivial baseline |  |  |  |  | 0.4 | 1.2 | 0.11 | 0.5 | 21 | 0.6 |"]
  rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
  assert [r["run"] for r in rows] == [l.split(" | ")[0][2:] for l in lines[2:7]]
  assert rows[1]["depth/abs_rel"] == repr(0.5 - 0.1 - 0.3) and rows[1]["step"] == "300"
  assert rows[1]["depth/num_examples"] == "64" and rows[1]["depth/baseline/rmse"] == "1.2"
  assert rows[2]["status"] == "no metrics yet" and rows[2]["depth/abs_rel"] == ""
  assert rows[3]["status"] == "not started" and rows[3]["batch_size"] == "16"
  assert rows[4]["denoise/psnr"] == "20.5" and rows[4]["optimizer.lr"] == ""


def test_summary_of_one_sweep_and_metric_selection(tmp_path, capsys):
  _fake_tree(tmp_path)
  assert summary.main([str(tmp_path / "demo_lr"), "--metrics", "abs_rel,semantic/miou"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[0] == ("| run | optimizer.lr | batch_size | status | step | depth/abs_rel | "
                      "semantic/miou |")
  assert lines[2] == "| lr=0.001,batch_size=8 | 0.001 | 8 | evaluated | 300 | 0.2 | 0.25 |"
  assert len(lines) == 2 + 4 + 1
  # A folder that is not a sweep's: runs named key=value,... get their overrides from the name.
  (tmp_path / "loose/seed=3,res=64").mkdir(parents=True)
  (tmp_path / "loose/seed=3,res=64/config.json").write_text("{}")
  assert summary.main([str(tmp_path / "loose")]) == 0
  assert capsys.readouterr().out.splitlines()[2] == "| seed=3,res=64 | 3 | 64 | no metrics yet |  |"
  # The root may be one run's workdir itself.
  assert summary.main([str(tmp_path / "other/solo")]) == 0
  assert capsys.readouterr().out.splitlines()[2] == "| . | evaluated | 50 | 20.5 | 0.5 |"


def test_summary_keeps_gs_paths(tmp_path, monkeypatch, capsys):
  """gs:// roots go through etils.epath with the double slash intact (here onto a local dir)."""
  from etils.epath import gpath
  from etils.epath import testing as epath_testing
  # TensorFlow's GCS file system would be chosen (and reach the network) were TF not hidden.
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  _fake_tree(tmp_path / "gs:" / "bucket" / "runs")
  monkeypatch.chdir(tmp_path)  # the OS resolves "gs://bucket/..." to ./gs:/bucket/...
  seen = []

  def record(original, path, *args, **kwargs):
    seen.append(os.fspath(path))
    return original(path, *args, **kwargs)

  with epath_testing.mock_epath(open=record, exists=record, isdir=record, listdir=record):
    assert summary.main(["gs://bucket/runs"]) == 0
  assert len(capsys.readouterr().out.splitlines()) == 2 + 5 + 1
  assert seen and all(p.startswith("gs://bucket/runs") for p in seen), seen[:5]
