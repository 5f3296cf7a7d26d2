"""Ahead-of-time compilation of a run for a TPU slice, on any machine (`main compile`).

    python -m dense_diffusion.main compile --config configs/generalist_pixel128.py \
        --topology v5e-16 [--mfu 0.4,0.6] [--config.batch_size=128 ...]

libtpu (the `[tpu-aot]` extra) describes the devices of a TPU topology without TPUs being
present (`jax.experimental.topologies`); the run is built with abstract parameters
(`Experiment(abstract=True)`: shapes and shardings, no weights read), its train step and sampler
are lowered for those devices on the config's mesh and compiled by the TPU compiler. The report:
per-device memory (arguments, outputs, temporaries, peak against the chip's HBM), FLOPs per
step, the step time and examples/s they imply at the given MFUs, and the sharding of the largest
arrays. A program that does not fit the chip's HBM is reported with the config keys that would
help, and the command exits with status 1.

Every number of a chip is in `CHIPS`; a slice name `v5e-16` is parsed by `parse_topology`.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Callable, Iterator, Optional, Sequence

from dense_diffusion import errors
from dense_diffusion import registry

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation: how slices are named and what one chip has."""
  hbm_bytes: int  # HBM per chip (per JAX device).
  peak_flops: float  # dense bf16 FLOP/s per chip (per JAX device).
  dims: int  # topology rank: 2 (v5e, v6e: a 2-D torus) or 3 (v4, v5p).
  cores_per_chip: int  # the slice name counts TensorCores (v4-8 = 4 chips) or chips (v5e-16).
  chip_config: Optional[str] = None  # libtpu's chip configuration (megacore: 1 device per chip).


# Public chip specifications (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
CHIPS: registry.Registry[Chip] = registry.Registry("TPU generation")
CHIPS.register("v4", Chip(hbm_bytes=32 * GIB, peak_flops=275e12, dims=3, cores_per_chip=2,
                          chip_config="megacore"))
CHIPS.register("v5e", Chip(hbm_bytes=16 * GIB, peak_flops=197e12, dims=2, cores_per_chip=1))
CHIPS.register("v5p", Chip(hbm_bytes=95 * GIB, peak_flops=459e12, dims=3, cores_per_chip=2,
                           chip_config="megacore"))
CHIPS.register("v6e", Chip(hbm_bytes=32 * GIB, peak_flops=918e12, dims=2, cores_per_chip=1))

# chips -> the slice's torus shape (the shapes Cloud TPU provisions).
_SHAPES = {
    2: {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
    3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
        256: "4x8x8", 512: "8x8x8"},
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given, e.g. "v5e-16".
  generation: str  # "v5e".
  chips: int
  shape: str  # libtpu's topology string, e.g. "v5e:4x4".
  chip: Chip


def parse_topology(name: str) -> Topology:
  """"v5e-16" / "v5p-8" / "v4-8" / "v6e-8" (Cloud TPU slice names) -> Topology."""
  match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name.strip().lower())
  if not match:
    raise errors.ConfigError(f"--topology={name!r}: give a Cloud TPU slice name such as v5e-16, "
                             f"v5p-8, v4-8, v6e-8 (generations: {', '.join(CHIPS.names())})")
  generation, count = match.group(1), int(match.group(2))
  chip = CHIPS.get(generation)
  chips = count // chip.cores_per_chip
  shapes = _SHAPES[chip.dims]
  if count % chip.cores_per_chip or chips not in shapes:
    sizes = ", ".join(f"{generation}-{c * chip.cores_per_chip}" for c in shapes)
    raise errors.ConfigError(f"--topology={name!r}: no such {generation} slice; known: {sizes}")
  return Topology(name=name, generation=generation, chips=chips,
                  shape=f"{generation}:{shapes[chips]}", chip=chip)


def libtpu_available() -> bool:
  """Whether JAX can load libtpu: TPU_LIBRARY_PATH names a file, or the libtpu package."""
  path = os.environ.get("TPU_LIBRARY_PATH")
  return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None


