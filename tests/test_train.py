"""The train loop end to end (configs/tiny.py in subprocesses): resume after SIGKILL, fallback
past a damaged checkpoint, SIGTERM pre-emption, non-finite policies, evaluation outputs.

The processes share a persistent JAX compilation cache, so only the first one compiles.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import subprocess_env
from subprocess_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL = 8  # steps of every run here; checkpoints every 2.
TIMEOUT = 300  # seconds a subprocess may take before the test gives up on it.


@pytest.fixture(scope="module")
def env(synthetic_data_dir):
  out = dict(os.environ)
  # One CPU device whatever the caller set; the session's compilation cache (conftest.py) lets
  # every run after the first here read the train step instead of compiling it.
  out.update(XLA_FLAGS=xla_flags(), TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
  out["_DD_DATA_DIR"] = synthetic_data_dir  # the session's, with tiny32 prepared
  return out


def command(env, workdir, *overrides):
  return [sys.executable, "-m", "dense_diffusion.main", "train", "--config", "configs/tiny.py",
          f"--workdir={workdir}", f"--config.input.data_dir={env['_DD_DATA_DIR']}",
          f"--config.total_steps={TOTAL}", "--config.checkpoint_every=2",
          "--config.keep_checkpoints=3", "--config.log_every=1", *overrides]


def run(env, workdir, *overrides, check=True):
  proc = subprocess_env.run(command(env, workdir, *overrides), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=TIMEOUT)
  if check and proc.returncode:
    raise AssertionError(f"train exited {proc.returncode}:\n{proc.stdout[-5000:]}")
  return proc


def start(env, workdir, *overrides):
  log = open(pathlib.Path(str(workdir) + ".log"), "w")
  return subprocess.Popen(command(env, workdir, *overrides), cwd=REPO, env=env, text=True,
                          stdout=log, stderr=subprocess.STDOUT), log


def complete_steps(workdir) -> list[int]:
  """Checkpoint steps whose orbax commit marker and data-iterator state are both written."""
  ckpt = pathlib.Path(workdir) / "checkpoints"
  if not ckpt.is_dir():
    return []
  return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()
                and (p / "commit_success.txt").exists()
                and (ckpt / "data" / f"step_{p.name}_process_0.index").exists())


def wait_for(predicate, proc, timeout=TIMEOUT):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (rc {proc.returncode}) before the awaited state")
    time.sleep(0.05)
  raise AssertionError("timed out waiting for the run")


def load_state(workdir, step) -> dict:
  import orbax.checkpoint as ocp
  path = pathlib.Path(workdir) / "checkpoints" / str(step) / "default"
  with ocp.StandardCheckpointer() as ckptr:
    state = ckptr.restore(path.absolute())
  import jax
  return jax.tree.map(np.asarray, state)


def flat(tree) -> dict:
  import jax
  name = lambda k: str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return {"/".join(map(name, path)): v
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def reference_run(env, tmp_path_factory):
  """An uninterrupted run (it also prepares the tiny32 data and fills the compile cache)."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = run(env, workdir)
  return workdir, proc.stdout


def test_evaluation_writes_metrics_and_predictions(reference_run):
  workdir, stdout = reference_run
  metrics = json.loads((workdir / "eval_metrics.json").read_text())
  assert list(metrics) == [str(TOTAL)]
  assert set(metrics[str(TOTAL)]) >= {"depth", "semantic", "denoise"}
  assert metrics[str(TOTAL)]["depth"]["num_examples"] == 8
  for task in ("depth", "semantic", "denoise"):
    assert "baseline" in metrics[str(TOTAL)][task]
  from PIL import Image
  picture = Image.open(workdir / "predictions" / f"step_{TOTAL}.png")
  assert picture.mode in ("RGB", "RGBA") and min(picture.size) > 32
  assert complete_steps(workdir) == [4, 6, 8]  # keep_checkpoints=3
  assert f"step {TOTAL}/{TOTAL}" in stdout


