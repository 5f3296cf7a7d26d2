"""Objectives: forward process and targets vs diffusers, conversions, min-SNR, DMP, one-step."""
import jax.numpy as jnp
import numpy as np
import pytest

from dense_diffusion.diffusion import objectives, schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PTS = ["epsilon", "v_prediction", "sample"]


def _nchw(x):
  return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def _nhwc(x):
  return x.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (4, 5, 6, 3)).astype(np.float32)
  noise = rng.standard_normal((4, 5, 6, 3)).astype(np.float32)
  t = np.array([0, 10, 500, 999], np.int32)
  return x0, noise, t


@pytest.fixture(scope="module")
def sd():
  return schedules.make("scaled_linear", 1000, 0.00085, 0.012)


def test_q_sample_and_velocity_match_diffusers(data, sd):
  x0, noise, t = data
  ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012)
  tt = torch.tensor(t, dtype=torch.long)
  expected = _nhwc(ref.add_noise(_nchw(x0), _nchw(noise), tt))
  np.testing.assert_allclose(objectives.q_sample(sd, x0, t, noise), expected, atol=1e-6)
  v_ref = _nhwc(ref.get_velocity(_nchw(x0), _nchw(noise), tt))
  np.testing.assert_allclose(objectives.target(sd, x0, noise, t, "v_prediction"), v_ref,
                             atol=1e-6)
  np.testing.assert_array_equal(objectives.target(sd, x0, noise, t, "epsilon"), noise)
  np.testing.assert_array_equal(objectives.target(sd, x0, noise, t, "sample"), x0)


@pytest.mark.parametrize("pt", PTS)
def test_pred_to_x0_eps_inverts_targets(data, sd, pt):
  x0, noise, t = data
  t = np.array([1, 10, 500, 990], np.int32)  # avoid sample-prediction at alpha_bar ~ 1
  x_t = objectives.q_sample(sd, x0, t, noise)
  pred = objectives.target(sd, x0, noise, t, pt)
  x0_hat, eps_hat = objectives.pred_to_x0_eps(sd, pred, x_t, t, pt)
  np.testing.assert_allclose(x0_hat, x0, atol=1e-4)
  np.testing.assert_allclose(eps_hat, noise, atol=2e-3 if pt == "sample" else 1e-4)
  for other in PTS:
    np.testing.assert_allclose(objectives.convert(sd, pred, x_t, t, pt, other),
                               objectives.target(sd, x0, noise, t, other), atol=2e-3)


def test_bad_prediction_type(data, sd):
  x0, noise, t = data
  with pytest.raises(ValueError, match="prediction_type"):
    objectives.target(sd, x0, noise, t, "eps")
  with pytest.raises(KeyError, match="known"):
    objectives.loss_weight(sd, t, "epsilon", "p2")


def test_min_snr_weights_equal_formula():
  s = schedules.make("linear", 1000, 1e-4, 0.02)
  ac = diffusers.DDPMScheduler().alphas_cumprod.numpy().astype(np.float64)
  t = np.arange(0, 1000, 7, dtype=np.int32)
  snr = ac[t] / (1 - ac[t])
  gamma = 5.0
  expected = {"epsilon": np.minimum(snr, gamma) / snr,
              "v_prediction": np.minimum(snr, gamma) / (snr + 1),
              "sample": np.minimum(snr, gamma)}
  for pt, exp in expected.items():
    w = objectives.loss_weight(s, t, pt, "min_snr", gamma)
    np.testing.assert_allclose(w, exp, rtol=1e-4)
    np.testing.assert_array_equal(objectives.loss_weight(s, t, pt, "none"), 1.0)


def test_min_snr_is_the_same_x0_weighting_for_every_parameterisation(data, sd):
  """weight_p * ||p - p_hat||^2 == min(SNR, gamma) * ||x0 - x0_hat||^2 for each p."""
  x0, noise, _ = data
  t = np.array([3, 100, 600, 950], np.int32)
  x_t = objectives.q_sample(sd, x0, t, noise)
  rng = np.random.default_rng(1)
  x0_hat = x0 + 0.1 * rng.standard_normal(x0.shape).astype(np.float32)
  eps_hat = objectives.convert(sd, x0_hat, x_t, t, "sample", "epsilon")
  snr = np.asarray(objectives.snr(sd, t), np.float64)
  x0_term = np.minimum(snr, 5.0) * np.mean((x0 - x0_hat) ** 2, axis=(1, 2, 3))
  for pt in PTS:
    pred = eps_hat if pt == "epsilon" else objectives.convert(sd, x0_hat, x_t, t, "sample", pt)
    err = np.mean((np.asarray(objectives.target(sd, x0, noise, t, pt)) - np.asarray(pred)) ** 2,
                  axis=(1, 2, 3))
    w = np.asarray(objectives.loss_weight(sd, t, pt, "min_snr", 5.0))
    np.testing.assert_allclose(w * err, x0_term, rtol=2e-2)


