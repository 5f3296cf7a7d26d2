"""Samplers: diffusers parity (timesteps, DDIM/DDPM steps and trajectories), oracle recovery for
every sampler, compile-once and ensembling. The paradigms built on them: test_paradigms.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dense_diffusion.diffusion import objectives, samplers, schedules

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PTS = ["epsilon", "v_prediction", "sample"]
SPACINGS = ["leading", "trailing", "linspace"]
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _nchw(x):
  return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def _nhwc(x):
  return x.numpy().transpose(0, 2, 3, 1)


def fake_torch(x, t):
  """A fixed nonlinear function of (x_t, t): the same maths as fake_jax."""
  c = torch.cos(t.to(torch.float32) / 300.0).reshape(-1, 1, 1, 1)
  return torch.tanh(0.9 * x + 0.1) * c + 0.05 * x


def fake_jax(x, t):
  c = jnp.cos(t.astype(jnp.float32) / 300.0).reshape(-1, 1, 1, 1)
  return jnp.tanh(0.9 * x + 0.1) * c + 0.05 * x


@pytest.fixture(scope="module")
def sd():
  return schedules.make("scaled_linear", 1000, 0.00085, 0.012)


@pytest.fixture(scope="module")
def x_start():
  return np.random.default_rng(0).standard_normal((2, 4, 4, 3)).astype(np.float32)


# --- timesteps --------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("n", [1, 3, 5, 10, 50, 999])
def test_ddim_timesteps_match_diffusers(spacing, offset, n):
  ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
  ref.set_timesteps(n)
  ours = samplers.ddim_timesteps(1000, n, spacing, offset)
  np.testing.assert_array_equal(ours, ref.timesteps.numpy())
  ddpm = diffusers.DDPMScheduler(timestep_spacing=spacing, steps_offset=offset)
  ddpm.set_timesteps(n)
  np.testing.assert_array_equal(ours, ddpm.timesteps.numpy())
  assert np.all(np.diff(ours) < 0)


def test_ddim_timesteps_errors():
  with pytest.raises(ValueError, match="num_inference_steps"):
    samplers.ddim_timesteps(1000, 0)
  with pytest.raises(ValueError, match="num_inference_steps"):
    samplers.ddim_timesteps(1000, 1001)
  with pytest.raises(ValueError, match="spacing"):
    samplers.ddim_timesteps(1000, 10, "karras")
  with pytest.raises(ValueError, match="steps_offset"):
    samplers.ddim_timesteps(1000, 1000, "leading", 1)
  with pytest.raises(KeyError, match="known"):
    samplers.prev_timesteps(np.array([5, 1]), 10, rule="previous")


def test_prev_timestep_rules():
  ts = samplers.ddim_timesteps(1000, 3, "trailing")
  np.testing.assert_array_equal(ts, [999, 666, 332])
  np.testing.assert_array_equal(samplers.prev_timesteps(ts, 1000), [666, 333, -1])
  np.testing.assert_array_equal(samplers.prev_timesteps(ts, 1000, rule="next"), [666, 332, -1])
  ts = samplers.ddim_timesteps(1000, 10, "leading", 1)
  np.testing.assert_array_equal(samplers.prev_timesteps(ts, 1000),
                                samplers.prev_timesteps(ts, 1000, rule="next"))


# --- single steps -----------------------------------------------------------------------------


@pytest.mark.parametrize("pt", PTS)
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_step_matches_diffusers(sd, x_start, pt, set_alpha_to_one):
  ref = diffusers.DDIMScheduler(**SD, prediction_type=pt, clip_sample=False,
                                set_alpha_to_one=set_alpha_to_one)
  ref.set_timesteps(10)
  sched = sd if set_alpha_to_one else schedules.from_diffusers_config(
      dict(ref.config)).schedule
  rng = np.random.default_rng(1)
  out = rng.standard_normal(x_start.shape).astype(np.float32)
  noise = rng.standard_normal(x_start.shape).astype(np.float32)
  for t, t_prev in [(900, 800), (0, -1)]:  # diffusers: prev = t - 1000 // 10
    for eta in [0.0, 0.5]:
      exp = ref.step(_nchw(out), t, _nchw(x_start), eta=eta,
                     variance_noise=_nchw(noise) if eta else None).prev_sample
      got = samplers.ddim_step(sched, out, t, t_prev, x_start, pt, eta=eta,
                               noise=noise if eta else None)
      np.testing.assert_allclose(got, _nhwc(exp), atol=1e-5, rtol=1e-5)
      got_arr = samplers.ddim_step(sched, out, jnp.full((2,), t), jnp.full((2,), t_prev),
                                   x_start, pt, eta=eta, noise=noise if eta else None)
      np.testing.assert_allclose(got_arr, got, atol=1e-6)
  with pytest.raises(ValueError, match="noise"):
    samplers.ddim_step(sd, out, 900, 800, x_start, pt, eta=0.5)


def _patch_ddpm_noise(monkeypatch, noises):
  """Makes diffusers' DDPMScheduler.step draw our noise, one array per call."""
  import diffusers.schedulers.scheduling_ddpm as ddpm_mod  # pylint: disable=import-outside-toplevel
  it = iter(noises)
  monkeypatch.setattr(ddpm_mod, "randn_tensor", lambda *a, **k: _nchw(next(it)))