def test_sigterm_then_sigkill_then_fallback_resume(env, reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = tmp_path / "run"
  # 1. SIGTERM once the first checkpoint is complete: saves the current step and exits 0.
  proc, log = start(env, workdir)
  wait_for(lambda: complete_steps(workdir), proc)
  proc.send_signal(signal.SIGTERM)
  assert subprocess_env.wait(proc, TIMEOUT, log) == 0
  log.close()
  out = pathlib.Path(str(workdir) + ".log").read_text()
  found = re.search(r"SIGTERM at step (\d+): saving", out)
  assert found, out[-3000:]
  term_step = int(found.group(1))
  assert term_step < TOTAL
  assert complete_steps(workdir)[-1] == term_step
  assert not (workdir / "eval_metrics.json").exists()

  # 2. Restart, then SIGKILL once a newer checkpoint is complete.
  proc, log = start(env, workdir)
  wait_for(lambda: complete_steps(workdir)[-1] > term_step, proc)
  proc.kill()
  subprocess_env.wait(proc, TIMEOUT, log)
  log.close()
  out = pathlib.Path(str(workdir) + ".log").read_text()
  assert f"resumed from the checkpoint at step {term_step}" in out
  steps = complete_steps(workdir)
  assert len(steps) >= 2

  # 3. Damage the newest checkpoint (truncate its largest data file): the restart falls back to
  # the previous one with a warning, and ends with the uninterrupted run's parameters.
  if steps[-1] == TOTAL:  # the kill came too late to matter; resume from the one before.
    shutil.rmtree(workdir / "checkpoints" / str(TOTAL))
    steps = steps[:-1]
  newest = workdir / "checkpoints" / str(steps[-1])
  largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 3)
  proc = run(env, workdir)
  assert f"checkpoint {steps[-1]} is unreadable" in proc.stdout, proc.stdout[-3000:]
  assert f"resumed from the checkpoint at step {steps[-2]}" in proc.stdout, proc.stdout[-3000:]

  # The damaged step was deleted and written again (it is among the 3 kept: 4, 6, 8).
  assert complete_steps(workdir) == complete_steps(ref_dir) == [4, 6, 8]
  for step in (steps[-1], TOTAL):
    ours, ref = flat(load_state(workdir, step)), flat(load_state(ref_dir, step))
    assert ours.keys() == ref.keys()
    assert int(ours["step"]) == int(ref["step"]) == step
    for key in ref:
      if key.startswith(("params", "ema", "opt_state")):
        np.testing.assert_allclose(ours[key], ref[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_nonfinite_stop(env, reference_run, tmp_path):
  del reference_run  # data prepared, compile cache filled.
  # lr 1e30: step 1 has lr 0 (warm-up), step 2's update blows the weights up, step 3 overflows.
  huge = ["--config.optimizer.lr=1e30", "--config.optimizer.grad_clip_norm=1e30"]
  proc = run(env, tmp_path / "stop", *huge, check=False)
  assert proc.returncode != 0
  found = re.search(r"non-finite loss or gradient at step (\d+)", proc.stdout)
  assert found, proc.stdout[-3000:]
  bad_step = int(found.group(1))
  assert 2 <= bad_step <= TOTAL
  assert "nonfinite='skip'" in proc.stdout
  # One line, exit status 2 (the remedy is a config value), no traceback.
  assert proc.returncode == 2 and "error: non-finite loss" in proc.stdout, proc.stdout[-3000:]
  assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
  # Stops at the first log after the bad step (log_every=1): no checkpoint past it, and every
  # one before it complete (an asynchronous save in flight when it stopped is committed).
  assert complete_steps(tmp_path / "stop") == list(range(2, bad_step, 2))[-3:]


NAN_CONFIG = """
from configs import tiny


def get_config(arg=None):
  c = tiny.get_config(arg)
  # Every training image becomes NaN/inf (in_min == in_max divides by zero): every step's loss
  # is non-finite, while evaluation (pp_eval) is untouched.
  for entry in c.input.entries:
    entry["pp"] += '|value_range(-1, 1, 0, 0, key="image")'
  return c
"""


def test_nonfinite_skip_goes_on_without_updates(env, reference_run, tmp_path):
  del reference_run  # data prepared, compile cache filled.
  config = tmp_path / "nan_config.py"
  config.write_text(NAN_CONFIG)
  args = command(env, tmp_path / "skip", "--config.nonfinite=skip", "--config.total_steps=4")
  args[args.index("configs/tiny.py")] = str(config)
  proc = subprocess_env.run(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stdout[-5000:]
  assert "4 non-finite steps skipped" in proc.stdout
  assert (tmp_path / "skip" / "eval_metrics.json").exists()  # it went on to the end.
  state = flat(load_state(tmp_path / "skip", 4))
  assert int(state["nonfinite_steps"]) == 4
  assert int(state["first_nonfinite_step"]) == 0
  # Steps 3 and 4 applied no update: parameters and EMA are those of the step-2 checkpoint.
  initial = flat(load_state(tmp_path / "skip", 2))
  assert int(initial["nonfinite_steps"]) == 2
  for key, value in state.items():
    if key.startswith(("params", "ema")):
      assert np.all(np.isfinite(value)), key
      np.testing.assert_array_equal(value, initial[key], err_msg=key)


# ------------------------------------------------------------------------------------------------
# Configs: they build, and their parts agree with each other (no weights, no training).


def _check_consistent(config):
  from dense_diffusion import experiment
  from dense_diffusion import paradigms
  from dense_diffusion import tasks as tasks_lib
  from dense_diffusion.experiment import config as config_lib
  from dense_diffusion.experiment import model as model_lib
  from dense_diffusion.models import unet
  experiment.check_config(config)  # known keys; every task registered and with an entry
  assert len(set(config.tasks)) == len(config.tasks)
  for entry in config.input.entries:
    assert entry["task"] in config.tasks, entry
    assert "encode" not in entry["pp"]  # task options are data of the entry, not pp ops
    assert tasks_lib.from_entry(entry).name == entry["task"]
  assert {e["task"] for e in config.input.entries} == set(config.tasks)
  for task in config_lib.task_objects(config):
    assert task.prompt
  paradigms.make_config(dict(config.diffusion))  # validates the paradigm's settings
  # The space sets the UNet's channels: RGB answer + RGB image, or answer + image latents.
  vae = None
  if config.model.latent:
    import types
    arch = model_lib.vae_architecture(config.model)  # a recipe's or a random VAE's (no weights)
    if arch is None:  # real=1: SD's VAE from its folder, 4 latent channels.
      from dense_diffusion.models import vae as vae_lib
      arch = vae_lib.VAEConfig()
    vae = types.SimpleNamespace(config=arch)
  u = unet.normalize_config(model_lib.unet_config_for_space(config.model, vae))
  channels = vae.config.latent_channels if vae else 3
  assert u["in_channels"] == 2 * channels and u["out_channels"] == channels
  assert config.batch_size % 8 == 0  # divides 8 data-parallel devices.
  return u


def test_generalist_pixel128_config():
  from configs import generalist_pixel128
  config = generalist_pixel128.get_config()
  u = _check_consistent(config)
  assert u["block_out_channels"] == (320, 640, 1280, 1280)
  assert u["attention_head_dim"] == (5, 10, 20, 20)
  assert u["use_linear_projection"] and u["cross_attention_dim"] == 1024
  assert config.model.unet["sample_size"] == 128
  assert config.model.dtype == "bfloat16" and config.model.remat
  assert config.mesh["fsdp"] == -1
  assert config.model.pretrained_unet is None and config.model.text_encoder is None
  config.model.pretrained_unet = "weights/unet"  # placeholders accept paths.
  datasets = {e["dataset"] for e in config.input.entries}
  assert datasets == {"nyu_depth_v2", "ade20k", "coco/2017_panoptic", "sidd", "rain", "lol"}
  assert generalist_pixel128.get_config("res=64").model.unet["sample_size"] == 64
  with pytest.raises(ValueError, match="unknown config argument"):
    generalist_pixel128.get_config("resolution=64")


@pytest.mark.parametrize("name,arg", [("onestep", None), ("onestep", "real=1,pred=v_prediction"),
                                      ("onestep", "latent=1,loss=image"), ("dmp", None),
                                      ("dmp", "real=1"), ("tiny", None), ("marigold", None),
                                      ("marigold", "latent=0"), ("marigold", "real=1")])
def test_mode_configs(name, arg):
  import importlib
  from dense_diffusion.models import lora
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  _check_consistent(config)
  if name == "dmp":
    assert config.diffusion.prediction_type == "v_prediction"
    assert config.schedule.kind == "scaled_linear" and config.diffusion.num_inference_steps == 5
    assert dict(config.model.lora) == {"rank": 4, "alpha": 4.0, "pattern": lora.DEFAULT_PATTERN}
    assert tuple(config.model.trainable) == ("lora", "fresh")  # adapters + the new parts.
  if name == "onestep":
    assert config.diffusion.mode == "onestep"
  if name == "marigold":
    assert config.model.latent == (arg != "latent=0")
    assert config.diffusion.prediction_type == "v_prediction"
    assert config.diffusion.noise == "multires" and config.diffusion.multires_annealed
    assert config.diffusion.timestep_spacing == "trailing"
    assert all(e["task_options"].get("affine_invariant") for e in config.input.entries
               if e["task"] == "depth")
  real = bool(arg and "real=1" in arg)
  assert all(e["dataset"].startswith("synthetic_scenes") for e in config.input.entries) != real


def test_onestep_heads_on_sd_need_its_latent_input():
  from configs import onestep
  with pytest.raises(ValueError, match="head=1 .* add latent=1"):
    onestep.get_config("real=1,head=1")
  config = onestep.get_config("real=1,head=1,latent=1")
  assert config.model.latent and config.diffusion.mode == "vpd"
