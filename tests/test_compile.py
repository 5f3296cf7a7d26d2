"""`main compile`: a run compiled for a TPU slice on this CPU machine (libtpu describes the TPU
devices; nothing runs on them). Needs libtpu: the `[tpu-aot]` extra, or TPU_LIBRARY_PATH
pointing to a libtpu.so."""
import importlib
import json
import math
import os
import pathlib
import re
import sys
import textwrap

import numpy as np
import pytest

from dense_diffusion import aot
from dense_diffusion import errors
import subprocess_env

REPO = pathlib.Path(__file__).resolve().parents[1]


needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (pip install -e '.[tpu-aot]', or set TPU_LIBRARY_PATH to a "
           "libtpu.so): TPU devices cannot be described")


def _compile(*args, cwd=REPO):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("JAX_PLATFORMS", None)
  env.pop("XLA_FLAGS", None)  # the test suite's XLA:CPU flags mean nothing to the TPU compiler
  return subprocess_env.run([sys.executable, "-m", "dense_diffusion.main", "compile", *args],
                            cwd=cwd, env=env, capture_output=True, timeout=900)


def test_topology_names():
  t = aot.parse_topology("v5e-16")
  assert (t.chips, t.shape, t.chip.hbm_bytes) == (16, "v5e:4x4", 16 * 2**30)
  assert aot.parse_topology("v5p-8").shape == "v5p:2x2x1"  # 8 TensorCores = 4 chips
  assert aot.parse_topology("v4-8").chips == 4
  assert aot.parse_topology("v6e-8").shape == "v6e:2x4"
  with pytest.raises(errors.ConfigError, match="known: v5e-4"):
    aot.parse_topology("v5e-3")
  with pytest.raises(errors.UnknownNameError):
    aot.parse_topology("v9-8")
  with pytest.raises(errors.ConfigError, match="slice name"):
    aot.parse_topology("tpu")
  assert aot.parse_mfus("0.4,0.6") == [0.4, 0.6]
  with pytest.raises(errors.ConfigError):
    aot.parse_mfus("40")


@pytest.mark.slow  # the TPU compiler takes ~50 CPU-s for the tiny train step and sampler.
@needs_libtpu
def test_tiny_config_compiles_for_v5e_and_reports_memory_and_flops():
  proc = _compile("--config", "configs/tiny.py", "--topology", "v5e-4",
                  "--config.diffusion.num_inference_steps=1")
  out = proc.stdout
  assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
  assert "v5e-4: 4 x v5e chips (v5e:2x2), 16 GiB HBM" in out
  rows = {line.split("|")[1].strip(): line for line in out.splitlines()
          if line.startswith("| train_step") or line.startswith("| sampler")}
  assert set(rows) == {"train_step", "sampler"}
  for row in rows.values():
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[5].endswith("/ 16 GiB (0%)") and cells[6] == "yes", row
    assert float(cells[7].split()[0]) > 0, row  # TFLOPs per device
  assert re.search(r"train step at 40% MFU: [0-9.e-]+ s/step, [0-9.]+ examples/s", out)
  assert "| params/unet/" in out  # the largest arrays with their shardings
  # Progress as it goes: each phase's start, then its end with the elapsed seconds, in order,
  # all before the report (nothing compiled a second time: the run fits).
  phases = [(m.group(1), m.group(2)) for m in re.finditer(
      r"^\[compile\] (.+?)(?: \.\.\.|: ([0-9]+\.[0-9]) s)$", out, flags=re.MULTILINE)]
  names = ["describing the v5e-4 devices (libtpu)",
           "building the abstract run (mesh {'data': 4, 'fsdp': 1, 'tensor': 1})",
           "lowering train_step", "compiling train_step", "lowering sampler", "compiling sampler"]
  assert [name for name, _ in phases] == [n for n in names for _ in (0, 1)], phases
  assert all((seconds is None) == (i % 2 == 0) for i, (_, seconds) in enumerate(phases)), phases
  assert float(phases[7][1]) > 0, phases  # compiling the train step takes time
  assert out.index("[compile] compiling sampler:") < out.index("v5e-4: 4 x v5e chips")