@pytest.mark.parametrize("pt", PTS)
def test_ddpm_loop_matches_diffusers(sd, x_start, pt, monkeypatch):
  ref = diffusers.DDPMScheduler(**SD, prediction_type=pt, clip_sample=True)
  ref.set_timesteps(10)
  ts = samplers.ddim_timesteps(1000, 10, "leading")
  noise = np.random.default_rng(2).standard_normal((10,) + x_start.shape).astype(np.float32)
  _patch_ddpm_noise(monkeypatch, list(noise))
  x = _nchw(x_start)
  for t in ref.timesteps:
    x = ref.step(fake_torch(x, t.repeat(2)), t, x).prev_sample
  got = samplers.sample_ddpm(fake_jax, sd, jnp.asarray(x_start), ts, prediction_type=pt,
                             noise=jnp.asarray(noise), clip_sample=True)
  np.testing.assert_allclose(got, _nhwc(x), atol=1e-5, rtol=1e-5)
  # One step with injected noise, as a plain function.
  _patch_ddpm_noise(monkeypatch, [noise[0]])
  out = fake_jax(x_start, jnp.full((2,), 900))
  exp = ref.step(_nchw(out), 900, _nchw(x_start)).prev_sample
  got = samplers.ddpm_step(sd, out, 900, 800, x_start, pt, noise[0], clip_sample=True)
  np.testing.assert_allclose(got, _nhwc(exp), atol=1e-5)


