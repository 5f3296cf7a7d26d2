"""Sampler loop cost: time per sample call and per step for a tiny JAX conv net.

Shows that the jitted scan compiles once per (batch shape, step count) and that its cost is
linear in the number of steps with no Python work per step; a Python loop over a jitted single
step is timed alongside for comparison.

  python bench/sampler.py [--batch 4] [--res 32] [--repeats 5]
"""
from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from dense_diffusion.diffusion import samplers, schedules


def init_params(key, channels=3, width=32):
  k1, k2, k3 = jax.random.split(key, 3)
  return {
      "w1": jax.random.normal(k1, (3, 3, channels, width)) * 0.1,
      "w2": jax.random.normal(k2, (3, 3, width, width)) * 0.05,
      "w3": jax.random.normal(k3, (3, 3, width, channels)) * 0.05,
      "temb": jnp.linspace(0.0, 1.0, width),
  }


def conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def tiny_net(x, t, params):
  """A 3-layer conv net with a sinusoidal-ish timestep bias: x f32[B,H,W,C], t int32[B]."""
  tb = jnp.sin(t.astype(jnp.float32)[:, None] / 1000.0 * params["temb"][None] * 10.0)
  h = jax.nn.silu(conv(x, params["w1"]) + tb[:, None, None, :])
  h = jax.nn.silu(conv(h, params["w2"]))
  return conv(h, params["w3"])


def timed(fn, repeats):
  """Best of `repeats` (the machine is shared; the minimum is the least disturbed run)."""
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return min(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--res", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  schedule = jax.device_put(schedules.make("scaled_linear", 1000, 0.00085, 0.012))  # tables on the device once
  params = init_params(jax.random.PRNGKey(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (args.batch, args.res, args.res, 3))
  traces = []

  def model_fn(x_t, t, p):
    traces.append(1)
    return tiny_net(x_t, t, p)

  step_jit = jax.jit(lambda s, xt, t, tp, p: samplers.ddim_step(
      s, tiny_net(xt, jnp.full((xt.shape[0],), t, jnp.int32), p), t, tp, xt, "epsilon"))

  print(f"# {platform.processor() or platform.machine()}, {jax.devices()[0].device_kind}, "
        f"jax {jax.__version__}, batch {args.batch}, {args.res}x{args.res}x3, "
        f"best of {args.repeats}")
  print("| sampler | steps | compile s | ms / call | ms / step | python-loop ms / step |")
  print("| --- | ---: | ---: | ---: | ---: | ---: |")
  fit = {}
  for n in (1, 10, 50):
    ts = samplers.ddim_timesteps(1000, n, "trailing")
    prev = samplers.prev_timesteps(ts, 1000)
    before = len(traces)
    t0 = time.perf_counter()
    jax.block_until_ready(samplers.sample_ddim(model_fn, schedule, x, ts, prev,
                                               model_args=(params,)))
    compile_s = time.perf_counter() - t0
    call = timed(lambda: samplers.sample_ddim(model_fn, schedule, x, ts, prev,
                                              model_args=(params,)), args.repeats)
    assert len(traces) == before + 1, "the sampler re-traced for the same shapes"

    def python_loop():
      xt = x
      for t, tp in zip(ts.tolist(), prev.tolist()):
        xt = step_jit(schedule, xt, jnp.int32(t), jnp.int32(tp), params)
      return xt

    loop = timed(python_loop, args.repeats)
    fit[n] = (call, loop)
    print(f"| ddim (scan) | {n} | {compile_s:.2f} | {call * 1e3:.2f} | {call / n * 1e3:.3f} | "
          f"{loop / n * 1e3:.3f} |")
  steps = np.array(sorted(fit), np.float64)
  for col, name in ((0, "ddim scan"), (1, "python loop")):
    slope, intercept = np.polyfit(steps, [fit[n][col] for n in sorted(fit)], 1)
    print(f"{name}: least-squares fit time = {intercept * 1e3:.2f} ms + "
          f"{slope * 1e3:.3f} ms x steps")
  for n in (1, 10, 50):
    ts = samplers.ddim_timesteps(1000, n, "trailing")
    call = timed(lambda: samplers.sample_dmp(model_fn, schedule, x, ts, model_args=(params,)),
                 args.repeats)
    print(f"| dmp (scan) | {n} | - | {call * 1e3:.2f} | {call / n * 1e3:.3f} | - |")
  print(f"traces of model_fn: {len(traces)} (one per sampler x step count)")
  np.testing.assert_equal(len(traces), 6)


if __name__ == "__main__":
  main()
