"""Schedules: parity with diffusers' DDPM/DDIM schedulers, rescale, SNR shift, config reading."""
import dataclasses
import math

import jax
import numpy as np
import pytest

from dense_diffusion.diffusion import schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

KINDS = ["linear", "scaled_linear", "squaredcos_cap_v2"]
BETA_RANGES = [(1e-4, 0.02), (0.00085, 0.012)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("betas_range", BETA_RANGES)
@pytest.mark.parametrize("num_train_timesteps", [1000, 37])
def test_alphas_cumprod_match_diffusers(kind, rescale, betas_range, num_train_timesteps):
  start, end = betas_range
  ref = diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=start,
                                beta_end=end, beta_schedule=kind, rescale_betas_zero_snr=rescale)
  ours = schedules.make(kind, num_train_timesteps, start, end, rescale_betas_zero_snr=rescale)
  # The zero-SNR rescale subtracts sqrt(alpha_bar_T) and divides neighbouring alpha_bars, which
  # amplifies float32 rounding; torch's vectorised CPU kernels round differently on different
  # CPUs (bit-equal on one Intel VM, 3.8e-6 apart on an AMD one), so the rescaled tables are
  # compared within float32 error of the exact algorithm rather than bit for bit.
  ac_atol, beta_atol = (2.5e-6, 1e-5) if rescale else (1e-6, 2e-6)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0,
                             atol=ac_atol)
  np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=0, atol=beta_atol)
  np.testing.assert_allclose(ours.alphas, ref.alphas.numpy(), rtol=0, atol=beta_atol)
  if rescale:
    plain = schedules.make(kind, num_train_timesteps, start, end)
    exact_betas, exact_ac = _rescale_float64(plain.betas)
    np.testing.assert_allclose(ours.betas, exact_betas, rtol=0, atol=1e-5)
    np.testing.assert_allclose(ours.alphas_cumprod, exact_ac, rtol=0, atol=2e-6)
    assert ours.betas[-1] == 1.0 and ours.alphas_cumprod[-1] == 0.0
  assert ours.alphas_cumprod.dtype == np.float32
  assert ours.num_train_timesteps == num_train_timesteps
  if not rescale:  # the float32 path of diffusers is reproduced bit for bit
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
  ddim = diffusers.DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=start,
                                 beta_end=end, beta_schedule=kind, rescale_betas_zero_snr=rescale)
  np.testing.assert_allclose(ours.alphas_cumprod, ddim.alphas_cumprod.numpy(), rtol=0, atol=ac_atol)


def _rescale_float64(betas):
  """Lin et al. 2023 Algorithm 1 in float64: the exact tables the float32 paths approximate."""
  alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, np.float64))
  sq = np.sqrt(alphas_cumprod)
  sq = (sq - sq[-1]) * sq[0] / (sq[0] - sq[-1])
  ab = sq**2
  new_betas = 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])
  return new_betas, np.cumprod(1.0 - new_betas)


def test_make_defaults_are_diffusers_defaults():
  ref = diffusers.DDPMScheduler()
  np.testing.assert_array_equal(schedules.make().alphas_cumprod, ref.alphas_cumprod.numpy())


def test_derived_tables():
  ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
  ac = ref.alphas_cumprod.numpy().astype(np.float64)
  s = schedules.make("scaled_linear", 1000, 0.00085, 0.012)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(ac), rtol=1e-6)
  np.testing.assert_allclose(s.sqrt_one_minus_alphas_cumprod, np.sqrt(1 - ac), rtol=1e-6)
  np.testing.assert_allclose(s.snr, ac / (1 - ac), rtol=1e-5)
  np.testing.assert_allclose(s.log_snr, np.log(ac / (1 - ac)), rtol=1e-5, atol=1e-5)
  assert float(s.final_alpha_cumprod) == 1.0
  # SD's well-known terminal value (REFERENCES: a_999 ~ 0.0047).
  assert abs(float(s.alphas_cumprod[-1]) - 0.0047) < 2e-4


def test_zero_terminal_snr():
  s0 = schedules.make("scaled_linear", 1000, 0.00085, 0.012)
  s = schedules.make("scaled_linear", 1000, 0.00085, 0.012, rescale_betas_zero_snr=True)
  assert float(s.alphas_cumprod[-1]) == 0.0
  assert float(s.snr[-1]) == 0.0
  assert np.isneginf(s.log_snr[-1])
  np.testing.assert_allclose(s.alphas_cumprod[0], s0.alphas_cumprod[0], rtol=1e-6)
  assert np.all(np.diff(s.alphas_cumprod) <= 0)


def test_ones_schedule_is_genpercept():
  s = schedules.make("ones", 1000)
  np.testing.assert_array_equal(s.betas, 1.0)
  np.testing.assert_array_equal(s.alphas_cumprod, 0.0)
  np.testing.assert_array_equal(s.sqrt_one_minus_alphas_cumprod, 1.0)


