"""The train step, the samplers and the Marigold pipelines run without TensorFlow, TFDS, clu and
dm-pix, as on the lent GPU machines; bench/device_check.sh, the one command made for them.

The subprocess test runs `bash bench/device_check.sh --smoke` (tiny sizes on the CPU) with those
modules made unimportable before anything else is imported (a `sitecustomize` on PYTHONPATH
puts a finder first on `sys.meta_path` that refuses them): it builds the tiny config's
Experiment from the config alone, runs train steps, the config's sampler and a tiny Marigold
depth pipeline, and writes the results file the GPU run writes. The microbatch search and the
peak table are checked on hand-computed cases.
"""
import importlib.util
import json
import math
import os
import pathlib
import sys

import pytest

import subprocess_env

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu", "dm_pix")

# Installed by `site` before the child imports anything.
SITECUSTOMIZE = f'''
import importlib.abc, sys

BLOCKED = {BLOCKED!r}


class RefuseModules(importlib.abc.MetaPathFinder):
  """As if these were not installed (the GPU machines lack them)."""

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
    return None


sys.meta_path.insert(0, RefuseModules())
'''


def _load_bench_module(name: str):
  spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def search():
  return _load_bench_module("microbatch_search")


def _blocking_env(tmp_path: pathlib.Path) -> dict:
  block = tmp_path / "block"
  block.mkdir()
  (block / "sitecustomize.py").write_text(SITECUSTOMIZE)
  env = dict(os.environ)
  env.update(PYTHONPATH=str(block), JAX_PLATFORMS="cpu", XLA_FLAGS=subprocess_env.xla_flags(),
             PYTHON=sys.executable)
  return env


def test_device_check_smoke_runs_without_tensorflow(tmp_path):
  out = tmp_path / "out"
  env = _blocking_env(tmp_path)
  # A checkout prepared for the device (.whl/) installs carried wheels newer than this
  # environment's packages: into this test's folder, not /tmp.
  env.update(OUT=str(out), DEVICE_CHECK_TIMEOUT="400", DEVICE_CHECK_SITE=str(tmp_path / "site"))
  proc = subprocess_env.run(["bash", str(REPO_ROOT / "bench" / "device_check.sh"), "--smoke"],
                            timeout=420, env=env, capture_output=True, cwd=tmp_path)
  assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-6000:]
  assert "device_check: OK" in proc.stdout
  assert (out / "device_check.log").read_text().strip().endswith(
      f"results in {out / 'device_check_results.json'}")
  r = json.loads((out / "device_check_results.json").read_text())

  assert r["errors"] == {}
  # The blocker was in force (TensorFlow & co. are installed in this environment), and nothing
  # on the way imported them.
  assert r["optional_modules"] == {name: "absent" for name in BLOCKED}
  assert r["optional_modules_imported"] == []
  assert r["mode"] == "smoke"
  assert r["device"]["platform"] == "cpu" and r["device"]["count"] >= 1
  assert r["peak_bf16_flops"] is None  # a CPU is not in the table: no MFU.
  assert r["matmul"]["n"] == 256 and r["matmul"]["tflops"] > 0

  t = r["train_step"]
  assert t["config"] == "configs/tiny.py"
  assert t["microbatch_per_device"] == 2 and t["global_batch"] == 2 * r["device"]["count"]
  assert [a["batch"] for a in t["attempts"]] == [2]
  assert t["step_s"] > 0 and math.isclose(t["examples_per_s"], t["global_batch"] / t["step_s"])
  assert t["model_flops_per_step"] > 0 and t["mfu"] is None
  assert t["parameters"] >= t["trainable"] > 0

  s = r["sampler"]
  assert (s["sampler"], s["steps"]) == ("ddim", 2)  # configs/tiny.py's sampler and steps.
  (only,) = s["runs"]
  assert only["batch"] == 1 and only["output_shape"] == [r["device"]["count"], 32, 32, 3]
  assert math.isclose(s["latency_s_per_image_batch1"], only["s_per_call"])

  m = r["marigold"]
  assert (m["resolution"], m["steps"], m["batch_size"], m["images_per_call"]) == (64, 2, 1, 2)
  assert m["output_shape"] == [2, 64, 64, 1]
  assert math.isclose(m["images_per_s"], 2 / m["s_per_call"])


