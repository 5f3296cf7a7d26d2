"""Multi-host training on one machine: two JAX processes on localhost train the demo config.

Processes 0 and 1 run `python -m dense_diffusion.main train --distributed
--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=i` on CPU with 4 fake devices
each; the mesh is fsdp=8 over both, so every sharded parameter is split between the processes
and the checkpoint is written by both. Process 0 prepares the dataset while process 1 waits.

Next to them, a single-process reference (1 device) rebuilds the input stream of each process
with `input_pipeline.get_train_dataset(process_index=i, process_count=2)`, trains the same
steps on their concatenation, and then restores the checkpoint the two processes wrote. The test
checks that:
- both processes print the same loss at every step, and the reference computes it too;
- the two processes' streams are disjoint (their TFDS example ids, and the images of the batches
  they trained on), and the parameters the processes trained equal the reference's (to float
  rounding), which proves that each process fed exactly its own stream;
- the checkpoint restores in the single process (resharded from 8 devices to 1) with those
  parameters, and training continues from it;
- both processes evaluate with the same results, and process 0 writes the outputs.

The config is configs/demo.py (every task, its mixture, objective and sampler) with
configs/tiny.py's model, which two processes compile in a fraction of the demo UNet's time, on
synthetic_scenes/tiny32 (16 + 8 examples, prepared in seconds where res32 takes minutes).
"""
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import subprocess_env
from subprocess_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT = 900  # seconds for the whole run (2 shared cores compile three programs).
STEPS = 3

CONFIG = '''
"""configs/demo.py with configs/tiny.py's model, 3 steps, for the two-process test."""
from configs import demo
from configs import tiny


def get_config(arg=None):
  c = demo.get_config(arg)
  small = tiny.get_config(arg)
  c.model = small.model
  c.sharding = small.sharding  # fsdp_min_size small enough that the small kernels shard.
  c.input.data_dir = {data_dir!r}
  for entry in c.input.entries:  # the demo's mixture on the 24-example tiny32 (prepared in ~2 s)
    entry["dataset"] = "synthetic_scenes/tiny32"
  c.input.shuffle_buffer = 64  # smaller iterator state in the checkpoints.
  c.mesh = dict(data=1, fsdp=-1, tensor=1)  # fsdp=8 across both processes.
  c.total_steps = {steps}
  c.optimizer.warmup_steps = 1  # full learning rate from step 2: parameters move measurably.
  c.log_every = 1
  c.checkpoint_every = 2
  c.eval.batch_size = 8
  c.eval.max_examples = 8
  c.eval.num_grid_examples = 1
  return c
'''

