"""Times one UNet training step (forward, MSE, backward, AdamW) in our JAX code vs diffusers eager.

    .venv/bin/python bench/unet_step.py [--batch 4] [--res 32] [--channels 64,128] [--rounds 3]
        [--per_layer [all | matmul,conv,conv_low,groupnorm,resnet,attention,self_attn,
                      cross_attn,self_attn_low,ff,transformer]] [--layer_steps 2] [--no-whole_step]

Both sides use the same diffusers config, batch and resolution; JAX is jitted (timed after
warm-up, `block_until_ready`), PyTorch runs eager on CPU with torch.set_num_threads(nproc).
Rounds alternate JAX and PyTorch so that load from other processes hits both; the table shows
the median step time of each. XLA flags come from the environment (XLA_FLAGS). torch/diffusers
are imported here only (benchmark, not library code).

`--per_layer` adds a table of forward + backward (gradients of the parameters and the input) of
each layer kind the UNet is built from, ours against its torch / diffusers counterpart, at the
shapes it has in the benchmarked UNet, plus a plain float32 matmul as the ceiling reference.
Both sides of a row hold the same weights (torch's, loaded into ours) and take the same input
and output cotangent; the row's max abs differences of the output and the input gradient are
checked (relative 1e-3 of the torch values) before anything is timed.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dense_diffusion.convert import common as convert_common
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


# ------------------------------------------------------------------------------------------------
# Per-layer table (--per_layer).

_NCHW = (0, 3, 1, 2)  # our NHWC -> torch's NCHW (convolutions, norms, resnet blocks).
_HEADS_MAJOR = (0, 2, 1, 3)  # our [B, L, H, D] -> torch SDPA's [B, H, L, D].


def _to_torch(a, perm):
  """numpy array in our layout -> torch tensor; 4-D arrays are transposed by `perm`."""
  import torch
  if perm is not None and a.ndim == 4:
    a = a.transpose(perm)
  return torch.from_numpy(np.ascontiguousarray(a))


def _from_torch(t, perm):
  a = t.detach().numpy()
  return a.transpose(np.argsort(perm)) if perm is not None and a.ndim == 4 else a


def _max_diff(ours, ref, what):
  """max |ours - ref|; raises when it exceeds 1e-3 of max |ref| (float32 summation-order noise is
  ~1e-6 relative): a timing of two different computations would be worthless."""
  diff = float(np.max(np.abs(np.asarray(ours) - ref)))
  if diff > 1e-3 * float(np.max(np.abs(ref))) + 1e-6:
    raise AssertionError(f"{what}: JAX and torch disagree (max abs diff {diff:.3g}, "
                         f"max |torch| {float(np.max(np.abs(ref))):.3g})")
  return diff


def layer_pair(jax_fn: Callable, module: Optional[nnx.Module], torch_fn: Callable,
               torch_module, inputs, n_diff: int = 1, perm=None):
  """Forward + backward runners of one layer on both sides, and their agreement.

  jax_fn(module, *inputs) and torch_fn(*inputs) compute the layer; `torch_module` (or None) holds
  torch's parameters, which are copied into `module` first (`convert.common.load_into`, the
  checkpoint loader's own mapping). Gradients are taken w.r.t. all parameters and the first
  `n_diff` inputs (what a training step needs: the context of cross-attention needs none), with
  one fixed random output cotangent on both sides.

  Returns (jax_run, torch_run, max abs diff of the outputs, of the first input's gradients).
  """
  import torch
  rng = np.random.default_rng(1)
  if torch_module is not None:
    with torch.no_grad():  # non-trivial norm scales and biases, so the weight copy is checked.
      for t in torch_module.parameters():
        if t.ndim == 1:
          t.add_(0.1 * torch.randn_like(t))
    convert_common.load_into(module, {k: v.detach().numpy()
                                      for k, v in torch_module.state_dict().items()})

  # JAX: a pure function of (parameters, inputs) under jax.jit, so each call only dispatches.
  graphdef, state = nnx.split(module) if module is not None else (None, {})

  def apply(state, *xs):
    return jax_fn(nnx.merge(graphdef, state) if graphdef is not None else None, *xs)

  def loss(state, diff, rest, cot):  # <y, cot>: its gradient is the VJP of cot.
    return jnp.vdot(apply(state, *diff, *rest), cot)

  grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
  xs = [jnp.asarray(a) for a in inputs]
  diff, rest = xs[:n_diff], xs[n_diff:]
  y = np.asarray(jax.jit(apply)(state, *xs))
  cot_np = rng.standard_normal(y.shape).astype(np.float32)
  cot = jnp.asarray(cot_np)
  dx = np.asarray(grad(state, diff, rest, cot)[1][0])

  def jax_run():
    return jax.block_until_ready(grad(state, diff, rest, cot))

  # torch eager, as in a training step: fresh .grad each call (zero_grad(set_to_none=True)).
  ts = [_to_torch(a, perm) for a in inputs]
  for t in ts[:n_diff]:
    t.requires_grad_(True)
  params = list(torch_module.parameters()) if torch_module is not None else []
  tcot = _to_torch(cot_np, perm)

  def torch_run():
    for t in params + ts[:n_diff]:
      t.grad = None
    torch_fn(*ts).backward(tcot)

  y_ref = torch_fn(*ts)
  y_ref.backward(tcot)
  diff_y = _max_diff(y, _from_torch(y_ref, perm), "output")
  diff_dx = _max_diff(dx, _from_torch(ts[0].grad, perm), "input gradient")
  return jax_run, torch_run, diff_y, diff_dx


def layer_cases(args, channels):
  """{key: (layer, shape, build)} for each layer kind of the benchmarked UNet, at its shapes
  there; build() -> layer_pair(...) is called one row at a time (the attention rows hold GiBs)."""
  import diffusers.models.attention as d_attention
  import diffusers.models.attention_processor as d_processor
  import diffusers.models.resnet as d_resnet
  import torch
  import torch.nn.functional as F
  b, r, g = args.batch, args.res, args.groups
  c0, c1 = channels[0], channels[-1]
  r1 = r // 2 ** (len(channels) - 1)  # the deepest level (down blocks halve all but the last).
  heads, temb = args.heads, 4 * c0  # attention_head_dim is the head count (diffusers' quirk).
  rng = np.random.default_rng(0)
  rngs = lambda: nnx.Rngs(0)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  m, k, n = (int(v) for v in args.matmul.split(","))
  tokens, tokens1 = r * r, r1 * r1
  ctx = lambda: normal(b, args.ctx_len, args.cross_dim)
  impl = ("bench matmul" if args.attention == "matmul"
          else attention_lib.implementation_for(jnp.float32, tokens))

  def grad_mode(c, res):  # the kernel gradient Conv2d picks at this shape, for the row's label.
    # pylint: disable-next=protected-access
    return "matmul" if layers._use_matmul_grad((b, res, res, c), (3, 3, c, c), 1, 1) else "xla"

  def conv(c, res):
    tmod = torch.nn.Conv2d(c, c, 3, padding=1)
    return layer_pair(lambda mo, x: mo(x), layers.Conv2d(c, c, 3, padding=1, rngs=rngs()),
                      lambda x: tmod(x), tmod, [normal(b, res, res, c)], perm=_NCHW)

  def attn(c, cross):
    mod = unet_lib.Attention(c, heads=heads, dim_head=c // heads,
                             cross_attention_dim=args.cross_dim if cross else None, rngs=rngs())
    tmod = d_processor.Attention(c, heads=heads, dim_head=c // heads,
                                 cross_attention_dim=args.cross_dim if cross else None)
    res = r if c == c0 else r1
    x = normal(b, res * res, c)
    if cross:
      return layer_pair(lambda mo, x, e: mo(x, e), mod, lambda x, e: tmod(x, e), tmod, [x, ctx()])
    return layer_pair(lambda mo, x: mo(x), mod, lambda x: tmod(x), tmod, [x])

  def resnet():
    mod = layers.ResnetBlock2D(c0, c0, temb_channels=temb, groups=g, eps=1e-5, rngs=rngs())
    tmod = d_resnet.ResnetBlock2D(in_channels=c0, out_channels=c0, temb_channels=temb, groups=g,
                                  eps=1e-5)
    return layer_pair(lambda mo, x, e: mo(x, e), mod, lambda x, e: tmod(x, e), tmod,
                      [normal(b, r, r, c0), normal(b, temb)], n_diff=2, perm=_NCHW)

  def groupnorm():
    tmod = torch.nn.GroupNorm(g, c0, eps=1e-5)
    return layer_pair(lambda mo, x: mo(x), layers.GroupNorm(c0, g, eps=1e-5, rngs=rngs()),
                      lambda x: tmod(x), tmod, [normal(b, r, r, c0)], perm=_NCHW)

  def core():
    d = c0 // heads
    return layer_pair(lambda _, q, k_, v: attention_lib.attention(q, k_, v), None,
                      lambda q, k_, v: F.scaled_dot_product_attention(q, k_, v), None,
                      [normal(b, tokens, heads, d) for _ in range(3)], n_diff=3, perm=_HEADS_MAJOR)

  def ff():
    tmod = d_attention.FeedForward(c0, mult=4, activation_fn="geglu")
    return layer_pair(lambda mo, x: mo(x), unet_lib.FeedForward(c0, rngs=rngs()),
                      lambda x: tmod(x), tmod, [normal(b, tokens, c0)])

  def transformer():
    mod = unet_lib.BasicTransformerBlock(c0, heads=heads, dim_head=c0 // heads,
                                         cross_attention_dim=args.cross_dim, rngs=rngs())
    tmod = d_attention.BasicTransformerBlock(c0, heads, c0 // heads,
                                             cross_attention_dim=args.cross_dim,
                                             activation_fn="geglu")
    return layer_pair(lambda mo, x, e: mo(x, e), mod,
                      lambda x, e: tmod(x, encoder_hidden_states=e), tmod,
                      [normal(b, tokens, c0), ctx()])

  return {
      "matmul": ("float32 matmul (ceiling reference)", f"[{m},{k}] @ [{k},{n}]",
                 lambda: layer_pair(lambda _, x, w: x @ w, None, torch.matmul, None,
                                    [normal(m, k), normal(k, n)], n_diff=2)),
      "conv": (f"conv3x3 {c0}->{c0} ({grad_mode(c0, r)} kernel grad)", f"[{b},{r},{r},{c0}]",
               lambda: conv(c0, r)),
      "conv_low": (f"conv3x3 {c1}->{c1} ({grad_mode(c1, r1)} kernel grad)",
                   f"[{b},{r1},{r1},{c1}]", lambda: conv(c1, r1)),
      "groupnorm": (f"GroupNorm {g} groups", f"[{b},{r},{r},{c0}]", groupnorm),
      "resnet": (f"ResnetBlock2D {c0}->{c0} (2 GN, 2 conv3x3, temb {temb})",
                 f"[{b},{r},{r},{c0}]", resnet),
      "attention": (f"attention() [{impl}] vs torch SDPA", f"q,k,v [{b},{tokens},{heads},"
                    f"{c0 // heads}]", core),
      "self_attn": (f"self-attention (Attention, {heads} heads)", f"[{b},{tokens},{c0}]",
                    lambda: attn(c0, cross=False)),
      "cross_attn": (f"cross-attention (Attention, {heads} heads)",
                     f"[{b},{tokens},{c0}] x ctx [{b},{args.ctx_len},{args.cross_dim}]",
                     lambda: attn(c0, cross=True)),
      "self_attn_low": (f"self-attention (Attention, {heads} heads, mid block)",
                        f"[{b},{tokens1},{c1}]", lambda: attn(c1, cross=False)),
      "ff": (f"FeedForward GEGLU {c0}->{8 * c0}->{c0}", f"[{b},{tokens},{c0}]", ff),
      "transformer": ("BasicTransformerBlock (LN, self, cross, FF)",
                      f"[{b},{tokens},{c0}] x ctx [{b},{args.ctx_len},{args.cross_dim}]",
                      transformer),
  }


def per_layer_table(args, channels):
  import torch
  cases = layer_cases(args, channels)
  keys = list(cases) if args.per_layer == "all" else args.per_layer.split(",")
  unknown = sorted(set(keys) - set(cases))
  if unknown:
    raise SystemExit(f"--per_layer: unknown rows {unknown}; known: {list(cases)}")
  rows = []
  for key in keys:
    name, shape, build = cases[key]
    t0 = time.perf_counter()
    jax_run, torch_run, diff_y, diff_dx = build()  # compiles JAX, runs each side once.
    jax_run()  # warm-up
    torch_run()
    times = {"jax": [], "torch": []}
    for _ in range(args.rounds):
      times["jax"] += time_steps(jax_run, args.layer_steps)
      times["torch"] += time_steps(torch_run, args.layer_steps)
    med = {s: statistics.median(w for w, _ in v) for s, v in times.items()}
    rows.append((key, name, shape, med["jax"], med["torch"], diff_y, diff_dx, os.getloadavg()[0]))
    print(f"  {key}: jax {1e3 * med['jax']:.1f} ms, torch {1e3 * med['torch']:.1f} ms "
          f"({time.perf_counter() - t0:.0f} s with compile)", flush=True)
    del jax_run, torch_run
  print(f"\nPer layer, forward + backward (parameter and input gradients), batch {args.batch}, "
        f"{args.res}x{args.res}, channels {channels}; median of {args.rounds} x "
        f"{args.layer_steps} calls per side (rounds alternate), torch threads "
        f"{torch.get_num_threads()}; shapes in our layout (NHWC, tokens [B, L, C]); "
        f"conv_weight_grad={args.conv_weight_grad}, attention={args.attention}")
  print("| layer | input shape | JAX (ms) | torch eager (ms) | speed jax / torch | "
        "max abs diff out / input grad | load |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  for _, name, shape, tj, tt, dy, dx, load in rows:
    print(f"| {name} | {shape} | {1e3 * tj:.1f} | {1e3 * tt:.1f} | {tt / tj:.2f} | "
          f"{dy:.1e} / {dx:.1e} | {load:.1f} |")
  for key, _, _, tj, tt, *_ in rows:
    if key == "matmul":  # forward and the two gradient products: 3 x 2mkn FLOPs.
      m, k, n = (int(v) for v in args.matmul.split(","))
      gflop = 6 * m * k * n / 1e9
      print(f"\nmatmul fwd+bwd {gflop:.1f} GFLOP: JAX {gflop / tj:.0f} GFLOP/s, "
            f"torch {gflop / tt:.0f} GFLOP/s")


def whole_step_table(args, channels):
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
  p.add_argument("--whole_step", action=argparse.BooleanOptionalAction, default=True,
                 help="the whole-step table (--no-whole_step: only the per-layer table)")
  p.add_argument("--per_layer", nargs="?", const="all", default=None,
                 help="also the per-layer table: all rows, or a comma list of row keys "
                      "(module docstring)")
  p.add_argument("--layer_steps", type=int, default=2,
                 help="timed calls per side per round in the per-layer table")
  p.add_argument("--matmul", default="4096,1152,1024",
                 help="m,k,n of the per-layer table's reference matmul [m,k] @ [k,n]")
  args = p.parse_args()
  layers.set_conv_weight_grad(args.conv_weight_grad)
  if args.attention == "matmul":
    attention_lib.attention = _matmul_attention
  channels = [int(c) for c in args.channels.split(",")]
  if "torch" in args.which.split(",") or args.per_layer:
    import torch
    torch.set_num_threads(os.cpu_count())
  print(f"load average at start {os.getloadavg()[0]:.1f}", flush=True)
  if args.whole_step:
    whole_step_table(args, channels)
  if args.per_layer:
    per_layer_table(args, channels)


if __name__ == "__main__":
  main()