@needs_libtpu
def test_config_that_cannot_fit_exits_1_and_names_what_to_change(tmp_path):
  """A UNet whose replicated parameters, Adam moments and EMA exceed a v5e chip's 16 GiB."""
  (tmp_path / "huge.py").write_text(textwrap.dedent("""
      from configs import tiny

      def get_config(arg=None):
        c = tiny.get_config(arg)
        c.model.unet["block_out_channels"] = [2048, 4096]  # ~2 G parameters, replicated
        c.model.unet["norm_num_groups"] = 32
        return c
      """))
  proc = _compile("--config", str(tmp_path / "huge.py"), "--topology", "v5e-4")
  assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
  assert "| train_step |" in proc.stdout and "| NO |" in proc.stdout
  assert "more than the 16 GiB of HBM" in proc.stdout
  assert "config keys that would help" in proc.stdout
  assert "--config.mesh.fsdp=-1" in proc.stdout and "--config.model.lora" in proc.stdout
  # The state, not the activations: nothing compiled, no microbatch advice, no second compile.
  assert "grad_accum_steps" not in proc.stdout and "remat" not in proc.stdout
  assert "[compile] building the abstract run (mesh" in proc.stdout
  assert "[compile] lowering" not in proc.stdout


# configs/tiny.py at 128x128, 256 rows per v5e chip: activations far beyond 16 GiB at 256 and
# at 128 rows, so both compiles stop early at buffer assignment (~25 and ~45 CPU-s); the train
# step alone (no sampler: at 128x128 it alone takes minutes to compile). At
# exec_time_optimization_effort=-1 the compiler squeezes both close to HBM instead (16.3 GB),
# and a near fit compiles for minutes.
_ACTIVATION_BOUND = textwrap.dedent("""
    from dense_diffusion import aot
    aot.use_cpu_host()
    from configs import tiny
    config = tiny.get_config("res=128")
    config.batch_size = 1024
    report = aot.compile_run(config, "v5e-4", programs=("train_step",))
    print(aot.format_report(report, [0.4]))
""")


