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