def test_stochastic_samplers_draw_noise_from_key(sd, x_start):
  half = lambda x, t: 0.5 * x  # x0 = x_t / 2: the result carries the noise of earlier steps
  zero = lambda x, t: jnp.zeros_like(x)
  ts = samplers.ddim_timesteps(1000, 10, "leading")
  x = jnp.asarray(x_start)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  for run in [
      lambda k: samplers.sample_ddpm(half, sd, x, ts, prediction_type="sample", key=k),
      lambda k: samplers.sample_ddim(half, sd, x, ts, prediction_type="sample", eta=1.0, key=k,
                                     prev=samplers.prev_timesteps(ts, 1000, rule="next")),
  ]:
    a, b, c = np.asarray(run(k1)), np.asarray(run(k1)), np.asarray(run(k2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
  # Deterministic DDIM with x0 = 0 leaves exactly 0; eta as a numpy zero needs no noise.
  np.testing.assert_allclose(samplers.sample_ddim(zero, sd, x, ts, prediction_type="sample",
                                                  eta=np.float32(0.0)), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="key"):
    samplers.sample_ddpm(zero, sd, x, ts)
  with pytest.raises(ValueError, match="noise must have shape"):
    samplers.sample_ddpm(zero, sd, x, ts, noise=jnp.zeros((3,) + x.shape))


# --- full DDIM trajectories -------------------------------------------------------------------


def _diffusers_ddim(x, pt, spacing, n, eta, noise, clip):
  ref = diffusers.DDIMScheduler(**SD, prediction_type=pt, timestep_spacing=spacing,
                                clip_sample=clip, steps_offset=1 if spacing == "leading" else 0)
  ref.set_timesteps(n)
  xt = _nchw(x)
  for i, t in enumerate(ref.timesteps):
    xt = ref.step(fake_torch(xt, t.repeat(x.shape[0])), t, xt, eta=eta,
                  variance_noise=_nchw(noise[i]) if eta else None).prev_sample
  return _nhwc(xt)


@pytest.mark.parametrize("pt", PTS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n,eta", [(1, 0.0), (10, 0.0), (10, 0.7)])
def test_ddim_trajectory_matches_diffusers(sd, x_start, pt, spacing, n, eta):
  ts = samplers.ddim_timesteps(1000, n, spacing, 1 if spacing == "leading" else 0)
  noise = np.random.default_rng(3).standard_normal((len(ts),) + x_start.shape).astype(np.float32)
  clip = pt == "epsilon"  # keeps epsilon's x0 = (x - s eps) / a in a range where 1e-5 is absolute
  exp = _diffusers_ddim(x_start, pt, spacing, n, eta, noise, clip)
  got = samplers.sample_ddim(fake_jax, sd, jnp.asarray(x_start), ts, prediction_type=pt, eta=eta,
                             noise=jnp.asarray(noise) if eta else None, clip_sample=clip)
  np.testing.assert_allclose(got, exp, atol=1e-5, rtol=1e-5)


def test_ddim_trajectory_unclipped_epsilon_50_steps(sd, x_start):
  """No clipping: values reach ~40; agreement to 1e-5 relative to the trajectory's scale."""
  ts = samplers.ddim_timesteps(1000, 50, "trailing")
  exp = _diffusers_ddim(x_start, "epsilon", "trailing", 50, 0.0, None, False)
  got = np.asarray(samplers.sample_ddim(fake_jax, sd, jnp.asarray(x_start), ts))
  assert np.abs(exp).max() > 10
  assert np.abs(got - exp).max() / np.abs(exp).max() < 1e-5


def test_trailing_follows_diffusers_implicit_prev(sd, x_start):
  """trailing n=3: diffusers steps 666 -> 333 though its list says 332; we match diffusers by
  default, and the self-consistent 'next' rule measurably differs."""
  ts = samplers.ddim_timesteps(1000, 3, "trailing")
  exp = _diffusers_ddim(x_start, "v_prediction", "trailing", 3, 0.0, None, False)
  ours = samplers.sample_ddim(fake_jax, sd, jnp.asarray(x_start), ts,
                              prediction_type="v_prediction")
  np.testing.assert_allclose(ours, exp, atol=1e-5)
  nxt = samplers.sample_ddim(fake_jax, sd, jnp.asarray(x_start), ts,
                             samplers.prev_timesteps(ts, 1000, rule="next"),
                             prediction_type="v_prediction")
  assert np.abs(np.asarray(nxt) - exp).max() > 1e-4


# --- oracle recovery --------------------------------------------------------------------------


def _oracle(schedule, y, pt):
  """Returns the true output for the known target y at the actual x_t."""
  def model_fn(x_t, t):
    a = objectives.gather(schedule.sqrt_alphas_cumprod, t, x_t)
    s = objectives.gather(schedule.sqrt_one_minus_alphas_cumprod, t, x_t)
    eps = (x_t - a * y) / s
    return {"epsilon": eps, "sample": y, "v_prediction": a * eps - s * y}[pt]
  return model_fn


@pytest.fixture(scope="module")
def target():
  return jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)


@pytest.mark.parametrize("pt", PTS)
@pytest.mark.parametrize("n", [1, 5, 50])
def test_oracle_recovery_ddim_ddpm(sd, x_start, target, pt, n):
  model_fn = _oracle(sd, target, pt)
  key = jax.random.PRNGKey(0)
  ts = samplers.ddim_timesteps(1000, n, "trailing")
  for eta in ([0.0, 1.0] if n == 5 else [0.0]):  # eta > 0 once per type keeps compiles down
    got = samplers.sample_ddim(model_fn, sd, jnp.asarray(x_start), ts, prediction_type=pt,
                               eta=eta, key=key)
    np.testing.assert_allclose(got, target, atol=1e-4)
  ts = samplers.ddim_timesteps(1000, n, "leading")
  got = samplers.sample_ddpm(model_fn, sd, jnp.asarray(x_start), ts, prediction_type=pt, key=key)
  np.testing.assert_allclose(got, target, atol=1e-4)


@pytest.mark.parametrize("n", [1, 5, 50])
def test_oracle_recovery_dmp(sd, target, n):
  image = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, target.shape), jnp.float32)
  model_fn = _oracle(sd, target, "v_prediction")
  ts = samplers.ddim_timesteps(1000, n, "trailing")
  for oracle in [False, True]:
    got = samplers.sample_dmp(model_fn, sd, image, ts, oracle=oracle)
    np.testing.assert_allclose(got, target, atol=1e-4)


