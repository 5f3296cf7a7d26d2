"""One call on a GPU machine: the flagship's train step, its sampler and a Marigold pipeline.

    bash bench/device_check.sh               # on the device machine (docs/benchmarks.md,
                                             # "GPU device check": the exact call)
    python bench/device_check.py --smoke     # here, on the CPU: tiny sizes, about a minute

Made for the GPU machines this workplace lends now and then (one H100 or H200, no network, no
TensorFlow, 15 minutes of device time a session): one prepared command that measures, within
`--budget_s` (450 s), and writes every number to one JSON file ($OUT/device_check_results.json
when $OUT is set, else ./device_check_results.json; rewritten after each section, so a run cut
short keeps what it measured):

  matmul     an 8192^3 bf16 matrix product: the practical ceiling of the chip.
  train      the flagship (`--config`, configs/generalist_pixel128.py: an SD-2-size UNet at
             128x128 pixels with a frozen CLIP ViT-L image tower, bf16 compute) built from its
             config with no pretrained files (`Experiment(abstract=True)`, as `main compile`
             does; weights then drawn at random on the device in one jitted program), its
             jitted train step (`Experiment.train_step`) at the largest per-GPU microbatch that
             fits: power-of-two sizes, grown from the compiler's memory analysis of the first
             size and halved on out-of-memory. Step time, examples/s, and MFU = model FLOPs per
             step / step time / peak bf16 FLOP/s (bench/peak_flops.py). Model FLOPs: XLA's cost
             analysis of the loss gradient lowered without remat and with plain (einsum)
             attention, so recomputation is not counted and attention is (the compiled step's
             own cost analysis, `xla_flops_per_step`, is reported too: it counts remat's
             recomputation and misses the fused cuDNN attention kernels).
  sampler    the config's sampler with its steps (`Experiment.make_predictor`, the function
             evaluation and prediction use) at `--sampler_batches` images per call: seconds per
             call and per image.
  marigold   a randomly initialised Marigold depth pipeline of SD-2 size
             (`pipelines.MarigoldDepthPipeline`: SD-2 UNet with 8 input channels, SD VAE, a
             one-layer text encoder of SD-2's width, which runs once at construction), DDIM
             trailing, 4 steps, at 768x768: images/s at `--marigold_batch` latents per call.

A section that fails is recorded under "errors" and the next one runs; exit status 1 if any
failed. If a failure names cuDNN, the section is retried once with the chunked attention
(`model.attention.gpu="chunked"`), and "attention_fallback" says so. Only jax, flax, optax,
orbax-checkpoint, numpy, tokenizers, absl-py and ml_collections (for the configs; carried as a
wheel) are needed: not TensorFlow, TFDS or clu (tests/test_no_tensorflow.py runs `--smoke` with
them blocked). Its parts: bench/microbatch_search.py (which sizes to compile),
bench/random_models.py (random weights, the Marigold pipeline), bench/peak_flops.py (peak rates).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
import traceback
from typing import Any, Callable, Optional

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

import microbatch_search  # bench/microbatch_search.py
import peak_flops as peak_flops_lib  # bench/peak_flops.py
import random_models  # bench/random_models.py
from microbatch_search import Attempt
from random_models import random_like

# Modules the device machines lack; the run reports whether any got imported.
OPTIONAL_MODULES = ("tensorflow", "tensorflow_datasets", "clu", "dm_pix")
RESULTS_NAME = "device_check_results.json"
GIB = 2**30


# ------------------------------------------------------------------------------------------------
# Sizes.

@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything the run's size depends on (`--smoke` swaps in tiny ones)."""
  config: str  # the flagship config, path[:arg].
  train_start: int  # first per-device microbatch tried.
  train_cap: int  # largest microbatch tried (the config's global batch at most).
  sampler_batches: tuple[int, ...]  # images per sampler call, one compilation each.
  marigold_resolution: int  # processing resolution (the images are this size, square).
  marigold_steps: int  # DDIM steps.
  marigold_batch: int  # latents per device call.
  marigold_images: int  # images per timed pipeline call.
  marigold_unet: dict  # diffusers UNet2DConditionModel keys (in/out channels set here).
  marigold_vae: dict  # diffusers AutoencoderKL keys.
  marigold_text: dict  # transformers CLIPTextConfig keys.
  matmul_n: int  # n of the n x n x n bf16 matrix product.
  min_timed_s: float  # each timing runs at least this long (and at least 2 calls).
  budget_s: float  # the whole run.