def test_min_snr_zero_terminal_snr_is_finite():
  s = schedules.make("scaled_linear", 1000, 0.00085, 0.012, rescale_betas_zero_snr=True)
  t = np.array([998, 999], np.int32)
  for pt in PTS:
    w = np.asarray(objectives.loss_weight(s, t, pt, "min_snr"))
    assert np.all(np.isfinite(w))
  assert float(objectives.loss_weight(s, t, "epsilon", "min_snr")[1]) == 1.0
  assert float(objectives.loss_weight(s, t, "sample", "min_snr")[1]) == 0.0


def test_diffusion_loss():
  rng = np.random.default_rng(2)
  pred = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  tgt = rng.standard_normal((3, 4, 4, 2)).astype(np.float32)
  w = np.array([1.0, 0.5, 2.0], np.float32)
  per = ((pred - tgt) ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(objectives.diffusion_loss(pred, tgt), per.mean(), rtol=1e-6)
  np.testing.assert_allclose(objectives.diffusion_loss(pred, tgt, w), (per * w).mean(), rtol=1e-6)
  mask = np.zeros((3, 4, 4, 1), np.float32)
  mask[:, :2] = 1
  per_m = ((pred - tgt)[:, :2] ** 2).reshape(3, -1).mean(1)
  np.testing.assert_allclose(objectives.diffusion_loss(pred, tgt, mask=mask), per_m.mean(),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="shapes"):
    objectives.diffusion_loss(pred, tgt[..., :1])


def test_dmp_process_goes_from_target_to_image(sd):
  rng = np.random.default_rng(3)
  y = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  x = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  ac = np.asarray(sd.alphas_cumprod, np.float64)
  z0 = np.asarray(objectives.dmp_forward(sd, y, x, np.zeros(2, np.int32)))
  zt = np.asarray(objectives.dmp_forward(sd, y, x, np.full(2, 999, np.int32)))
  # z_0 ~ y and z_{T-1} ~ x, with the bounds given by the schedule's end points.
  assert np.abs(z0 - y).max() <= (1 - np.sqrt(ac[0])) + np.sqrt(1 - ac[0]) + 1e-6
  assert np.abs(zt - x).max() <= np.sqrt(ac[-1]) + (1 - np.sqrt(1 - ac[-1])) + 1e-6
  assert np.abs(z0 - y).max() < 0.05 and np.abs(zt - x).max() < 0.08
  t = np.array([5, 700], np.int32)
  a, s = np.sqrt(ac[t])[:, None, None, None], np.sqrt(1 - ac[t])[:, None, None, None]
  np.testing.assert_allclose(objectives.dmp_forward(sd, y, x, t), a * y + s * x, atol=1e-6)
  v = objectives.dmp_v_target(sd, y, x, t)
  np.testing.assert_allclose(v, a * x - s * y, atol=1e-6)
  y_hat, x_hat = objectives.pred_to_x0_eps(sd, v, objectives.dmp_forward(sd, y, x, t), t,
                                           "v_prediction")
  np.testing.assert_allclose(y_hat, y, atol=1e-5)
  np.testing.assert_allclose(x_hat, x, atol=1e-5)


def test_onestep_targets(sd):
  rng = np.random.default_rng(4)
  y = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  x = rng.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
  ones = schedules.make("ones")
  t = np.full(2, 999, np.int32)
  # GenPercept: alpha_bar = 0, the noisy input is the image and the v-target is -y.
  np.testing.assert_array_equal(objectives.q_sample(ones, y, t, x), x)
  np.testing.assert_allclose(objectives.onestep_target(ones, y, x, t, "v_prediction"), -y,
                             atol=1e-7)
  np.testing.assert_allclose(objectives.onestep_x0(ones, -y, x, t, "v_prediction"), y, atol=1e-7)
  # Lotus: x0-prediction at T-1, target y.
  np.testing.assert_array_equal(objectives.onestep_target(sd, y, x, t, "sample"), y)
  # v at alpha_bar > 0: the target whose implied x0 (with x_t = image) is y.
  v = objectives.onestep_target(sd, y, x, t, "v_prediction")
  a, s = float(sd.sqrt_alphas_cumprod[999]), float(sd.sqrt_one_minus_alphas_cumprod[999])
  np.testing.assert_allclose(v, (a * x - y) / s, atol=1e-6)
  np.testing.assert_allclose(objectives.onestep_x0(sd, v, x, t, "v_prediction"), y, atol=1e-6)
  with pytest.raises(ValueError, match="one-step"):
    objectives.onestep_target(sd, y, x, t, "epsilon")


def test_scalar_and_batched_t_agree(data, sd):
  x0, noise, _ = data
  a = objectives.q_sample(sd, x0, 300, noise)
  b = objectives.q_sample(sd, x0, jnp.full((4,), 300, jnp.int32), noise)
  np.testing.assert_array_equal(a, b)