@pytest.mark.slow  # two TPU compiles of the tiny train step that stop at buffer assignment.
@needs_libtpu
def test_activations_that_cannot_fit_get_advice_from_two_compiles():
  """The train step runs out of HBM at 256 rows per device: it is compiled again at 128 (2
  microbatches), and the advice comes from the two, with both points printed."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("JAX_PLATFORMS", None)
  env.pop("XLA_FLAGS", None)
  proc = subprocess_env.run(subprocess_env.python_script(_ACTIVATION_BOUND), cwd=REPO, env=env,
                            capture_output=True, timeout=900)
  out = proc.stdout
  assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
  assert re.search(r"^\[compile\] compiling train_step: stopped after [0-9.]+ s "
                   r"\(RESOURCE_EXHAUSTED", out, re.MULTILINE), out
  second = "train_step at microbatch 128 per device (grad_accum_steps=2)"
  assert f"[compile] compiling {second} ..." in out, out
  needed = [float(x) for x in re.findall(r"HLO temporaries \(([0-9.]+)G\)", out)]
  advice = next(line for line in out.splitlines() if "--config.grad_accum_steps" in line)
  match = re.search(r"--config.grad_accum_steps=(\d+) \(the same global batch in microbatches "
                    r"of (\d+) per device: predicted peak ([0-9.]+) GiB of 16.00 GiB, 10% of "
                    r"HBM kept free; a prediction from two compiles: temporaries ([0-9.]+) GiB "
                    r"at 256 and ([0-9.]+) GiB at 128 rows per device per pass", advice)
  assert match, advice
  accum, micro, peak, first, second_temps = (float(g) for g in match.groups())
  assert accum * micro == 256 and accum > 2, advice
  assert peak <= 0.9 * 16, advice
  # The two points are the compiler's own figures (its out-of-memory messages, GB = GiB; above
  # the 15.75 GB it has; libtpu 0.0.42 said 45.67 and 16.0: near HBM its own rematerialisation
  # squeezes the figure, which is why the advice says it is a prediction).
  assert needed[:2] == [first, second_temps] and first > second_temps > 15.75, (needed, advice)


def test_compile_without_topology_is_a_user_error():
  proc = _compile("--config", "configs/tiny.py")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == "error: compile needs --topology"


G = 2**30


def test_fit_through_two_compiles_is_the_straight_line():
  # The flagship's two rows (docs/benchmarks.md): 28.38 GB at 16 per chip, 16.77 GB at 8.
  fixed, per_example = aot.fit_temporaries([(16, 28.38 * G), (8, 16.77 * G)])
  np.testing.assert_allclose(per_example / G, (28.38 - 16.77) / 8)  # 1.45125
  np.testing.assert_allclose(fixed / G, 28.38 - 16 * 1.45125)  # 5.16
  with pytest.raises(ValueError):
    aot.fit_temporaries([(8, G), (8, 2 * G)])
  assert aot.second_microbatch(16, 16) == 8
  assert aot.second_microbatch(24, 24) == 12
  assert aot.second_microbatch(12, 12) == 6
  assert aot.second_microbatch(10, 5) == 2  # divisors of 10 at most 5 // 2
  assert aot.second_microbatch(16, 1) is None


def test_accumulation_advice_is_the_smallest_divisor_predicted_to_fit_with_room():
  """The flagship's numbers: 16 per chip on a v5e-16 (16 GiB), 1 GiB of arguments. The half
  that the old estimate suggested (8 per chip: 1 + 16.77 GiB) does not fit; with 10% of HBM
  free (14.4 GiB) the predicted peaks are 1 + 5.16 + 1.45125 m GiB: m = 4 -> 11.965 fits,
  m = 8 -> 17.77 does not, so grad_accum_steps = 16 / 4 = 4."""
  points = [(16, 28.38 * G), (8, 16.77 * G)]
  line = aot.accumulation_advice(points, G, 16 * G, per_device=16, shards=16, remat="full")
  assert line.startswith("config.grad_accum_steps=4 (the same global batch in microbatches "
                         "of 4 per device: predicted peak 11.96 GiB of 16.00 GiB, 10% of HBM "
                         "kept free; a prediction from two compiles: temporaries 28.38 GiB at "
                         "16 and 16.77 GiB at 8 rows per device per pass, so 5.16 GiB fixed + "
                         "1.45 GiB per example"), line
  assert line.endswith("or config.batch_size=64 (per device 16 -> 4)"), line
  # Divisors only: 12 per device, 3 GiB fixed + 1 GiB per example, 2 GiB of arguments: 9 per
  # device would fit (14 <= 14.4) but does not divide 12; 6 (11 GiB) does: 2 microbatches.
  line = aot.accumulation_advice([(12, 15 * G), (6, 9 * G)], 2 * G, 16 * G, per_device=12,
                                 shards=4, remat="layer")
  assert line.startswith("config.grad_accum_steps=2 (the same global batch in microbatches "
                         "of 6 per device: predicted peak 11.00 GiB"), line
  # The 10% matters: 14.5 GiB at 1 per device fits 16 GiB but not 14.4.
  line = aot.accumulation_advice([(8, 20.5 * G), (4, 16.5 * G)], 1 * G, 16 * G, per_device=8,
                                 shards=4, remat="full")
  assert line.startswith("config.grad_accum_steps cannot help: even a microbatch of 1 per "
                         "device is predicted to need 14.50 GiB of the 16.00 GiB HBM (a "
                         "prediction from two compiles: temporaries 20.50 GiB at 8 and 16.50 "
                         "GiB at 4"), line
  assert line.endswith("try config.model.remat='layer' (now 'full') or a mesh that shards "
                       "more (config.mesh.fsdp, config.mesh.tensor)"), line
  line = aot.accumulation_advice([(8, 20.5 * G), (4, 16.5 * G)], 1 * G, 16 * G, per_device=8,
                                 shards=4, remat="layer")
  assert "config.model.remat" not in line and "a larger slice" in line, line
  # Temporaries that do not fall with the microbatch: accumulation cannot help.
  line = aot.accumulation_advice([(8, 20 * G), (4, 20.5 * G)], G, 16 * G, per_device=8,
                                 shards=4, remat="full")
  assert line.startswith("config.grad_accum_steps cannot help: the temporaries did not fall"), line
  # Not one line (the run's own pass against the accumulation scan, as libtpu compiled a tiny
  # UNet: 339.22 GB at 256, 67.14 GB at 128): proportional through the smaller point,
  # 67.14 / 128 = 0.5245 GB per example: 16 per device (8.49 GB with 0.1 of arguments).
  line = aot.accumulation_advice([(256, 339.22 * G), (128, 67.14 * G)], 0.1 * G, 16 * G,
                                 per_device=256, shards=4, remat="none")
  assert line.startswith("config.grad_accum_steps=16 (the same global batch in microbatches "
                         "of 16 per device: predicted peak 8.49 GiB"), line
  assert "not on one line (its fixed part would be negative), so 0.525 GiB per example as at " \
         "128" in line, line
  # Already at one row per pass: one measured point, no extrapolation.
  line = aot.accumulation_advice([(1, 20 * G)], G, 16 * G, per_device=4, shards=4, remat="full")
  assert line.startswith("config.grad_accum_steps cannot help: a microbatch of 1 per device "
                         "already needs 20.00 GiB of temporaries"), line


def test_out_of_memory_advice_reads_the_compilers_message():
  """`suggestions` takes the temporaries from libtpu's out-of-memory message (as libtpu words
  it) for both compiles, and the microbatches from the config (16 per chip of a v5e-16)."""
  from configs import generalist_pixel128
  config = generalist_pixel128.get_config()  # batch 256: 16 per chip of a v5e-16
  oom = lambda temps: aot.ProgramReport(
      name="train_step", fits=False, argument_bytes=2**30,
      error="RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
            f"temporaries ({temps}G) exceeds available HBM (15.75G).")
  mesh = {"data": 1, "fsdp": 16, "tensor": 1}
  hints = aot.suggestions(config, [oom(28.38)], mesh, aot.CHIPS.get("v5e"),
                          smaller=(8, oom(16.77)))
  assert hints[0].startswith("config.grad_accum_steps=4 (the same global batch in "
                             "microbatches of 4 per device: predicted peak 11.96 GiB"), hints
  # Already accumulating 2: the run's own point is 8 rows a pass, the second 4.
  with config.unlocked():
    config.grad_accum_steps = 2
  hints = aot.suggestions(config, [oom(16.77)], mesh, aot.CHIPS.get("v5e"),
                          smaller=(4, oom(10.97)))
  # 1 + 5.17 + 1.45 m <= 14.4: m = 4 -> 11.97 GiB.
  assert hints[0].startswith("config.grad_accum_steps=4 (the same global batch in "
                             "microbatches of 4 per device"), hints


def test_loop_bodies_are_counted_once_per_trip():
  """XLA's cost analysis counts a `while` body once: a 4-trip scan of a matmul reports the FLOPs
  of one trip, and `loop_trips` restores the unrolled program's count (here on the CPU)."""
  import jax
  import jax.numpy as jnp
  x = jax.ShapeDtypeStruct((4, 64, 64), jnp.float32)
  w = jnp.ones((64, 64))

  def looped(x):
    return jax.lax.scan(lambda c, xi: (c + (xi @ w).sum(), None), 0.0, x)[0]

  def unrolled(x):
    return sum((x[i] @ w).sum() for i in range(4))

  once = aot._compile("loop", lambda: jax.jit(looped).lower(x), 1.0, 2**30, 1)
  scaled = aot._compile("loop", lambda: jax.jit(looped).lower(x), 1.0, 2**30, 1, loop_trips=4)
  flat = aot._compile("flat", lambda: jax.jit(unrolled).lower(x), 1.0, 2**30, 1)
  assert once.xla_flops < 0.3 * flat.xla_flops
  np.testing.assert_allclose(scaled.xla_flops, flat.xla_flops, rtol=0.01)