def use_cpu_host() -> None:
  """This process's own JAX backend is the CPU: libtpu only describes and compiles for the
  topology, it never runs (a TPU runtime would look for chips), so several compiles may run at
  once (libtpu's lock file is for processes that own chips). Call before JAX starts."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not os.environ.get("JAX_PLATFORMS"):
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_platforms", "cpu")


def topology_devices(topology: Topology) -> list:
  """The TPU devices of the slice, described by libtpu (no TPU needed)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if not libtpu_available():
    raise errors.MissingError(
        "compile needs libtpu to describe TPU devices: pip install -e '.[tpu-aot]' (or set "
        "TPU_LIBRARY_PATH to a libtpu.so)")
  kwargs = {"chip_config_name": topology.chip.chip_config} if topology.chip.chip_config else {}
  try:
    desc = topologies.get_topology_desc(topology_name=topology.shape, platform="tpu", **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise errors.UserError(f"libtpu could not describe {topology.shape}: "
                           f"{str(e).strip().splitlines()[0]}") from e
  devices = list(desc.devices)
  if len(devices) != topology.chips:
    raise RuntimeError(f"{topology.shape}: libtpu described {len(devices)} devices, "
                       f"expected {topology.chips}")
  return devices


Log = Callable[[str], None]


def _print_flushed(line: str) -> None:
  print(line, flush=True)


@contextlib.contextmanager
def phase(log: Log, what: str) -> Iterator[None]:
  """One line when `what` starts and one with its elapsed seconds when it ends (or fails), as
  it happens: a flagship compile runs for minutes, and the user sees which part it is in."""
  log(f"[compile] {what} ...")
  start = time.perf_counter()
  try:
    yield
  except BaseException as e:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    log(f"[compile] {what}: stopped after {time.perf_counter() - start:.1f} s ({reason})")
    raise
  log(f"[compile] {what}: {time.perf_counter() - start:.1f} s")


@dataclasses.dataclass
class ProgramReport:
  """One compiled program's per-device numbers (None fields: it did not compile)."""
  name: str
  fits: bool
  argument_bytes: Optional[int] = None
  output_bytes: Optional[int] = None
  temp_bytes: Optional[int] = None
  alias_bytes: Optional[int] = None
  peak_bytes: Optional[float] = None  # arguments + outputs + temporaries - aliased.
  xla_flops: Optional[float] = None  # per device, XLA's cost analysis.
  kernel_flops: float = 0.0  # per device, attention inside Pallas kernels (XLA cannot see it).
  compile_seconds: float = 0.0
  error: Optional[str] = None

  @property
  def flops(self) -> Optional[float]:
    return None if self.xla_flops is None else self.xla_flops + self.kernel_flops


def _compile(name: str, lower_fn, kernel_multiplier: float, hbm_bytes: int,
             num_devices: int, argument_bytes: Optional[int] = None,
             loop_trips: int = 1, log: Log = lambda line: None) -> ProgramReport:
  """Lowers (counting kernel FLOPs while tracing) and compiles; an out-of-memory compile is a
  report with `fits=False`, the compiler's message and `argument_bytes` (computed from the
  inputs' shardings).

  `loop_trips`: how often the program's main loop body runs (the sampler's steps, the train
  step's microbatches). XLA's cost analysis counts a `while` body once, and a body is traced
  once, so both FLOP counts are scaled by it (the little work outside the loop, the optimizer
  update or the image encoder's one pass, is scaled too: an over-count of about a percent).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from dense_diffusion.models import attention  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  with phase(log, f"lowering {name}"), attention.count_kernel_flops() as tally:
    lowered = lower_fn()
  kernel_flops = kernel_multiplier * loop_trips * sum(tally) / num_devices
  try:
    with phase(log, f"compiling {name}"):
      compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "out of memory" not in text.lower():
      raise
    line = next((l for l in text.splitlines() if "memory" in l.lower()), text.splitlines()[0])
    return ProgramReport(name=name, fits=False, kernel_flops=kernel_flops,
                         argument_bytes=argument_bytes,
                         compile_seconds=time.perf_counter() - start, error=line.strip())
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes)
  return ProgramReport(
      name=name, fits=peak <= hbm_bytes, argument_bytes=mem.argument_size_in_bytes,
      output_bytes=mem.output_size_in_bytes, temp_bytes=mem.temp_size_in_bytes,
      alias_bytes=mem.alias_size_in_bytes, peak_bytes=peak,
      xla_flops=loop_trips * float((cost or {}).get("flops", float("nan"))),
      kernel_flops=kernel_flops,
      compile_seconds=time.perf_counter() - start)


@dataclasses.dataclass
class Report:
  topology: Topology
  mesh_shape: dict
  global_batch: int
  eval_batch: int
  programs: list
  largest: list  # (path, shape, dtype, spec, per-device bytes)
  suggestions: list

  @property
  def fits(self) -> bool:
    return all(p.fits for p in self.programs)


def _batch_specs(exp, batch: int, height: int, width: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sd = lambda shape, dtype, key: jax.ShapeDtypeStruct(shape, dtype,
                                                      sharding=exp.batch_shardings[key])
  return {"image": sd((batch, height, width, 3), np.float32, "image"),
          "target": sd((batch, height, width, 3), np.float32, "target"),
          "valid": sd((batch, height, width, 1), np.bool_, "valid"),
          "task": sd((batch,), np.int32, "task")}


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (its largest shards)."""
  import jax  # pylint: disable=g-import-not-at-top
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree) if getattr(x, "sharding", None) is not None)