def test_builder_without_tfds_says_what_is_missing(tmp_path):
  """Without TFDS the dataset package still imports (configs need `readers`); asking for a
  builder names the missing package instead of an AttributeError."""
  script = ("from dense_diffusion.datasets import readers, synthetic_scenes\n"
            "assert readers.synthetic_mixture(('depth',), config='tiny32')\n"
            "try:\n"
            "  synthetic_scenes.SyntheticScenes\n"
            "except ModuleNotFoundError as e:\n"
            "  print('missing:', e)\n")
  proc = subprocess_env.run(subprocess_env.python_script(script), timeout=120,
                            env=_blocking_env(tmp_path), capture_output=True, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "missing:" in proc.stdout and "tensorflow_datasets" in proc.stdout


# ------------------------------------------------------------------------------------------------
# The microbatch search on made-up compilers: peak(b) = fixed + temp(b), in GiB.

def _compiler(search, fixed, temp, fail_above=None):
  calls = []

  def compile_fn(batch):
    calls.append(batch)
    if fail_above is not None and batch > fail_above:
      return search.Attempt(batch, error="RESOURCE_EXHAUSTED: out of memory")
    t = temp(batch)
    return search.Attempt(batch, peak_bytes=fixed + t, temp_bytes=t)

  return compile_fn, calls


def test_search_grows_to_the_largest_power_of_two_that_fits(search):
  # 10 + 2 b <= 80 holds up to b = 35: 32 is the answer, found from 8 in one step.
  compile_fn, calls = _compiler(search, 10.0, lambda b: 2.0 * b)
  best, attempts = search.search_microbatch(compile_fn, 8, 256, 80.0, lambda: True)
  assert (best, calls) == (32, [8, 32])
  assert [a.batch for a in attempts] == calls


def test_search_halves_a_start_that_does_not_fit(search):
  compile_fn, calls = _compiler(search, 10.0, lambda b: 2.0 * b)
  best, _ = search.search_microbatch(compile_fn, 64, 256, 80.0, lambda: True)
  assert (best, calls) == (32, [64, 32])


def test_search_fits_a_fixed_part_of_the_temporaries(search):
  # Temporaries 20 + 2 b (gradients do not grow with the batch), arguments 10, budget 100: up
  # to b = 35. From 4 alone the per-example bytes look like 7 (-> 8); 4 and 8 give 2 (-> 32).
  compile_fn, calls = _compiler(search, 10.0, lambda b: 20.0 + 2.0 * b)
  best, _ = search.search_microbatch(compile_fn, 4, 256, 100.0, lambda: True)
  assert (best, calls) == (32, [4, 8, 32])


def test_search_without_a_memory_limit_goes_to_the_cap(search):
  compile_fn, calls = _compiler(search, 10.0, lambda b: 2.0 * b)
  best, _ = search.search_microbatch(compile_fn, 2, 8, None, lambda: True)
  assert (best, calls) == (8, [2, 8])


def test_search_compile_time_out_of_memory_counts_as_not_fitting(search):
  compile_fn, calls = _compiler(search, 10.0, lambda b: 2.0 * b, fail_above=16)
  best, attempts = search.search_microbatch(compile_fn, 64, 256, 1000.0, lambda: True)
  assert (best, calls) == (16, [64, 32, 16])
  assert attempts[0].error.startswith("RESOURCE_EXHAUSTED")


def test_search_stops_when_nothing_fits_or_time_is_up(search):
  compile_fn, calls = _compiler(search, 100.0, lambda b: 2.0 * b)
  assert search.search_microbatch(compile_fn, 4, 256, 80.0, lambda: True)[0] is None
  assert calls == [4, 2, 1]
  compile_fn, calls = _compiler(search, 10.0, lambda b: 2.0 * b)
  best, _ = search.search_microbatch(compile_fn, 8, 256, 80.0, lambda: False)
  assert (best, calls) == (8, [8])


def test_peak_table_by_device_kind():
  peak = _load_bench_module("peak_flops").peak_bf16_flops
  # JAX's device_kind strings; dense bf16 rates of NVIDIA's datasheets.
  assert peak("NVIDIA H100 80GB HBM3") == 989e12
  assert peak("NVIDIA H100 PCIe") == 756e12
  assert peak("NVIDIA H100 NVL") == 835e12
  assert peak("NVIDIA H200") == 989e12
  assert peak("cpu") is None