# One UNet level at 16x16 (256 tokens: XLA's attention), 128 channels (a whole TPU lane, no
# padding), 2 heads of 64 like SD's: a down block of 1 resnet + 1 transformer layer and an up
# block of 2 + 2, batch 16, bf16. Compiled at `exec_time_optimization_effort=-1` (JAX's public
# compile option): 3x less compile time, and no memory-space assignment moving buffers into the
# chip's on-chip VMEM, which at this size would hide most temporaries from the HBM figure (the
# full-effort compile reports 0 bytes for some of these programs); the temporaries are then the
# HBM buffer assignment of the same schedule.
_REMAT_TEMPS = textwrap.dedent("""
    import json
    from dense_diffusion import aot
    aot.use_cpu_host()
    import jax, jax.numpy as jnp
    from flax import nnx
    from dense_diffusion import sharding
    from dense_diffusion.models import unet as unet_lib

    jax.config.update("jax_exec_time_optimization_effort", -1.0)
    devices = aot.topology_devices(aot.parse_topology("v5e-4"))
    mesh = sharding.make_mesh({"data": 1}, devices=devices[:1])
    one = sharding.replicated(mesh)
    config = dict(in_channels=4, out_channels=4, block_out_channels=[128],
                  down_block_types=["CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"],
                  layers_per_block=1, cross_attention_dim=32, attention_head_dim=2,
                  norm_num_groups=32, mid_block_type=None)
    spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32, sharding=one)
    temps = {}
    for remat in ("none", "full", "layer"):
      unet = nnx.eval_shape(lambda: unet_lib.UNet(config, dtype=jnp.bfloat16, remat=remat,
                                                  rngs=nnx.Rngs(0)))
      graphdef, state = nnx.split(unet)
      state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), state)

      def loss(state, x, t, context):
        return jnp.mean(nnx.merge(graphdef, state)(x, t, context) ** 2)

      with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss)).lower(
            state, spec((16, 16, 16, 4)), spec((16,)), spec((16, 8, 32))).compile()
      temps[remat] = compiled.memory_analysis().temp_size_in_bytes
    print("TEMPS " + json.dumps(temps))
""")