DEVICE_SIZES = Sizes(
    config="configs/generalist_pixel128.py", train_start=32, train_cap=256,
    sampler_batches=(1, 8), marigold_resolution=768, marigold_steps=4, marigold_batch=4,
    marigold_images=8, marigold_unet=random_models.SD2_UNET, marigold_vae=random_models.SD_VAE,
    marigold_text=random_models.SD2_TEXT_ONE_LAYER, matmul_n=8192, min_timed_s=3.0,
    budget_s=450.0)

SMOKE_SIZES = Sizes(
    config="configs/tiny.py", train_start=2, train_cap=2, sampler_batches=(1,),
    marigold_resolution=64, marigold_steps=2, marigold_batch=1, marigold_images=2,
    marigold_unet=dict(block_out_channels=[32, 64], layers_per_block=1,
                       down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                       attention_head_dim=4, use_linear_projection=True,
                       cross_attention_dim=32, norm_num_groups=8),
    marigold_vae=dict(block_out_channels=[16, 32], layers_per_block=1, latent_channels=4,
                      norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 2,
                      up_block_types=["UpDecoderBlock2D"] * 2),
    marigold_text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, hidden_act="gelu"),
    matmul_n=256, min_timed_s=0.0, budget_s=240.0)


# ------------------------------------------------------------------------------------------------
# Bookkeeping: the time budget, the results file, log lines.

class Run:
  """The run's clock, results and output file."""

  def __init__(self, out: pathlib.Path, budget_s: float):
    self.start = time.perf_counter()
    self.budget_s = budget_s
    self.out = out
    self.results: dict[str, Any] = {"errors": {}}

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def left(self, fraction: float = 1.0) -> float:
    """Seconds until `fraction` of the budget is spent."""
    return fraction * self.budget_s - self.elapsed()

  def log(self, message: str) -> None:
    """A progress line: wall seconds since the start, and this process's CPU seconds (on a
    shared machine the wall clock says little)."""
    print(f"[{self.elapsed():6.1f}s, cpu {time.process_time():6.1f}s] {message}", flush=True)

  def save(self) -> None:
    self.results["total_s"] = round(self.elapsed(), 1)
    tmp = self.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(self.results, indent=2, default=_json_default) + "\n")
    tmp.replace(self.out)


def _json_default(x):
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  return str(x)


def _short_error(e: BaseException) -> str:
  lines = [l for l in str(e).strip().splitlines() if l.strip()]
  return f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]


def is_out_of_memory(e: BaseException) -> bool:
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def timed(fn: Callable[[], Any], min_s: float, min_calls: int = 2, max_calls: int = 50
          ) -> list[float]:
  """Seconds of each call of `fn` (results blocked on), after one warm-up call, until both
  `min_calls` calls and `min_s` seconds have passed."""
  jax.block_until_ready(fn())
  times: list[float] = []
  while len(times) < max_calls and (len(times) < min_calls or sum(times) < min_s):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


# ------------------------------------------------------------------------------------------------
# Sections.