def test_dmp_starts_at_the_image_and_oracle_differs(sd, target):
  image = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, target.shape), jnp.float32)
  seen = []

  def model_fn(z, t):
    seen.append(None)
    return fake_jax(z, t)

  ts = samplers.ddim_timesteps(1000, 1, "trailing")
  got = samplers.sample_dmp(model_fn, sd, image, ts)
  a, s = float(sd.sqrt_alphas_cumprod[999]), float(sd.sqrt_one_minus_alphas_cumprod[999])
  np.testing.assert_allclose(got, a * image - s * fake_jax(image, jnp.full((2,), 999)), atol=1e-6)
  ts = samplers.ddim_timesteps(1000, 5, "trailing")
  plain = samplers.sample_dmp(model_fn, sd, image, ts)
  oracle = samplers.sample_dmp(model_fn, sd, image, ts, oracle=True)
  assert np.abs(np.asarray(plain) - np.asarray(oracle)).max() > 1e-3


def test_onestep_equals_x0_prediction(target):
  image = jnp.asarray(np.random.default_rng(8).uniform(-1, 1, target.shape), jnp.float32)
  ones = schedules.make("ones")
  sd = schedules.make("scaled_linear", 1000, 0.00085, 0.012)

  def model_fn(x, t):
    return jnp.tanh(x) * (t.astype(jnp.float32)[:, None, None, None] / 1000.0)

  got = samplers.sample_onestep(model_fn, ones, image, prediction_type="v_prediction")
  np.testing.assert_allclose(got, -model_fn(image, jnp.full((2,), 999)), atol=1e-7)
  got = samplers.sample_onestep(model_fn, sd, image, 500, prediction_type="sample")
  np.testing.assert_allclose(got, model_fn(image, jnp.full((2,), 500)), atol=1e-7)
  got = samplers.sample_onestep(model_fn, sd, image, 999, prediction_type="v_prediction")
  exp = objectives.pred_to_x0_eps(sd, model_fn(image, jnp.full((2,), 999)), image,
                                  jnp.full((2,), 999), "v_prediction")[0]
  np.testing.assert_allclose(got, exp, atol=1e-7)
  oracle = lambda x, t: objectives.onestep_target(sd, target, x, t, "v_prediction")
  np.testing.assert_allclose(samplers.sample_onestep(oracle, sd, image), target, atol=1e-5)


# --- compilation ------------------------------------------------------------------------------


def test_sampler_compiles_once_per_batch_shape_and_step_count(sd, x_start):
  traces = []

  def model_fn(x, t):
    traces.append(x.shape)  # runs at trace time only
    return fake_jax(x, t)

  x = jnp.asarray(x_start)
  for spacing in SPACINGS:  # same count (10), different timestep values
    samplers.sample_ddim(model_fn, sd, x, samplers.ddim_timesteps(1000, 10, spacing))
  samplers.sample_ddim(model_fn, sd, x + 1.0, samplers.ddim_timesteps(1000, 10, "leading", 1))
  assert len(traces) == 1
  samplers.sample_ddim(model_fn, sd, x, samplers.ddim_timesteps(1000, 20, "leading"))
  assert len(traces) == 2
  samplers.sample_ddim(model_fn, sd, jnp.concatenate([x, x]),
                       samplers.ddim_timesteps(1000, 20, "trailing"))
  assert len(traces) == 3
  # model_args are traced: new "parameters" do not recompile.
  def model_with_args(x, t, scale):
    traces.append("args")
    return fake_jax(x, t) * scale

  for scale in [1.0, 2.0, 3.0]:
    samplers.sample_dmp(model_with_args, sd, x, samplers.ddim_timesteps(1000, 5, "trailing"),
                        model_args=(jnp.float32(scale),))
  assert traces.count("args") == 1