@pytest.fixture(scope="module")
def remat_temporaries():
  env = dict(os.environ, PYTHONPATH=str(REPO))
  env.pop("JAX_PLATFORMS", None)
  env.pop("XLA_FLAGS", None)
  proc = subprocess_env.run(subprocess_env.python_script(_REMAT_TEMPS), cwd=REPO, env=env,
                            capture_output=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("TEMPS ")]
  assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-3000:]
  return json.loads(lines[-1][len("TEMPS "):])


@pytest.mark.slow  # three TPU compiles of a one-level UNet's gradient: ~45 CPU-s.
@needs_libtpu
def test_layer_remat_needs_fewer_temporaries_than_block_remat(remat_temporaries):
  """The TPU compiler's own figures for one UNet's forward + backward on a v5e chip: block remat
  (each down / up block one checkpoint) keeps less than no remat, and layer remat (each resnet,
  transformer layer and projection one checkpoint) less again, because the backward pass then
  recomputes one layer at a time instead of the up block's 2 resnets and 2 transformer layers
  (measured with libtpu 0.0.42: 105.5, 83.9, 56.0 MiB)."""
  none, block, layer = (remat_temporaries[k] for k in ("none", "full", "layer"))
  assert block < 0.9 * none, remat_temporaries
  assert layer < 0.8 * block, remat_temporaries