def environment(run: Run) -> None:
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  versions = {}
  for dist in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections",
               "tokenizers"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  optional = {}
  for name in OPTIONAL_MODULES:
    try:
      optional[name] = "installed" if importlib.util.find_spec(name) else "absent"
    except (ImportError, ValueError):  # a finder refused it (the tests block them so).
      optional[name] = "absent"
  peak = peak_flops_lib.peak_bf16_flops(device.device_kind)
  run.results.update(
      date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      device=dict(kind=device.device_kind, platform=device.platform, count=jax.device_count(),
                  memory_bytes_limit=stats.get("bytes_limit"), host=platform.node(),
                  host_cpus=os.cpu_count()),
      versions=versions, python=platform.python_version(),
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
      peak_bf16_flops=peak, peak_source="bench/peak_flops.py (vendor datasheets, dense bf16)",
      optional_modules=optional)
  run.log(f"{jax.device_count()} x {device.device_kind} ({device.platform}); memory limit "
          f"{(stats.get('bytes_limit') or 0) / GIB:.1f} GiB; jax {versions['jax']}, flax "
          f"{versions['flax']}; peak bf16 {peak / 1e12 if peak else '-'} TFLOP/s")


def matmul_section(run: Run, sizes: Sizes) -> None:
  n = sizes.matmul_n
  k1, k2 = jax.random.split(jax.random.key(1))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  matmul = jax.jit(lambda x, y: x @ y)
  times = timed(lambda: matmul(a, b), min_s=min(1.0, sizes.min_timed_s), min_calls=10)
  seconds = statistics.median(times)
  run.results["matmul"] = dict(n=n, dtype="bfloat16", median_s=seconds,
                               tflops=2 * n**3 / seconds / 1e12, calls=len(times))
  run.log(f"matmul {n}^3 bf16: {2 * n**3 / seconds / 1e12:.1f} TFLOP/s")


def load_config(spec: str):
  """'configs/x.py[:arg]' -> the ConfigDict of its get_config(arg)."""
  path, _, arg = spec.partition(":")
  module = ".".join(pathlib.Path(path).with_suffix("").parts)
  return importlib.import_module(module).get_config(arg or None)


def synthetic_batch(num_tasks: int, batch: int, res: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
          "target": rng.uniform(-1, 1, (batch, res, res, 3)).astype(np.float32),
          "valid": np.ones((batch, res, res, 1), bool),
          "task": rng.integers(0, num_tasks, (batch,)).astype(np.int32)}


def _cost_flops(obj) -> Optional[float]:
  try:
    cost = obj.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (a backend without cost analysis)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  value = (cost or {}).get("flops")
  return float(value) if value is not None and value >= 0 else None