# --- ensembling -------------------------------------------------------------------------------


def test_ensemble_recovers_depth_from_affine_copies():
  rng = np.random.default_rng(9)
  d = rng.uniform(0.0, 1.0, (2, 6, 6, 1)).astype(np.float32)
  # Non-crossing affine copies on [0, 1]: the median member is d itself; order scrambled.
  params = [(2.0, 1.0), (1.0, 0.0), (0.5, -1.0), (3.0, 4.5), (0.25, -2.0)]
  samples = jnp.stack([s * d + b for s, b in params])
  out = samplers.ensemble(samples, "depth_affine")
  np.testing.assert_allclose(out, d, atol=1e-5)
  # Crossing copies: the ensemble is still an exact affine function of d (affine-invariant depth).
  params = [(1.0, 0.0), (-0.3, 0.8), (2.0, -0.5), (0.7, 0.1)]
  out = np.asarray(samplers.ensemble(jnp.stack([s * d + b for s, b in params]), "depth_affine"))
  for b in range(2):
    design = np.stack([d[b].ravel(), np.ones(d[b].size)], 1)
    coef, *_ = np.linalg.lstsq(design, out[b].ravel(), rcond=None)
    assert np.abs(design @ coef - out[b].ravel()).max() < 1e-4
    assert coef[0] > 0.1


def test_ensemble_mean_and_errors():
  rng = np.random.default_rng(10)
  samples = rng.standard_normal((3, 2, 4, 4, 3)).astype(np.float32)
  np.testing.assert_allclose(samplers.ensemble(samples, "mean"), samples.mean(0), atol=1e-6)
  with pytest.raises(KeyError, match="known"):
    samplers.ensemble(samples, "median_of_means")


def test_align_affine_with_mask():
  rng = np.random.default_rng(11)
  ref = rng.uniform(0, 1, (2, 5, 5, 1)).astype(np.float32)
  pred = (ref - 0.3) / 2.5
  mask = np.ones_like(ref)
  mask[:, 0] = 0
  pred[:, 0] = 100.0  # outliers outside the mask must not affect the fit
  out = np.asarray(samplers.align_affine(jnp.asarray(pred), jnp.asarray(ref), mask))
  np.testing.assert_allclose(out[:, 1:], ref[:, 1:], atol=1e-5)


# --- LCM (diffusers' LCMScheduler) ------------------------------------------------------------


@pytest.mark.parametrize("n,original,total", [(1, 50, 1000), (2, 50, 1000), (4, 50, 1000),
                                              (7, 50, 1000), (50, 50, 1000), (3, 10, 1000),
                                              (4, 30, 500)])
def test_lcm_timesteps_match_diffusers(n, original, total):
  ref = diffusers.LCMScheduler(num_train_timesteps=total, original_inference_steps=original)
  ref.set_timesteps(n)
  np.testing.assert_array_equal(samplers.lcm_timesteps(total, n, original),
                                ref.timesteps.numpy())


def test_lcm_timesteps_errors():
  with pytest.raises(ValueError, match="num_inference_steps"):
    samplers.lcm_timesteps(1000, 51, 50)
  with pytest.raises(ValueError, match="original_inference_steps"):
    samplers.lcm_timesteps(1000, 4, 2000)


def _lcm_reference(pt, **kw):
  ref = diffusers.LCMScheduler(**SD, prediction_type=pt, **kw)
  return ref, schedules.from_diffusers_config(dict(ref.config))


