"""Times one UNet training step (forward, MSE, backward, AdamW) in our JAX code vs diffusers eager.

    .venv/bin/python bench/unet_step.py [--batch 4] [--res 32] [--channels 64,128] [--rounds 3]

Both sides use the same diffusers config, batch and resolution; JAX is jitted (timed after
warm-up, `block_until_ready`), PyTorch runs eager on CPU with torch.set_num_threads(nproc).
Rounds alternate JAX and PyTorch so that load from other processes hits both; the table shows
the median step time of each. XLA flags come from the environment (XLA_FLAGS). torch/diffusers
are imported here only (benchmark, not library code).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dense_diffusion.models import attention as attention_lib
from dense_diffusion.models import layers
from dense_diffusion.models import unet as unet_lib


def _matmul_attention(query, key, value, *, mask=None, is_causal=False, scale=None, **_):
  """softmax(q k^T * scale) v with heads-major batched matmuls (no mask support: UNet only)."""
  del mask, is_causal
  scale = query.shape[-1] ** -0.5 if scale is None else scale
  q, k, v = (jnp.swapaxes(t, 1, 2) for t in (query, key.astype(query.dtype),
                                             value.astype(query.dtype)))
  logits = jnp.matmul(q * scale, jnp.swapaxes(k, -1, -2))
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
  return jnp.swapaxes(jnp.matmul(probs, v), 1, 2)


def make_config(channels, layers, heads, cross_dim, groups):
  n = len(channels)
  return dict(
      in_channels=4, out_channels=4, block_out_channels=tuple(channels),
      down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
      layers_per_block=layers, cross_attention_dim=cross_dim, attention_head_dim=heads,
      norm_num_groups=groups)


def random_unet(config, seed=0, dtype=None):
  model = nnx.eval_shape(lambda: unet_lib.UNet(config, dtype=dtype, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  flat = []
  for path, var in nnx.to_flat_state(nnx.state(model)):
    shape = var.get_value().shape
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 10
    value = (1.0 + 0.0 * rng.standard_normal(shape) if path[-1] == "scale"
             else rng.standard_normal(shape) / np.sqrt(fan_in))
    flat.append((path, var.replace(jnp.asarray(value, jnp.float32))))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def jax_stepper(config, x, t, ctx, target, dtype=None):
  model = random_unet(config, dtype=dtype)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, t, ctx, target):
    def loss_fn(m):
      return jnp.mean((m(x, t, ctx) - target) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  args = [jnp.asarray(a) for a in (x, t, ctx, target)]

  def run():
    return step(model, optimizer, *args).block_until_ready()

  return run


def torch_stepper(config, x, t, ctx, target):
  import diffusers
  import torch
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**config).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  xs = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  ts, cs = torch.from_numpy(t), torch.from_numpy(ctx)
  tg = torch.from_numpy(target).permute(0, 3, 1, 2).contiguous()

  def run():
    opt.zero_grad(set_to_none=True)
    loss = torch.mean((model(xs, ts, cs).sample - tg) ** 2)
    loss.backward()
    opt.step()
    return float(loss)

  return run


def time_steps(fn, steps):
  """[(wall seconds, process CPU seconds)] per step."""
  times = []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    times.append((time.perf_counter() - t0, time.process_time() - c0))
  return times


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--res", type=int, default=32)
  p.add_argument("--channels", default="64,128")
  p.add_argument("--layers", type=int, default=1)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--cross_dim", type=int, default=64)
  p.add_argument("--groups", type=int, default=32)
  p.add_argument("--ctx_len", type=int, default=8)
  p.add_argument("--steps", type=int, default=5, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--which", default="jax,torch")
  p.add_argument("--conv_weight_grad", default="auto", help="auto | xla | matmul (models.layers)")
  p.add_argument("--attention", default="library",
                 help="library (models.attention) | matmul (bench-only einsum/softmax stand-in, "
                      "to measure what the attention backend costs on CPU)")
  args = p.parse_args()
  layers.set_conv_weight_grad(args.conv_weight_grad)
  if args.attention == "matmul":
    attention_lib.attention = _matmul_attention
  channels = [int(c) for c in args.channels.split(",")]
  config = make_config(channels, args.layers, args.heads, args.cross_dim, args.groups)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.batch, args.res, args.res, 4)).astype(np.float32)
  t = rng.integers(0, 1000, (args.batch,)).astype(np.float32)
  ctx = rng.standard_normal((args.batch, args.ctx_len, args.cross_dim)).astype(np.float32)
  target = rng.standard_normal(x.shape).astype(np.float32)

  which = args.which.split(",")
  runners = {}
  if "jax" in which:
    t0 = time.perf_counter()
    runners["jax (jit)"] = jax_stepper(config, x, t, ctx, target)
    runners["jax (jit)"]()
    print(f"jax compile + first step: {time.perf_counter() - t0:.1f} s")
  if "torch" in which:
    import torch
    torch.set_num_threads(os.cpu_count())
    runners["torch eager"] = torch_stepper(config, x, t, ctx, target)
  for fn in runners.values():  # warm-up
    fn()
  times = {k: [] for k in runners}
  for _ in range(args.rounds):
    for k, fn in runners.items():
      times[k] += time_steps(fn, args.steps)
  med = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
  cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
  print(f"\nUNet training step, batch {args.batch}, {args.res}x{args.res}x4, channels {channels}, "
        f"layers_per_block {args.layers}, {jax.device_count()} x {jax.devices()[0].platform}, "
        f"{os.cpu_count()} cores, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"conv_weight_grad={args.conv_weight_grad}, attention={args.attention}")
  print(f"load average {os.getloadavg()[0]:.1f} (other processes slow both sides)")
  print("| implementation | median step (ms) | min (ms) | median CPU time (ms) | steps/s |")
  print("| --- | --- | --- | --- | --- |")
  for k, v in times.items():
    print(f"| {k} | {1e3 * med[k]:.1f} | {1e3 * min(w for w, _ in v):.1f} | "
          f"{1e3 * cpu[k]:.1f} | {1 / med[k]:.2f} |")
  if len(med) == 2:
    ratio = med["torch eager"] / med["jax (jit)"]
    print(f"\nspeed ratio jax / torch (>1 = jax faster): {ratio:.2f}")


if __name__ == "__main__":
  main()