def _largest_arrays(exp, count: int = 6) -> list:
  """The `count` largest trainable and frozen arrays: path, shape, dtype, spec, bytes/device."""
  import jax  # pylint: disable=g-import-not-at-top
  rows = []
  for prefix, tree in (("params", exp.state.params), ("frozen", exp.frozen)):
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      if not hasattr(leaf, "shape") or getattr(leaf, "sharding", None) is None:
        continue
      shard = leaf.sharding.shard_shape(leaf.shape)
      rows.append((f"{prefix}/" + "/".join(str(getattr(k, "key", getattr(k, "idx", k)))
                                           for k in path),
                   tuple(leaf.shape), str(leaf.dtype), str(leaf.sharding.spec),
                   math.prod(shard) * leaf.dtype.itemsize))
  rows.sort(key=lambda r: -r[4])
  return rows[:count]


def _needed_temp_bytes(program: Optional[ProgramReport]) -> Optional[float]:
  """The temporaries a program needed: measured, or from the compiler's out-of-memory message."""
  if program is None:
    return None
  if program.temp_bytes is not None:
    return program.temp_bytes + program.output_bytes - program.alias_bytes
  match = re.search(r"temporaries \(([\d.]+)([GM])\)", program.error or "")
  if not match:
    return None
  return float(match.group(1)) * (2**30 if match.group(2) == "G" else 2**20)


# The share of HBM a suggested microbatch must leave free: the compiler's numbers are for one
# program; the runtime, a profiler or a second program (the sampler at evaluation) need room.
HBM_SPARE = 0.1