def test_snr_shift_for_resolution():
  base = schedules.make("squaredcos_cap_v2")
  same = schedules.shift_snr_for_resolution(base, 64, base_resolution=64)
  np.testing.assert_allclose(same.alphas_cumprod, base.alphas_cumprod, rtol=1e-6, atol=1e-7)
  shifted = schedules.shift_snr_for_resolution(base, 256, base_resolution=64)
  # log SNR' = log SNR + 2 log(64 / 256), checked from diffusers' own alpha_bar.
  ac = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.numpy()
  ac = ac.astype(np.float64)
  expected_log_snr = np.log(ac / (1 - ac)) + 2 * math.log(64 / 256)
  finite = np.isfinite(expected_log_snr)
  np.testing.assert_allclose(shifted.log_snr[finite], expected_log_snr[finite], atol=2e-4)
  assert np.all(shifted.alphas_cumprod <= base.alphas_cumprod + 1e-7)  # noisier everywhere
  assert np.all(np.diff(shifted.alphas_cumprod) <= 0)
  zt = schedules.make("linear", rescale_betas_zero_snr=True)
  assert float(schedules.shift_snr_for_resolution(zt, 128).alphas_cumprod[-1]) == 0.0
  with pytest.raises(ValueError, match="positive"):
    schedules.shift_snr_for_resolution(base, 0)


def test_schedule_is_a_pytree():
  s = schedules.make("linear", 10)
  leaves, treedef = jax.tree_util.tree_flatten(s)
  assert len(leaves) == 7
  back = jax.tree_util.tree_unflatten(treedef, leaves)
  assert back.kind == "linear" and back.num_train_timesteps == 10
  doubled = jax.jit(lambda sch: sch.alphas_cumprod * 2)(s)
  np.testing.assert_allclose(doubled, 2 * s.alphas_cumprod)


def test_make_errors():
  with pytest.raises(KeyError, match="known"):
    schedules.make("sigmoid")
  with pytest.raises(ValueError, match="num_train_timesteps"):
    schedules.make("linear", 0)
  with pytest.raises(ValueError, match="beta"):
    schedules.from_betas(np.array([0.1, 1.5]))


def _real_config(**kw):
  """A real scheduler_config dict as diffusers writes it."""
  sch = diffusers.DDIMScheduler(**kw)
  return dict(sch.config), sch


def test_from_diffusers_config_round_trip():
  cfg, ref = _real_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type="v_prediction", timestep_spacing="trailing",
                          rescale_betas_zero_snr=True, clip_sample=False)
  cfg["_class_name"] = "DDIMScheduler"
  out = schedules.from_diffusers_config(cfg)
  np.testing.assert_allclose(out.schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6)
  assert out.prediction_type == "v_prediction"
  assert out.timestep_spacing == "trailing"
  assert out.clip_sample is False
  assert out.class_name == "DDIMScheduler"
  assert float(out.schedule.final_alpha_cumprod) == 1.0


def test_from_diffusers_config_sd14_pndm():
  # Stable Diffusion v1.4's scheduler/scheduler_config.json.
  cfg = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.7.0.dev0",
         "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
         "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
         "steps_offset": 1, "trained_betas": None, "clip_sample": False}
  out = schedules.from_diffusers_config(cfg)
  ref = diffusers.DDIMScheduler.from_config(cfg)
  np.testing.assert_array_equal(out.schedule.alphas_cumprod, ref.alphas_cumprod.numpy())
  assert out.steps_offset == 1 and out.prediction_type == "epsilon"
  # set_alpha_to_one=False: the clean end uses alpha_bar_0, as diffusers' final_alpha_cumprod.
  assert float(out.schedule.final_alpha_cumprod) == float(ref.final_alpha_cumprod)


def test_from_diffusers_config_trained_betas():
  betas = np.linspace(1e-4, 0.02, 50)
  out = schedules.from_diffusers_config({"trained_betas": betas.tolist(),
                                         "num_train_timesteps": 50})
  ref = diffusers.DDPMScheduler(num_train_timesteps=50, trained_betas=betas)
  np.testing.assert_allclose(out.schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-6)
  with pytest.raises(ValueError, match="trained_betas"):
    schedules.from_diffusers_config({"trained_betas": betas.tolist(), "num_train_timesteps": 10})


@pytest.mark.parametrize("key,value", [
    ("beta_schedule", "sigmoid"), ("thresholding", True), ("variance_type", "learned_range"),
    ("prediction_type", "flow"), ("timestep_spacing", "karras"), ("use_karras_sigmas", True),
    ("some_new_option", 3),
])
def test_from_diffusers_config_rejects(key, value):
  with pytest.raises(ValueError, match=key):
    schedules.from_diffusers_config({"beta_schedule": "linear", key: value})


def test_scheduler_config_is_frozen():
  out = schedules.from_diffusers_config({})
  with pytest.raises(dataclasses.FrozenInstanceError):
    out.prediction_type = "sample"