class Flagship:
  """The flagship run built from its config with no files, state drawn at random on device."""

  def __init__(self, run: Run, config, materialise: bool = True):
    from dense_diffusion import experiment  # pylint: disable=g-import-not-at-top
    self.config = config
    t0 = time.perf_counter()
    self.exp = experiment.Experiment(config, abstract=True)
    self.build_s = time.perf_counter() - t0
    self.res = int(config.model.unet["sample_size"])
    self.num_tasks = len(config.tasks)
    self.devices = jax.device_count()
    self.compiled: dict[int, Any] = {}
    run.log(f"built the run of a {config.model.unet['block_out_channels']} UNet abstractly in "
            f"{self.build_s:.1f} s; {self.param_count() / 1e6:.1f} M parameters "
            f"({self.trainable_count() / 1e6:.1f} M trainable)")
    self.materialise_s = None
    if materialise:
      t0 = time.perf_counter()
      self.materialise()
      self.materialise_s = time.perf_counter() - t0
      run.log(f"random weights and train state on the device in {self.materialise_s:.1f} s")

  def materialise(self) -> None:
    """The train state and frozen parts as device arrays: parameters at random, everything else
    (optimizer moments, counters) zero, as a fresh run starts."""
    exp = self.exp

    def make(key):
      k1, k2 = jax.random.split(key)
      params = random_like(exp.state.params, k1)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), exp.state)
      ema = jax.tree.map(jnp.copy, params)  # its own buffers: the step donates the state.
      return zeros.replace(params=params, ema=ema), random_like(exp.frozen, k2)

    with jax.set_mesh(exp.mesh):
      self.state, self.frozen = jax.jit(
          make, out_shardings=(exp.state_shardings, exp.frozen_shardings))(jax.random.key(0))

  def param_count(self) -> int:
    return sum(x.size for x in jax.tree.leaves((self.exp.state.params, self.exp.frozen)))

  def trainable_count(self) -> int:
    return sum(x.size for x in jax.tree.leaves(self.exp.state.params))

  def batch_specs(self, batch: int) -> dict:
    global_batch = batch * self.devices
    out = {}
    for key, value in synthetic_batch(self.num_tasks, 1, self.res).items():
      out[key] = jax.ShapeDtypeStruct((global_batch,) + value.shape[1:], value.dtype,
                                      sharding=self.exp.batch_shardings[key])
    return out

  def compile_step(self, batch: int, budget_bytes: Optional[float]) -> Attempt:
    exp = self.exp
    t0 = time.perf_counter()
    try:
      with jax.set_mesh(exp.mesh):
        compiled = exp.train_step.lower(exp.state, exp.frozen, self.batch_specs(batch)).compile()
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      return Attempt(batch, compile_s=time.perf_counter() - t0, error=_short_error(e))
    attempt = Attempt(batch, compile_s=time.perf_counter() - t0)
    mem = compiled.memory_analysis()
    if mem is not None:
      attempt.temp_bytes = float(mem.temp_size_in_bytes)
      attempt.peak_bytes = float(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                 + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
    attempt.fits = microbatch_search.fits(attempt, budget_bytes)
    self.compiled[batch] = compiled
    return attempt

  def time_steps(self, batch: int, min_s: float) -> list[float]:
    """Seconds per step of rounds of consecutive steps (dispatched back to back, as training
    runs), after one warm-up step."""
    exp, compiled = self.exp, self.compiled[batch]
    data = exp.device_batch(synthetic_batch(self.num_tasks, batch * self.devices, self.res))
    state = self.state
    state, metrics = compiled(state, self.frozen, data)  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(metrics)
    first = time.perf_counter() - t0
    steps = max(2, min(20, math.ceil(min_s / max(first, 1e-3))))
    per_step = []
    for _ in range(2):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = compiled(state, self.frozen, data)
      jax.block_until_ready(metrics)
      per_step.append((time.perf_counter() - t0) / steps)
    self.state = state
    return per_step

  def model_flops(self, batch: int) -> Optional[float]:
    """FLOPs of one step's loss gradient as the model defines it: lowered (not compiled) with the
    UNet blocks not rematerialised and attention as plain einsums, so XLA's cost analysis sees
    every matrix product once. The optimizer update (< 0.01%) is left out."""
    from dense_diffusion.models import attention  # pylint: disable=g-import-not-at-top
    from dense_diffusion.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
    exp = self.exp

    def loss(params, frozen, data, key):
      model = nnx.merge(exp.graphdef, params, frozen)
      for _, node in nnx.iter_graph(model):
        if isinstance(node, unet_lib.UNet):
          node.remat = "none"
      per_example, _ = exp.paradigm.loss(model, data, key)
      return jnp.mean(per_example)

    key = jax.eval_shape(lambda: jax.random.key(0))
    with jax.set_mesh(exp.mesh), attention.options(tpu="xla", gpu="xla", cpu="matmul"):
      lowered = jax.jit(jax.value_and_grad(loss)).lower(
          exp.state.params, exp.frozen, self.batch_specs(batch), key)
    return _cost_flops(lowered)


def train_section(run: Run, sizes: Sizes, config, deadline: float) -> "Flagship":
  flagship = Flagship(run, config)
  limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  budget_bytes = 0.9 * limit if limit else None  # the compiler's figure is not exact.
  cap = min(sizes.train_cap, int(config.batch_size) // flagship.devices or 1)
  result = run.results.setdefault("train_step", {})
  result.update(config=sizes.config, dtype=str(config.model.get("dtype")),
                remat=str(config.model.get("remat")), parameters=flagship.param_count(),
                trainable=flagship.trainable_count(), build_s=flagship.build_s,
                materialise_s=flagship.materialise_s,
                memory_budget_bytes=budget_bytes, devices=flagship.devices)
  from dense_diffusion.models import attention  # pylint: disable=g-import-not-at-top
  dtype = jnp.bfloat16 if result["dtype"] == "bfloat16" else jnp.float32
  # What models/attention.py runs for long sequences (the first level's self-attention).
  result["attention"] = attention.implementation_for(dtype, 2**20)
  compile_times: list[float] = []

  def compile_fn(batch):
    run.log(f"train: compiling the step at microbatch {batch}")
    attempt = flagship.compile_step(batch, budget_bytes)
    compile_times.append(attempt.compile_s)
    peak = "-" if attempt.peak_bytes is None else f"{attempt.peak_bytes / GIB:.1f} GiB"
    run.log(f"train: microbatch {batch}: compiled in {attempt.compile_s:.0f} s, peak {peak}"
            f"{', ' + attempt.error if attempt.error else ''}; fits: {attempt.fits}")
    return attempt

  # Another compile (and a run) only while the section's share of the budget allows it.
  time_ok = lambda: time.perf_counter() + 2.0 * max(compile_times) < deadline
  best, attempts = microbatch_search.search_microbatch(compile_fn, sizes.train_start, cap,
                                                       budget_bytes, time_ok)
  result["attempts"] = [dataclasses.asdict(a) for a in attempts]
  while best is not None:
    try:
      per_step = flagship.time_steps(best, sizes.min_timed_s)
      break
    except Exception as e:  # pylint: disable=broad-except
      if not is_out_of_memory(e):
        raise
      run.log(f"train: microbatch {best} ran out of memory; halving")
      result["attempts"].append(dict(batch=best, error="run: " + _short_error(e)))
      flagship.compiled.clear()
      flagship.materialise()  # the failed call may have consumed the donated state.
      best //= 2
      if best >= 1:
        result["attempts"].append(dataclasses.asdict(compile_fn(best)))
  if best is None or best < 1:
    raise RuntimeError("no microbatch fits on this device")
  step_s = min(per_step)
  compiled_flops = _cost_flops(flagship.compiled[best])
  run.log("train: lowering the loss gradient without remat for the model FLOPs")
  model_flops = flagship.model_flops(best)
  peak = run.results.get("peak_bf16_flops")
  global_batch = best * flagship.devices
  result.update(
      microbatch_per_device=best, global_batch=global_batch,
      step_s=step_s, step_s_rounds=per_step, examples_per_s=global_batch / step_s,
      model_flops_per_step=model_flops, xla_flops_per_step=compiled_flops,
      compile_s=next((a["compile_s"] for a in reversed(result["attempts"])
                      if a.get("batch") == best and "compile_s" in a), None),
      mfu=(model_flops / step_s / (peak * flagship.devices)
           if model_flops and peak else None),
      xla_flops_utilisation=(compiled_flops / step_s / (peak * flagship.devices)
                             if compiled_flops and peak else None))
  mfu = result["mfu"]
  run.log(f"train: microbatch {best}: {step_s:.3f} s/step, "
          f"{global_batch / step_s:.1f} examples/s, model FLOPs "
          f"{(model_flops or 0) / 1e12:.4g} T/step, MFU "
          f"{'-' if mfu is None else f'{100 * mfu:.1f}%'}")
  return flagship


def sampler_section(run: Run, sizes: Sizes, flagship: Flagship, deadline: float) -> None:
  exp = flagship.exp
  cfg = exp.config.diffusion
  result = run.results.setdefault("sampler", {})
  result.update(sampler=str(cfg.sampler), steps=int(cfg.num_inference_steps),
                resolution=flagship.res, runs=[])
  predictor = exp.make_predictor()
  params = flagship.state.ema
  compile_times: list[float] = []
  for batch in sizes.sampler_batches:
    if compile_times and time.perf_counter() + 2.0 * max(compile_times) > deadline:
      result["runs"].append(dict(batch=batch, skipped="time budget"))
      continue
    global_batch = batch * flagship.devices
    rng = np.random.default_rng(batch)
    image = jax.device_put(rng.uniform(-1, 1, (global_batch, flagship.res, flagship.res, 3))
                           .astype(np.float32), exp.batch_shardings["image"])
    task = jax.device_put(np.zeros((global_batch,), np.int32), exp.batch_shardings["task"])
    key = jax.random.key(0)
    run.log(f"sampler: compiling {cfg.sampler} x {int(cfg.num_inference_steps)} steps at "
            f"{batch} images per device")
    t0 = time.perf_counter()
    with jax.set_mesh(exp.mesh):
      compiled = predictor.lower(params, flagship.frozen, image, task, key).compile()
    compile_times.append(time.perf_counter() - t0)
    times = timed(lambda: compiled(params, flagship.frozen, image, task, key), sizes.min_timed_s)
    seconds = statistics.median(times)
    out = compiled(params, flagship.frozen, image, task, key)
    result["runs"].append(dict(batch=batch, s_per_call=seconds, s_per_image=seconds / batch,
                               images_per_s=global_batch / seconds, calls=len(times),
                               compile_s=compile_times[-1], output_shape=list(out.shape)))
    run.log(f"sampler: batch {batch}: {seconds:.3f} s/call, {seconds / batch:.4f} s/image")
    run.save()
  done = [r for r in result["runs"] if "s_per_image" in r]
  if done:
    result["latency_s_per_image_batch1"] = next(
        (r["s_per_image"] for r in done if r["batch"] == 1), None)
    result["best_s_per_image"] = min(r["s_per_image"] for r in done)


def marigold_section(run: Run, sizes: Sizes, dtype_name: str) -> None:
  dtype = jnp.bfloat16 if dtype_name == "bfloat16" else None
  result = run.results.setdefault("marigold", {})
  t0 = time.perf_counter()
  pipe, counts = random_models.build_marigold(
      sizes.marigold_unet, sizes.marigold_vae, sizes.marigold_text, sizes.marigold_resolution,
      sizes.marigold_steps, dtype)
  res, n = sizes.marigold_resolution, sizes.marigold_images
  result.update(resolution=res, steps=sizes.marigold_steps, batch_size=sizes.marigold_batch,
                images_per_call=n, dtype=dtype_name, scheduler="DDIM trailing",
                ensemble_size=1, parameters=counts, build_s=time.perf_counter() - t0)
  run.log(f"marigold: built ({', '.join(f'{k} {v / 1e6:.1f} M' for k, v in counts.items())}) "
          f"in {result['build_s']:.0f} s; first call at {res}x{res} compiles")
  images = (np.random.default_rng(0).random((n, res, res, 3)) * 255).astype(np.uint8)
  call = lambda: pipe(images, num_inference_steps=sizes.marigold_steps,
                      processing_resolution=res, batch_size=sizes.marigold_batch).prediction
  t0 = time.perf_counter()
  prediction = call()
  result["first_call_s"] = time.perf_counter() - t0
  times = timed(call, sizes.min_timed_s)
  seconds = statistics.median(times)
  result.update(s_per_call=seconds, images_per_s=n / seconds, calls=len(times),
                output_shape=list(prediction.shape))
  run.log(f"marigold: {n} images of {res}x{res} in {seconds:.3f} s: {n / seconds:.2f} images/s")


def plan_section(run: Run, sizes: Sizes, config) -> None:
  """`--plan`: what the device run builds and traces, with no arrays (any machine, the CPU):
  the flagship built abstractly, its train step traced at the first microbatch, the model FLOPs
  per example, the Marigold pipeline's parameter counts."""
  flagship = Flagship(run, config, materialise=False)
  exp = flagship.exp
  result = run.results.setdefault("plan", {})
  result.update(config=sizes.config, parameters=flagship.param_count(),
                trainable=flagship.trainable_count(), build_s=flagship.build_s)
  t0 = time.perf_counter()
  with jax.set_mesh(exp.mesh):
    exp.train_step.lower(exp.state, exp.frozen, flagship.batch_specs(sizes.train_start))
  result["train_step_trace_s"] = time.perf_counter() - t0
  run.log(f"plan: traced the train step at microbatch {sizes.train_start} in "
          f"{result['train_step_trace_s']:.1f} s")
  t0 = time.perf_counter()
  result["model_flops_per_example"] = flagship.model_flops(1)
  result["model_flops_trace_s"] = time.perf_counter() - t0
  run.log(f"plan: model FLOPs per example {(result['model_flops_per_example'] or 0) / 1e12:.2f} T")
  counts = random_models.abstract_marigold_counts(
      sizes.marigold_unet, sizes.marigold_vae, sizes.marigold_text, sizes.marigold_resolution)
  result["marigold_parameters"] = counts
  run.log(f"plan: Marigold parameters {counts}")


def _with_cudnn_fallback(run: Run, name: str, section: Callable[[], Any], config):
  """Runs `section`; if it fails naming cuDNN, once more with the chunked attention on GPUs (set
  in `config` too: an Experiment configures the attention from it), and so for the sections
  after it."""
  from dense_diffusion.models import attention  # pylint: disable=g-import-not-at-top
  try:
    return section()
  except Exception as e:  # pylint: disable=broad-except
    if "cudnn" not in str(e).lower() or attention.current_options().gpu == "chunked":
      raise
    error = _short_error(e)
  # Outside the handler: the failed attempt's frames (and device arrays) are released first.
  gc.collect()
  run.log(f"{name}: failed in cuDNN ({error}); again with chunked attention")
  run.results.setdefault("attention_fallback", {})[name] = error
  config.model.attention.gpu = "chunked"
  attention.configure({**dataclasses.asdict(attention.current_options()), "gpu": "chunked"})
  jax.clear_caches()
  return section()


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the CPU and tests")
  parser.add_argument("--plan", action="store_true", help="build and trace only, no arrays: "
                      "checks on any machine what the device run will build")
  parser.add_argument("--out", default=None, help=f"results file (default $OUT/{RESULTS_NAME} "
                      f"or ./{RESULTS_NAME})")
  parser.add_argument("--config", default=None, help="the flagship config, path[:arg]")
  parser.add_argument("--budget_s", type=float, default=None, help="time for the whole run")
  parser.add_argument("--train_start", type=int, default=None,
                      help="first microbatch per device tried")
  parser.add_argument("--sampler_batches", default=None, help="images per call, e.g. 1,8")
  parser.add_argument("--marigold_batch", type=int, default=None, help="latents per call")
  parser.add_argument("--attention_gpu", default=None,
                      help="model.attention.gpu for every section (auto, cudnn, chunked, xla)")
  parser.add_argument("--skip", default="", help="sections to leave out: matmul,train,"
                      "sampler,marigold")
  args = parser.parse_args(argv)

  sizes = SMOKE_SIZES if args.smoke else DEVICE_SIZES
  overrides = {k: v for k, v in dict(
      config=args.config, budget_s=args.budget_s, train_start=args.train_start,
      marigold_batch=args.marigold_batch,
      sampler_batches=(tuple(int(b) for b in args.sampler_batches.split(","))
                       if args.sampler_batches else None)).items() if v is not None}
  sizes = dataclasses.replace(sizes, **overrides)
  out = pathlib.Path(args.out or pathlib.Path(os.environ.get("OUT") or ".") / RESULTS_NAME)
  run = Run(out, sizes.budget_s)
  run.results.update(mode="smoke" if args.smoke else "device", sizes=dataclasses.asdict(sizes),
                     command=" ".join(sys.argv))
  skip = set(filter(None, args.skip.split(",")))
  environment(run)
  run.save()

  from dense_diffusion.models import attention  # pylint: disable=g-import-not-at-top
  config = load_config(sizes.config)
  if args.attention_gpu:
    config.model.attention.gpu = args.attention_gpu

  def guarded(name: str, section: Callable[[], Any]):
    if name in skip:
      run.results[name] = {"skipped": "--skip"}
      return None
    try:
      return _with_cudnn_fallback(run, name, section, config)
    except Exception as e:  # pylint: disable=broad-except
      run.results["errors"][name] = traceback.format_exc(limit=-8)[-4000:]
      run.log(f"{name}: FAILED: {_short_error(e)}")
      return None
    finally:
      run.save()

  if args.plan:
    run.results["mode"] += " plan"
    guarded("plan", lambda: plan_section(run, sizes, config))
    print(json.dumps(run.results.get("plan"), indent=2, default=_json_default))
    return 0 if not run.results["errors"] else 1
  guarded("matmul", lambda: matmul_section(run, sizes))
  flagship = guarded("train", lambda: train_section(run, sizes, config, run.start
                                                    + 0.5 * sizes.budget_s))
  if flagship is not None:
    guarded("sampler", lambda: sampler_section(run, sizes, flagship,
                                               run.start + 0.7 * sizes.budget_s))
    del flagship  # frees the train state and compiled steps before the pipeline.
    gc.collect()
  elif "train" in skip:
    run.results["sampler"] = {"skipped": "needs the train section's model"}
  elif "sampler" not in skip:
    run.results["errors"]["sampler"] = "not run: the train section built no model"
  # The config's attention (or --attention_gpu, or a fallback to chunked) for the pipeline too.
  attention.configure(config.model.get("attention"))
  guarded("marigold", lambda: marigold_section(run, sizes, str(config.model.get("dtype")
                                                                or "float32")))
  run.results["optional_modules_imported"] = sorted(
      name for name in OPTIONAL_MODULES if name in sys.modules)
  run.save()
  print_summary(run)
  ok = not run.results["errors"]
  print(f"device_check: {'OK' if ok else 'FAILED: ' + ', '.join(run.results['errors'])}; "
        f"results in {out}", flush=True)
  return 0 if ok else 1


def print_summary(run: Run) -> None:
  r = run.results
  fmt = lambda x, spec: "-" if x is None else format(x, spec)
  device = r.get("device", {})
  print(f"\n## device check, {r.get('date')}: {device.get('count')} x {device.get('kind')}, "
        f"jax {r.get('versions', {}).get('jax')}, {r.get('total_s')} s")
  print("| what | value |\n|---|---|")
  m = r.get("matmul") or {}
  print(f"| bf16 matmul {m.get('n')}^3 | {fmt(m.get('tflops'), '.1f')} TFLOP/s "
        f"(peak {fmt((r.get('peak_bf16_flops') or 0) / 1e12 or None, '.0f')}) |")
  t = r.get("train_step") or {}
  print(f"| train step ({t.get('config')}, {t.get('dtype')}, long-sequence attention "
        f"{t.get('attention')}) | "
        f"microbatch {t.get('microbatch_per_device')}: {fmt(t.get('step_s'), '.3f')} s/step, "
        f"{fmt(t.get('examples_per_s'), '.1f')} examples/s, MFU "
        f"{'-' if t.get('mfu') is None else format(100 * t['mfu'], '.1f') + '%'} ("
        f"{fmt((t.get('model_flops_per_step') or 0) / 1e12 or None, '.4g')} model TFLOPs/step) |")
  s = r.get("sampler") or {}
  for run_ in s.get("runs", []):
    print(f"| sampler {s.get('sampler')} x {s.get('steps')} steps, batch {run_.get('batch')} | "
          + (f"{fmt(run_.get('s_per_call'), '.3f')} s/call, "
             f"{fmt(run_.get('s_per_image'), '.4f')} s/image |" if "s_per_call" in run_
             else f"{run_.get('skipped')} |"))
  g = r.get("marigold") or {}
  print(f"| Marigold depth {g.get('resolution')} px, {g.get('steps')} steps, batch "
        f"{g.get('batch_size')} ({g.get('dtype')}) | {fmt(g.get('images_per_s'), '.2f')} "
        f"images/s ({fmt(g.get('s_per_call'), '.3f')} s per {g.get('images_per_call')}) |")
  for name, text in r.get("errors", {}).items():
    print(f"| error: {name} | {str(text).strip().splitlines()[-1][:200]} |")


if __name__ == "__main__":
  sys.exit(main())