def second_microbatch(per_device: int, micro: int) -> Optional[int]:
  """The microbatch of the second compile when `micro` rows per device per pass do not fit:
  the largest divisor of `per_device` at most half of `micro` (far enough apart that the
  compiler's rounding does not dominate the slope); None when `micro` is already 1."""
  smaller = [m for m in range(1, micro // 2 + 1) if per_device % m == 0]
  return smaller[-1] if smaller else None


def fit_temporaries(points: Sequence[tuple[int, float]]) -> tuple[float, float]:
  """(fixed bytes, bytes per example) of the line through two (microbatch, temporaries)
  points: temporaries = fixed + per_example x microbatch."""
  (m1, t1), (m2, t2) = points
  if m1 == m2:
    raise ValueError(f"two compiles at the same microbatch {m1} give no slope")
  per_example = (t1 - t2) / (m1 - m2)
  return t1 - per_example * m1, per_example


def accumulation_advice(points: Sequence[tuple[int, float]], argument_bytes: float,
                        hbm_bytes: float, per_device: int, shards: int, remat: str,
                        spare: float = HBM_SPARE) -> str:
  """The `grad_accum_steps` line of the advice, from the compiler's temporaries at two
  microbatch sizes (rows per device per pass; `points` [(microbatch, bytes)], the first the
  run's own). The predicted peak of microbatch m is arguments + fixed + per_example x m; the
  smallest `grad_accum_steps` (a divisor of `per_device`, so every microbatch is whole) whose
  prediction fits in (1 - spare) of HBM. When even microbatch 1 is predicted not to fit, the
  line says so and names `model.remat='layer'` and the mesh instead."""
  gib = lambda x: f"{x / GIB:.2f} GiB"
  measured = " and ".join(f"{gib(t)} at {m}" for m, t in points)
  budget = (1 - spare) * hbm_bytes
  instead = ("config.model.remat='layer' (now " + repr(remat) + ") or a mesh that shards more "
             "(config.mesh.fsdp, config.mesh.tensor)") if remat != "layer" else (
                 "a mesh that shards more (config.mesh.fsdp, config.mesh.tensor) or a larger "
                 "slice")
  if len(points) == 1:  # the run's microbatch is already 1: nothing to extrapolate.
    return (f"config.grad_accum_steps cannot help: a microbatch of {points[0][0]} per device "
            f"already needs {gib(points[0][1])} of temporaries; try {instead}")
  fixed, per_example = fit_temporaries(points)
  line = (f"a prediction from two compiles: temporaries {measured} rows per device per pass, "
          f"so {gib(fixed)} fixed + {per_example / GIB:.3g} GiB per example")
  if fixed < 0:
    # Not one line: the compiler scheduled the two programs differently (e.g. one pass against
    # an accumulation scan). Proportional through the smaller point instead: no fixed part,
    # the per-example bytes of the program the suggestion resembles.
    (m_small, t_small) = min(points)
    fixed, per_example = 0.0, t_small / m_small
    line = (f"a prediction from two compiles: temporaries {measured} rows per device per "
            f"pass, not on one line (its fixed part would be negative), so "
            f"{per_example / GIB:.3g} GiB per example as at {m_small}")
  if per_example <= 0:
    return (f"config.grad_accum_steps cannot help: the temporaries did not fall with the "
            f"microbatch ({line}); try {instead}")
  predict = lambda m: argument_bytes + fixed + per_example * m
  fitting = [m for m in range(per_device, 0, -1) if per_device % m == 0 and predict(m) <= budget]
  if not fitting:
    return (f"config.grad_accum_steps cannot help: even a microbatch of 1 per device is "
            f"predicted to need {gib(predict(1))} of the {gib(hbm_bytes)} HBM ({line}; "
            f"{100 * spare:.0f}% of HBM kept free); try {instead}")
  m = fitting[0]
  return (f"config.grad_accum_steps={per_device // m} (the same global batch in microbatches of "
          f"{m} per device: predicted peak {gib(predict(m))} of {gib(hbm_bytes)}, "
          f"{100 * spare:.0f}% of HBM kept free; {line}), or config.batch_size={m * shards} "
          f"(per device {per_device} -> {m})")


def suggestions(config: Any, report_programs: Sequence[ProgramReport], mesh_shape: dict,
                chip: Chip, smaller: Optional[tuple[int, ProgramReport]] = None) -> list[str]:
  """Config keys that would reduce the per-device memory, with what they change.

  `smaller`: (microbatch, the train step compiled again at `second_microbatch` rows per device
  per pass) when the run's own did not fit: the two give the `grad_accum_steps` advice
  (`accumulation_advice`).
  """
  from dense_diffusion.models import unet as unet_lib  # pylint: disable=g-import-not-at-top
  out = []
  shards = mesh_shape["data"] * mesh_shape["fsdp"]
  per_device = int(config.batch_size) // max(shards, 1)
  micro = per_device // int(config.get("grad_accum_steps", 1))  # rows per device per pass.
  train = next((p for p in report_programs if p.name == "train_step"), None)
  state_bound = (train is not None and train.temp_bytes is None and train.argument_bytes
                 and train.argument_bytes > chip.hbm_bytes)  # activations are not the problem.
  remat = unet_lib.remat_policy_name(config.model.get("remat"))
  needed = _needed_temp_bytes(train)
  if train is not None and not train.fits and not state_bound and needed is not None and (
      train.argument_bytes is not None):
    points = [(micro, needed)]
    if smaller is not None and _needed_temp_bytes(smaller[1]) is not None:
      points.append((smaller[0], _needed_temp_bytes(smaller[1])))
    out.append(accumulation_advice(points, train.argument_bytes, chip.hbm_bytes, per_device,
                                   shards, remat))
  if remat != "layer" and not state_bound:
    # Layer scope, policy full: the least activation memory (docs/compile.md, "Fitting a step").
    out.append("config.model.remat='layer' (keep only each resnet's and transformer layer's "
               f"inputs for the backward pass; now {remat!r})")
  if mesh_shape["data"] > 1 and mesh_shape["fsdp"] == 1:
    out.append("config.mesh.fsdp=-1 with config.mesh.data=1 (shard parameters, gradients and "
               "optimizer state over the devices instead of replicating them)")
  if str(config.model.get("dtype") or "float32") == "float32" and not state_bound:
    out.append("config.model.dtype='bfloat16' (half the activation bytes)")
  attention_cfg = dict(config.model.get("attention") or {})
  if (attention_cfg.get("tpu") or "auto") not in ("auto", "splash"):
    out.append("config.model.attention.tpu='auto' (the splash kernel never holds the "
               "[queries, keys] attention matrix)")
  if not config.model.get("lora") and train is not None and train.argument_bytes and (
      train.argument_bytes > chip.hbm_bytes / 2):
    out.append("config.model.lora (train low-rank adapters: no optimizer state for the base)")
  if config.eval.get("batch_size") and int(config.eval.batch_size) > shards and any(
      p.name == "sampler" and not p.fits for p in report_programs):
    out.append(f"config.eval.batch_size={int(config.eval.batch_size) // 2} (the sampler's "
               "batch)")
  return out


def compile_run(config: Any, topology_name: str, attention_overrides: Optional[dict] = None,
                programs: Optional[Sequence[str]] = None,
                log: Log = _print_flushed) -> Report:
  """Builds the run abstractly on the topology's devices, compiles train step and sampler.

  `attention_overrides`: `attention.Options` fields over `config.model.attention` (e.g.
  `{"tpu": "xla"}` for the program without the splash kernel; bench/compile_table.py).
  `programs`: the names to compile (default both, "train_step" and "sampler").
  `log`: takes the progress lines (`phase`: each step's start and elapsed seconds).
  When the train step does not fit, it is compiled once more at a smaller microbatch (the same
  global batch, more `grad_accum_steps`) for the advice's fit (`accumulation_advice`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from dense_diffusion import experiment  # pylint: disable=g-import-not-at-top
  from dense_diffusion import sharding  # pylint: disable=g-import-not-at-top

  topology = parse_topology(topology_name)
  with phase(log, f"describing the {topology.name} devices (libtpu)"):
    devices = topology_devices(topology)
  mesh = sharding.make_mesh(dict(config.mesh), devices=devices)
  if attention_overrides:
    config = copy.deepcopy(config)
    with config.unlocked():
      config.model.attention = {**dict(config.model.get("attention") or {}),
                                **attention_overrides}
  with phase(log, f"building the abstract run (mesh {dict(mesh.shape)})"):
    exp = experiment.Experiment(config, mesh=mesh, abstract=True)  # configures the attention.
  res = int(config.model.unet["sample_size"])
  batch = _batch_specs(exp, int(config.batch_size), res, res)
  eval_batch = int(config.eval.get("batch_size") or config.batch_size)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  eval_batch = max(shards, eval_batch // shards * shards)  # the sampler's batch is sharded too.
  eval_specs = _batch_specs(exp, eval_batch, res, res)
  key = jax.eval_shape(lambda: jax.random.key(0))
  hbm = topology.chip.hbm_bytes
  n = len(devices)
  mesh_shape = dict(mesh.shape)
  state_bytes = _per_device_bytes((exp.state, exp.frozen))
  if state_bytes > hbm:
    # The train state alone does not fit: no compilation needed to say so.
    programs = [ProgramReport(name="train_step", fits=False, argument_bytes=state_bytes,
                              error=f"train state and frozen parts alone take "
                                    f"{state_bytes / GIB:.2f} GiB per device, more than the "
                                    f"{hbm / GIB:.0f} GiB of HBM (not compiled)")]
    return Report(topology=topology, mesh_shape=mesh_shape, global_batch=int(config.batch_size),
                  eval_batch=eval_batch, programs=programs, largest=_largest_arrays(exp),
                  suggestions=suggestions(config, programs, mesh_shape, topology.chip))
  predictor = exp.make_predictor()  # the blocks run without remat there.

  def train_lowering(run):
    # Kernel FLOPs of the train step: forward + backward = 3x the forward's.
    return (lambda: run.train_step.lower(run.state, run.frozen, batch), 3.0,
            state_bytes + _per_device_bytes(batch), run.grad_accum_steps)

  lowerings = {
      "train_step": train_lowering(exp),
      "sampler": (lambda: predictor.lower(exp.state.params, exp.frozen,
                                          eval_specs["image"], eval_specs["task"], key), 1.0,
                  _per_device_bytes((exp.state.params, exp.frozen,
                                     eval_specs["image"])),
                  exp.paradigm.sampler_loop_trips()),
  }
  with jax.set_mesh(mesh):
    programs = [_compile(name, lower, multiplier, hbm, n, argument_bytes, trips, log=log)
                for name in (programs or lowerings)
                for lower, multiplier, argument_bytes, trips in [lowerings[name]]]
  smaller = None
  train = next((p for p in programs if p.name == "train_step"), None)
  per_device = int(config.batch_size) // shards
  micro = per_device // exp.grad_accum_steps
  second = second_microbatch(per_device, micro)
  if train is not None and not train.fits and second is not None:
    # The advice's second point: the same global batch at fewer rows per pass.
    smaller_config = copy.deepcopy(config)
    with smaller_config.unlocked():
      smaller_config.grad_accum_steps = per_device // second
    what = f"microbatch {second} per device (grad_accum_steps={per_device // second})"
    with phase(log, f"building the abstract run at {what}"):
      smaller_exp = experiment.Experiment(smaller_config, mesh=mesh, abstract=True)
    lower, multiplier, argument_bytes, trips = train_lowering(smaller_exp)
    with jax.set_mesh(mesh):
      smaller = (second, _compile(f"train_step at {what}", lower, multiplier, hbm, n,
                                  argument_bytes, trips, log=log))
  return Report(topology=topology, mesh_shape=mesh_shape, global_batch=int(config.batch_size),
                eval_batch=eval_batch, programs=programs, largest=_largest_arrays(exp),
                suggestions=suggestions(config, programs, mesh_shape, topology.chip, smaller))


def _gib(x: Optional[float]) -> str:
  return "-" if x is None else f"{x / GIB:.2f} GiB"


def format_report(report: Report, mfus: Sequence[float]) -> str:
  t = report.topology
  lines = [f"{t.name}: {t.chips} x {t.generation} chips ({t.shape}), "
           f"{t.chip.hbm_bytes / GIB:.0f} GiB HBM and {t.chip.peak_flops / 1e12:.0f} bf16 "
           f"TFLOP/s per chip; mesh {report.mesh_shape}; global batch {report.global_batch} "
           f"(sampler {report.eval_batch})", "",
           "| program | arguments | outputs | temporaries | aliased | peak / HBM | fits | "
           "TFLOPs per device (XLA + attention kernels) | compile s |",
           "|---|---:|---:|---:|---:|---:|---|---:|---:|"]
  for p in report.programs:
    peak = "-" if p.peak_bytes is None else (
        f"{_gib(p.peak_bytes)} / {t.chip.hbm_bytes / GIB:.0f} GiB "
        f"({100 * p.peak_bytes / t.chip.hbm_bytes:.0f}%)")
    flops = "-" if p.flops is None else (
        f"{p.flops / 1e12:.4g} ({p.xla_flops / 1e12:.4g} + {p.kernel_flops / 1e12:.4g})")
    lines.append(f"| {p.name} | {_gib(p.argument_bytes)} | {_gib(p.output_bytes)} | "
                 f"{_gib(p.temp_bytes)} | {_gib(p.alias_bytes)} | {peak} | "
                 f"{'yes' if p.fits else 'NO'} | {flops} | {p.compile_seconds:.0f} |")
  for p in report.programs:
    if p.error:
      lines.append(f"{p.name}: {p.error}")
  train = next((p for p in report.programs if p.name == "train_step"), None)
  if train is not None and train.flops:
    lines.append("")
    for mfu in mfus:
      seconds = train.flops / (t.chip.peak_flops * mfu)
      lines.append(f"train step at {100 * mfu:.0f}% MFU: {seconds:.4g} s/step, "
                   f"{report.global_batch / seconds:.1f} examples/s "
                   f"({report.global_batch / seconds / t.chips:.2f} per chip)")
  lines += ["", "largest arrays (per-device bytes):",
            "| array | shape | dtype | sharding | per device |", "|---|---|---|---|---:|"]
  for path, shape, dtype, spec, nbytes in report.largest:
    lines.append(f"| {path} | {shape} | {dtype} | {spec} | {nbytes / 2**20:.1f} MiB |")
  if not report.fits:
    lines += ["", "does not fit; config keys that would help:"]
    lines += [f"  --{s}" if s.startswith("config.") else f"  {s}" for s in report.suggestions]
  return "\n".join(lines)


def parse_mfus(text: str) -> list[float]:
  try:
    values = [float(x) for x in text.split(",") if x.strip()]
  except ValueError:
    values = []
  if not values or any(not 0 < v <= 1 for v in values):
    raise errors.ConfigError(f"--mfu={text!r}: give fractions in (0, 1], e.g. 0.4,0.6")
  return values


def run(config: Any, topology_name: Optional[str], mfu: str = "0.4,0.6") -> int:
  """`main compile`: prints the report; 0 when every program fits, 1 when one does not."""
  if not topology_name:
    raise errors.UserError("compile needs --topology (e.g. v5e-16, v5p-8, v4-8, v6e-8)")
  parse_topology(topology_name)
  mfus = parse_mfus(mfu)
  report = compile_run(config, topology_name)
  print(format_report(report, mfus), flush=True)
  return 0 if report.fits else 1