# The real configs, with the arguments that put their latent runs in SD's latent space.
REAL_CONFIGS = [("generalist_pixel128", None), ("marigold", "real=1"), ("onestep", "real=1"),
                ("onestep", "real=1,latent=1"), ("dmp", "real=1"), ("vpd_depth", "real=1")]


@pytest.mark.parametrize("name,arg", REAL_CONFIGS)
def test_real_config_batches_shard_on_the_named_slices(name, arg):
  """`main compile --config configs/NAME.py:real=1 --topology SLICE` starts: the global batch
  splits evenly over the data-parallel shards of every slice the configs are sized for, and
  over the microbatches (the same arithmetic as sharding.make_mesh and check_grad_accum)."""
  from configs import generalist_pixel128
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  for slice_name in generalist_pixel128.SLICES:
    devices = aot.parse_topology(slice_name).chips
    sizes = {axis: int(config.mesh.get(axis, 1)) for axis in ("data", "fsdp", "tensor")}
    fixed = math.prod(s for s in sizes.values() if s != -1)
    assert devices % fixed == 0, (slice_name, sizes)
    sizes = {a: devices // fixed if s == -1 else s for a, s in sizes.items()}
    shards = sizes["data"] * sizes["fsdp"]
    assert int(config.batch_size) % shards == 0, (slice_name, config.batch_size, shards)
    per_shard = int(config.batch_size) // shards
    assert per_shard % int(config.get("grad_accum_steps", 1)) == 0, (slice_name, per_shard)
  if name == "vpd_depth":  # VPD's 3 examples per device (8 GPUs x 3), on a v5e-16's 16 chips.
    assert config.batch_size == 3 * 16
    assert config.total_steps == 25_000 * 24 // 48  # as many examples as VPD's 25k x 24.
  if name == "dmp":  # DMP's batch 8 does not split over 16 chips: 16, half the steps.
    assert (config.batch_size, config.total_steps) == (16, 25_000)
    one_gpu = importlib.import_module("configs.dmp").get_config("real=1,chips=1")
    assert (one_gpu.batch_size, one_gpu.total_steps) == (8, 50_000)


def test_real_configs_carry_the_vae_architecture_they_expect():
  """A latent real config builds its VAE with no files (an abstract compile reads none), with
  SD-2's VAE architecture: 83,653,863 parameters, the count of diffusers' AutoencoderKL built
  from the same keys (`sum(p.numel() for p in AutoencoderKL(**SD2_VAE).parameters())`,
  diffusers 0.42; not built here: importing and constructing it takes ~25 s)."""
  import jax
  from flax import nnx
  from configs import generalist_pixel128
  from dense_diffusion.experiment import model as model_lib
  latent = [importlib.import_module(f"configs.{name}").get_config(arg)
            for name, arg in REAL_CONFIGS + [("vpd_seg", "real=1")]]
  latent = [c for c in latent if c.model.latent]
  assert len(latent) == 5  # marigold, onestep latent=1, dmp, vpd_depth, vpd_seg
  for config in latent:  # one architecture (SD-1.5's VAE, VPD's, is SD-2's)
    assert config.model.vae.pretrained is None  # given on the command line for training
    assert config.model.vae.config.to_dict() == generalist_pixel128.SD2_VAE
  vae = nnx.eval_shape(lambda: model_lib.build_vae(latent[0].model))
  sizes = [math.prod(x.shape) for x in jax.tree.leaves(nnx.state(vae, nnx.Param))]
  assert sum(sizes) == 83_653_863
  assert max(sizes) == 512 * 512 * 3 * 3  # the 512-channel convolutions' kernels
