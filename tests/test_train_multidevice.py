"""The sharded train step on 8 fake CPU devices (mesh data=2 x fsdp=2 x tensor=2: batch, FSDP
and tensor parallelism at once) against one device.

Runs in a subprocess, because the device count is fixed when jax is first imported.
"""
import json
import os
import pathlib
import subprocess
import textwrap

import numpy as np
import pytest

import subprocess_env
from subprocess_env import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from configs import tiny
    from dense_diffusion import experiment, sharding

    assert jax.device_count() == 8, jax.devices()
    config = tiny.get_config()
    config.mesh = dict(data=2, fsdp=2, tensor=2)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
                "target": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
                "valid": np.ones((8, 32, 32, 1), bool),
                "task": rng.integers(0, 3, (8,)).astype(np.int32)} for _ in range(3)]

    def train3(exp):
      losses = []
      with jax.set_mesh(exp.mesh):
        for b in batches:
          exp.state, m = exp.train_step(exp.state, exp.frozen, exp.device_batch(b))
          losses.append(float(m["loss"]))
      return losses

    out = {}
    multi = experiment.Experiment(config)  # mesh from the config: all 8 devices.
    out["mesh"] = dict(multi.mesh.shape)
    # Shardings as placed (before any step) and after the steps (out_shardings keep them).
    def sharded_bytes(tree):
      rows = []
      for x in jax.tree.leaves(tree):
        axes = [a for entry in x.sharding.spec if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)]
        rows.append([axes, int(x.nbytes), sharding.per_device_bytes(x)])
      return rows
    out["losses_multi"] = train3(multi)
    out["params_bytes"] = sharded_bytes(multi.state.params)
    out["opt_bytes"] = sharded_bytes(multi.state.opt_state)
    params_multi = jax.tree.map(np.asarray, multi.state.params)
    one = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), devices=jax.devices()[:1])
    single = experiment.Experiment(config, mesh=one)
    params_init = jax.tree.map(np.asarray, single.state.params)
    out["losses_single"] = train3(single)
    params_single = jax.tree.map(np.asarray, single.state.params)
    out["max_param_diff"] = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(params_multi), jax.tree.leaves(params_single)))
    out["max_param_change"] = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree.leaves(params_single), jax.tree.leaves(params_init)))

    # Gradient accumulation on the mesh: 2 microbatches of 1 row per batch shard against one
    # pass over the 16 rows. The one-step paradigm draws no noise, so both see the same loss.
    batch16 = {k: np.concatenate([batches[0][k], batches[1][k]]) for k in batches[0]}
    accum = {}
    for n in (1, 2):
      c = tiny.get_config()
      c.mesh = dict(data=2, fsdp=4, tensor=1)
      c.batch_size = 16
      c.grad_accum_steps = n
      c.diffusion.update(mode="onestep", prediction_type="sample", loss_space="prediction",
                         timestep=None, num_inference_steps=1, weighting="none")
      exp = experiment.Experiment(c)
      with jax.set_mesh(exp.mesh):
        _, m = exp.train_step(exp.state, exp.frozen, exp.device_batch(batch16))
      accum[n] = {k: np.asarray(m[k]).tolist() for k in ("loss", "grad_norm", "task_count",
                                                          "task_loss_sum")}
    out["accum"] = accum

    errors = {}
    for name, overrides in {"mesh": dict(mesh=dict(data=3, fsdp=4, tensor=1)),
                            "batch": dict(batch_size=6),
                            "accum": dict(batch_size=16, grad_accum_steps=3)}.items():
      bad = tiny.get_config()
      bad.mesh = dict(data=2, fsdp=4, tensor=1)
      bad.update(overrides)
      try:
        experiment.Experiment(bad)
        errors[name] = None
      except ValueError as e:
        errors[name] = str(e)
    out["errors"] = errors
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def result():
  env = dict(os.environ, XLA_FLAGS=xla_flags(8),
             TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  proc = subprocess_env.run(subprocess_env.python_script(SCRIPT), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-5000:]
  return json.loads(lines[-1][len("RESULT "):])


def test_mesh_from_config(result):
  assert result["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}


def test_sharded_steps_match_one_device(result):
  np.testing.assert_allclose(result["losses_multi"], result["losses_single"], rtol=1e-5)
  # Training moved the parameters far more than the two runs differ.
  assert result["max_param_change"] > 1e-3
  # Float32 sums in another order: Adam's m / sqrt(v) can turn a 1e-7 relative gradient
  # difference of a near-zero gradient into a few percent of one step (lr = 1e-3).
  assert result["max_param_diff"] < 5e-5


@pytest.mark.parametrize("tree", ["params_bytes", "opt_bytes"])
def test_fsdp_and_tensor_shard_parameters_and_optimizer_state(result, tree):
  rows = result[tree]
  sizes = result["mesh"]
  for axes, total, local in rows:
    assert "data" not in axes  # the data axis replicates parameters.
    assert local * int(np.prod([sizes[a] for a in axes])) == total, axes
  fsdp_total = sum(t for axes, t, _ in rows if "fsdp" in axes)
  all_total = sum(t for _, t, _ in rows)
  assert fsdp_total > 0.9 * all_total  # only small tensors (biases, norms) replicate.
  # Attention heads and MLP widths (the logical "heads" / "mlp") are split over tensor too.
  assert sum(t for axes, t, _ in rows if axes == ["fsdp", "tensor"]) > 0.1 * all_total


def test_bad_mesh_and_batch_fail_with_advice(result):
  assert result["errors"]["mesh"] is not None
  assert "config.mesh" in result["errors"]["mesh"] and "8" in result["errors"]["mesh"]
  assert result["errors"]["batch"] is not None
  assert "config.batch_size" in result["errors"]["batch"]
  assert "multiple of 8" in result["errors"]["batch"]
  assert "grad_accum_steps=3" in result["errors"]["accum"]
  assert "divisor of 2" in result["errors"]["accum"]


def test_gradient_accumulation_equals_one_pass(result):
  one, two = result["accum"]["1"], result["accum"]["2"]
  np.testing.assert_allclose(two["loss"], one["loss"], rtol=1e-5)
  np.testing.assert_allclose(two["grad_norm"], one["grad_norm"], rtol=1e-4)
  np.testing.assert_allclose(two["task_loss_sum"], one["task_loss_sum"], rtol=1e-5)
  assert two["task_count"] == one["task_count"] and sum(one["task_count"]) == 16