# The single-process reference; it reads the config path, workdir and steps from argv.
REFERENCE = textwrap.dedent("""
    import hashlib, importlib.util, json, sys, time
    import jax
    import numpy as np
    import tensorflow_datasets as tfds
    from dense_diffusion import checkpointing, experiment, input_pipeline, sharding

    config_path, workdir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = importlib.util.spec_from_file_location("mh_config", config_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    entries = list(config.input.entries)
    data_dir = config.input.data_dir
    out = {}

    # Process 0 of the run prepares the data; wait for it (TFDS renames it into place at the end).
    deadline = time.time() + 600
    while not all(tfds.builder(e["dataset"], data_dir=data_dir).is_prepared() for e in entries):
      assert time.time() < deadline, "the run did not prepare the dataset"
      time.sleep(1)

    # The TFDS examples each process reads (every entry reads the same split of one dataset).
    ids = []
    for i in range(2):
      ds, _ = input_pipeline.read_split(entries[0]["dataset"], "train", data_dir=data_dir,
                                        process_index=i, process_count=2, drop_remainder=True,
                                        features=["key"])
      ids.append(sorted(ex["tfds_id"].decode() for ex in tfds.as_numpy(ds)))
    out["num_ids"] = [len(x) for x in ids]
    out["shared_ids"] = len(set(ids[0]) & set(ids[1]))
    out["split_size"] = tfds.builder(entries[0]["dataset"], data_dir=data_dir).info.splits[
        "train"].num_examples

    # Each process's stream, built exactly as the train loop builds it.
    one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    exp = experiment.Experiment(config, mesh=one)
    per_process = int(config.batch_size) // 2
    streams = [iter(tfds.as_numpy(input_pipeline.get_train_dataset(
        entries, exp.task_names, per_process, seed=int(config.seed), data_dir=data_dir,
        process_index=i, process_count=2, shuffle_buffer=int(config.input.shuffle_buffer),
        on_bad_example=config.input.on_bad_example))) for i in range(2)]
    batches = [[next(s) for _ in range(steps + 1)] for s in streams]

    def fingerprint(image):  # the same for an image and its left-right flip (random_flip).
      return hashlib.sha1(min(image.tobytes(), image[:, ::-1].tobytes())).hexdigest()

    prints = [{fingerprint(x) for b in bs[:steps] for x in b["image"]} for bs in batches]
    out["fingerprints"] = [len(p) for p in prints]
    out["shared_fingerprints"] = len(prints[0] & prints[1])
    out["streams_differ"] = not np.array_equal(batches[0][0]["image"], batches[1][0]["image"])

    # Process 0's devices hold the first rows of the global batch (mesh order), process 1's the
    # rest; the loss is a mean, so the order only matters to float rounding anyway.
    glob = [{k: np.concatenate([batches[0][s][k], batches[1][s][k]]) for k in batches[0][s]}
            for s in range(steps + 1)]
    init = jax.tree.map(np.asarray, exp.state.params)
    losses = []
    with jax.set_mesh(exp.mesh):
      for s in range(steps):
        exp.state, m = exp.train_step(exp.state, exp.frozen, exp.device_batch(glob[s]))
        losses.append(float(m["loss"]))
    out["losses"] = losses
    reference = jax.tree.map(np.asarray, exp.state)

    print("TRAINED", flush=True)
    sys.stdin.readline()  # the test says when the two processes have finished.

    with jax.set_mesh(exp.mesh):
      checkpointer = checkpointing.Checkpointer(workdir + "/checkpoints")
      step, restored = checkpointer.restore_latest(exp.state)
      checkpointer.close()
      out["restored_step"] = int(step)
      out["restored_state_step"] = int(restored.step)
      out["restored_on"] = sorted({str(d) for x in jax.tree.leaves(restored.params)
                                   for d in x.devices()})
      restored_np = jax.tree.map(np.asarray, restored)

      def diff(a, b):
        return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a),
                                                                jax.tree.leaves(b)))
      out["param_change"] = diff(reference.params, init)
      out["param_diff"] = diff(restored_np.params, reference.params)
      out["ema_diff"] = diff(restored_np.ema, reference.ema)
      out["opt_diff"] = diff(restored_np.opt_state, reference.opt_state)
      # Training goes on from the restored state.
      exp.state = restored
      exp.state, m = exp.train_step(exp.state, exp.frozen, exp.device_batch(glob[steps]))
      out["continued_loss"] = float(m["loss"])
      out["continued_step"] = int(exp.state.step)
    print("RESULT " + json.dumps(out), flush=True)
""")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def read(path) -> str:
  return pathlib.Path(path).read_text(errors="replace")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """Starts the two training processes and the reference; returns their outputs."""
  base = tmp_path_factory.mktemp("multihost")
  workdir, config = base / "workdir", base / "config.py"
  config.write_text(CONFIG.format(data_dir=str(base / "tfds"), steps=STEPS))
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
             XLA_FLAGS=xla_flags())
  port = free_port()
  procs, logs, files = [], [], []
  start = time.time()
  four_devices = dict(env, XLA_FLAGS=xla_flags(4))
  for i in range(2):
    logs.append(base / f"process_{i}.log")
    files.append(open(logs[-1], "w"))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "dense_diffusion.main", "train", "--distributed",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
         "--config", str(config), f"--workdir={workdir}"],
        cwd=REPO, env=four_devices, text=True, stdout=files[-1], stderr=subprocess.STDOUT))
  logs.append(base / "reference.log")
  files.append(open(logs[-1], "w"))
  ref = subprocess.Popen([*subprocess_env.python_script(REFERENCE), str(config), str(workdir),
                          str(STEPS)],
                         cwd=REPO, env=env, text=True, stdin=subprocess.PIPE, stdout=files[-1],
                         stderr=subprocess.STDOUT)

  def diagnosis() -> str:
    return "\n".join(f"----- {log.name} (exit status {proc.poll()}) -----\n{read(log)[-6000:]}"
                     for log, proc in zip(logs, procs + [ref]))

  def stuck(what: str) -> AssertionError:
    # Every process still running prints its threads' stacks into its log first (SIGUSR1).
    for proc in procs + [ref]:
      subprocess_env.dump_stacks_and_kill(proc)
    return AssertionError(f"{what} timed out after {TIMEOUT}s\n{diagnosis()}")

  try:
    # A process that fails leaves the other waiting in a collective: stop at the first failure.
    while any(p.poll() is None for p in procs):
      failed = [p for p in procs + [ref] if p.poll()]
      assert not failed, f"a process failed\n{diagnosis()}"
      if time.time() - start > TIMEOUT:
        raise stuck("the two-process run")
      time.sleep(0.5)
    assert all(p.returncode == 0 for p in procs), diagnosis()
    try:
      ref.communicate("go\n", timeout=max(TIMEOUT - (time.time() - start), 60))
    except subprocess.TimeoutExpired:
      raise stuck("the reference") from None
    assert ref.returncode == 0, diagnosis()
  finally:
    for proc in procs + [ref]:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    for f in files:
      f.close()
  print(f"two-process run and reference: {time.time() - start:.0f}s")
  lines = [l for l in read(logs[2]).splitlines() if l.startswith("RESULT ")]
  assert lines, diagnosis()
  return {"outputs": [read(p) for p in logs[:2]], "reference": json.loads(lines[-1][7:]),
          "workdir": workdir}