@pytest.mark.parametrize("pt", PTS)
@pytest.mark.parametrize("clip", [False, True])
def test_lcm_step_matches_diffusers(x_start, pt, clip):
  ref, cfg = _lcm_reference(pt, clip_sample=clip, set_alpha_to_one=False, timestep_scaling=7.0)
  assert cfg.timestep_scaling == 7.0 and cfg.clip_sample == clip
  ref.set_timesteps(4)
  ts = ref.timesteps.numpy()
  rng = np.random.default_rng(12)
  out = rng.standard_normal(x_start.shape).astype(np.float32)
  noise = rng.standard_normal(x_start.shape).astype(np.float32)
  import diffusers.schedulers.scheduling_lcm as lcm_mod  # pylint: disable=import-outside-toplevel
  original = lcm_mod.randn_tensor
  lcm_mod.randn_tensor = lambda *a, **k: _nchw(noise)
  try:
    for i, t in enumerate(ts):
      exp = ref.step(_nchw(out), int(t), _nchw(x_start))
      t_next = ts[i + 1] if i + 1 < len(ts) else -1
      got, denoised = samplers.lcm_step(cfg.schedule, out, int(t), int(t_next), x_start, pt,
                                        noise=noise, timestep_scaling=7.0, clip_sample=clip,
                                        return_denoised=True)
      np.testing.assert_allclose(denoised, _nhwc(exp.denoised), atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(got, _nhwc(exp.prev_sample), atol=1e-5, rtol=1e-5)
  finally:
    lcm_mod.randn_tensor = original
  # The last step needs no noise; an earlier one does.
  samplers.lcm_step(cfg.schedule, out, int(ts[-1]), -1, x_start, pt)
  with pytest.raises(ValueError, match="noise"):
    samplers.lcm_step(cfg.schedule, out, int(ts[0]), int(ts[1]), x_start, pt)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [1, 4])
def test_lcm_trajectory_matches_diffusers_with_its_generator_noise(x_start, pt, n):
  ref, cfg = _lcm_reference(pt)
  ref.set_timesteps(n)
  generator = torch.Generator().manual_seed(5)
  xt = _nchw(x_start)
  for t in ref.timesteps:
    xt = ref.step(fake_torch(xt, t.repeat(2)), t, xt, generator=generator).prev_sample
  # diffusers draws one normal tensor per step but the last from the generator, in NCHW.
  generator = torch.Generator().manual_seed(5)
  draws = [_nhwc(torch.randn(_nchw(x_start).shape, generator=generator)) for _ in range(n - 1)]
  noise = jnp.asarray(np.stack(draws)) if draws else None
  ts = samplers.lcm_timesteps(1000, n)
  got = samplers.sample_lcm(fake_jax, cfg.schedule, jnp.asarray(x_start), ts, prediction_type=pt,
                            noise=noise)
  np.testing.assert_allclose(got, _nhwc(xt), atol=1e-5, rtol=1e-5)
  if n > 1:  # from a key instead: reproducible, different from diffusers' draws
    a = samplers.sample_lcm(fake_jax, cfg.schedule, jnp.asarray(x_start), ts,
                            prediction_type=pt, key=jax.random.PRNGKey(0))
    b = samplers.sample_lcm(fake_jax, cfg.schedule, jnp.asarray(x_start), ts,
                            prediction_type=pt, key=jax.random.PRNGKey(0))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="key"):
      samplers.sample_lcm(fake_jax, cfg.schedule, jnp.asarray(x_start), ts)
    with pytest.raises(ValueError, match="noise must have shape"):
      samplers.sample_lcm(fake_jax, cfg.schedule, jnp.asarray(x_start), ts,
                          noise=jnp.zeros((n,) + x_start.shape))


def test_lcm_scheduler_config_defaults_are_lcm_ones(tmp_path):
  """A saved LCMScheduler config reads with its own defaults (scaled_linear, no clipping) for the
  keys a hand-written file may leave out."""
  import json  # pylint: disable=import-outside-toplevel
  cfg = schedules.from_diffusers_config({"_class_name": "LCMScheduler",
                                         "original_inference_steps": 30})
  ref = diffusers.LCMScheduler(original_inference_steps=30)
  np.testing.assert_allclose(cfg.schedule.alphas_cumprod, ref.alphas_cumprod.numpy(), atol=1e-7)
  assert (cfg.clip_sample, cfg.original_inference_steps, cfg.timestep_scaling) == (False, 30, 10.0)
  ref.save_config(tmp_path)
  saved = json.loads((tmp_path / "scheduler_config.json").read_text())
  assert schedules.from_diffusers_config(saved).class_name == "LCMScheduler"