def losses(output: str) -> list[str]:
  return re.findall(rf"^step \d+/{STEPS} \(\d+%\) loss ([0-9.]+)", output, re.M)


def test_process_0_prepares_the_data_and_both_see_eight_devices(run):
  out0, out1 = run["outputs"]
  assert "preparing synthetic_scenes/tiny32" in out0
  assert "preparing synthetic_scenes" not in out1  # it waited for process 0, then found the data.
  for out in run["outputs"]:
    assert "devices: 8 (cpu), mesh {'data': 1, 'fsdp': 8, 'tensor': 1}, processes 2" in out


def test_both_processes_report_the_same_loss(run):
  out0, out1 = run["outputs"]
  assert len(losses(out0)) == STEPS, out0[-3000:]
  assert losses(out0) == losses(out1)
  # The single-process reference computes the same losses from the two streams (4 decimals).
  for printed, reference in zip(losses(out0), run["reference"]["losses"]):
    assert abs(float(printed) - reference) <= 6e-5, (losses(out0), run["reference"]["losses"])


def test_each_process_reads_a_disjoint_shard(run):
  ref = run["reference"]
  assert ref["shared_ids"] == 0
  assert sum(ref["num_ids"]) == ref["split_size"] and min(ref["num_ids"]) > 0
  assert ref["streams_differ"]
  assert ref["shared_fingerprints"] == 0 and min(ref["fingerprints"]) > 1
  # And those two streams are what the processes trained on: the parameters they checkpointed
  # are the reference's, trained on both. Had a process read the other's shard or the whole
  # split, its batches and so the parameters would differ (by about `param_change`).
  assert ref["param_diff"] < 0.05 * ref["param_change"], ref


def test_checkpoint_written_by_both_restores_in_one_process(run):
  ref, workdir = run["reference"], run["workdir"]
  assert (workdir / "checkpoints" / str(STEPS) / "commit_success.txt").exists()
  for i in range(2):  # each process saved its own data-iterator state.
    assert (workdir / "checkpoints" / "data" / f"step_{STEPS}_process_{i}.index").exists()
  assert ref["restored_step"] == ref["restored_state_step"] == STEPS
  assert len(ref["restored_on"]) == 1  # resharded from 8 devices in 2 processes to 1.
  # Parameters moved far more than the 2-process and 1-device computations differ (float sums
  # in another order; see test_train_multidevice.py for why Adam amplifies them).
  assert ref["param_change"] > 1e-3
  assert ref["param_diff"] < 0.05 * ref["param_change"], ref
  assert ref["ema_diff"] < 0.05 * ref["param_change"], ref
  assert ref["opt_diff"] < 1e-5, ref
  assert ref["continued_step"] == STEPS + 1
  assert 0 < ref["continued_loss"] < 10


def test_both_processes_evaluate_alike_and_process_0_writes(run):
  tables = [re.search(r"^evaluation at step \d+ .*?\n((?:  .*\n?)+)", out, re.M)
            for out in run["outputs"]]
  assert all(tables), run["outputs"][0][-3000:]
  assert tables[0].group(1) == tables[1].group(1)
  assert "panoptic" in tables[0].group(1)
  workdir = run["workdir"]
  metrics = json.loads((workdir / "eval_metrics.json").read_text())
  assert list(metrics) == [str(STEPS)]
  assert metrics[str(STEPS)]["depth"]["num_examples"] == 8
  assert (workdir / "predictions" / f"step_{STEPS}.png").exists()
  assert (workdir / "config.json").exists()
