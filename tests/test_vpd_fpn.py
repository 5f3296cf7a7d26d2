"""VPD as its paper built it: the Semantic FPN head (against a torch re-statement of mmseg's FPN
neck + FPNHead with the same weights), selected by `model.head.type`, trains in a tiny VPD
segmentation run; flip and sliding-window inference against hand-computed references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import vpd_depth
from configs import vpd_seg
from dense_diffusion import errors
from dense_diffusion import experiment
from dense_diffusion import paradigms
from dense_diffusion import tasks
from dense_diffusion.models import heads
from dense_diffusion.paradigms import backbone
from dense_diffusion.paradigms import test_time

torch = pytest.importorskip("torch")
F = torch.nn.functional

FPN = dict(fpn_width=16, head_width=8, norm_groups=4)  # a tiny Semantic FPN


def _conv(conv, x):
  """Our Conv2d's weights as torch's conv2d of NCHW x."""
  w = torch.from_numpy(np.array(conv.kernel[...]).transpose(3, 2, 0, 1))
  b = torch.from_numpy(np.array(conv.bias[...]))
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
                              torch.from_numpy(np.array(norm.scale[...])),
                              torch.from_numpy(np.array(norm.bias[...])), eps=norm.eps))
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
  out = np.asarray(nnx.jit(lambda h, f: h(f))(head, features))  # one compilation
  assert out.shape == (2, 32, 32, 5)
  np.testing.assert_allclose(out, _torch_semantic_fpn(head, features), atol=1e-5)


def test_semantic_fpn_shapes_and_axis_names():
  head = heads.SemanticFPNHead([12, 8, 6, 4], 7, upsample=8, **FPN, rngs=nnx.Rngs(0))
  # Level i is 3 - i halvings coarser than the finest: 3, 2, 1 stages, and 1 for the finest.
  assert [len(c) for c in head.stage_convs] == [3, 2, 1, 1]
  features = _features(np.random.default_rng(1), (12, 8, 6, 4), finest=8, batch=1)
  out = nnx.jit(lambda h, f: h(f))(head, features)  # one compilation
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


MIX = np.random.default_rng(5).normal(size=(3, 4)).astype(np.float32)  # RGB -> 4 "logits"


def _equivariant(image):
  """Per-pixel logits: commutes with mirroring."""
  return [jnp.asarray(image) @ MIX]


def _positional(image, mix=MIX):
  """Per-pixel logits plus a ramp over the input's own rows and columns: neither mirror- nor
  shift-equivariant, so flips and windows change its answer."""
  _, h, w, _ = image.shape
  k = mix.shape[1]
  ramp = (np.arange(h)[:, None, None] * np.linspace(-1, 1, k) * 0.3
          + np.arange(w)[None, :, None] * np.linspace(1, -1, k) * 0.2)
  return [jnp.asarray(image) @ mix + jnp.asarray(ramp, jnp.float32)]


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _image(h=10, w=13, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (2, h, w, 3)).astype(np.float32)


def test_flip_average_of_an_equivariant_model_is_the_plain_answer():
  image = _image()
  out, = test_time.flip_average(_equivariant, image, [test_time.mean_probabilities])
  plain = np.asarray(_equivariant(image)[0])
  np.testing.assert_allclose(_softmax(np.asarray(out)), _softmax(plain), atol=1e-6)
  np.testing.assert_array_equal(np.argmax(out, -1), np.argmax(plain, -1))


def test_flip_average_is_the_mean_of_the_two_passes_probabilities():
  image = _image()
  out, = test_time.flip_average(_positional, image, [test_time.mean_probabilities])
  plain = np.asarray(_positional(image)[0])
  mirrored = np.asarray(_positional(image[:, :, ::-1])[0])[:, :, ::-1]
  expected = 0.5 * (_softmax(plain) + _softmax(mirrored))
  assert np.abs(_softmax(plain) - expected).max() > 1e-2  # the stub is not equivariant
  np.testing.assert_allclose(np.exp(np.asarray(out)), expected, atol=1e-6)


@pytest.mark.parametrize("crop", [10, 13, 64])
def test_one_window_covering_the_image_is_the_plain_answer(crop):
  image = _image(10, 10)
  out, = test_time.sliding_window(_positional, image, crop, stride=5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(_positional(image)[0]))


def test_overlapping_windows_average_the_logits_over_each_pixels_windows():
  image = _image(10, 13)
  # mmseg's grid for crop 6, stride 4: rows 0, 4 (4 + 6 = 10); columns 0, 4, then 8 pushed
  # back to 7 to end at 13.
  rows, cols = [0, 4], [0, 4, 7]
  assert test_time.window_starts(10, 6, 4) == rows and test_time.window_starts(13, 6, 4) == cols
  total, count = np.zeros((2, 10, 13, 4)), np.zeros((10, 13, 1))
  for y in rows:
    for x in cols:
      total[:, y:y + 6, x:x + 6] += np.asarray(_positional(image[:, y:y + 6, x:x + 6])[0])
      count[y:y + 6, x:x + 6] += 1
  out, = test_time.sliding_window(_positional, image, 6, stride=4)
  np.testing.assert_allclose(np.asarray(out), total / count, atol=1e-5)
  assert count.max() == 4  # windows overlap in rows and columns


def _tiny_unet(config):
  """configs/vpd_seg.py's synthetic UNet cut to two levels (a third of the compile time)."""
  unet = dict(config.model.unet)
  unet.update(block_out_channels=[16, 32], down_block_types=["DownBlock2D",
                                                             "CrossAttnDownBlock2D"],
              up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"])
  config.model.unet = unet
  return config


MIX7 = np.random.default_rng(6).normal(size=(3, 7)).astype(np.float32)  # RGB -> 7 classes


def _vpd_over_stub_heads(**settings):
  """configs/vpd_seg.py's VPD paradigm (7 classes) with `settings`, its heads' outputs replaced
  by a position-dependent stub (the paradigm's inference around a network, without one)."""
  config = vpd_seg.get_config()
  cfg = paradigms.make_config(dict(config.diffusion), **settings)
  task = tasks.get("semantic", num_classes=7)
  paradigm = backbone.VPD(cfg, experiment.make_schedule(config), tasks=(task,))
  paradigm._head_outputs = lambda model, x, t, key: _positional(x, MIX7)  # pylint: disable=protected-access
  return paradigm, task


def test_vpd_inference_flips_and_slides_its_head_outputs():
  """VPD.predict with vpd_flip answers the argmax of the mean probabilities of the two passes;
  with 8-pixel windows every 4 pixels, the argmax of the windows' mean logits (numpy)."""
  image = _image(16, 16)
  task_ids = jnp.zeros((2,), jnp.int32)
  flip, task = _vpd_over_stub_heads(vpd_flip=True)
  palette = np.asarray(task.palette)
  plain = np.asarray(_positional(image, MIX7)[0])
  mirrored = np.asarray(_positional(image[:, :, ::-1], MIX7)[0])[:, :, ::-1]
  mean = 0.5 * (_softmax(plain) + _softmax(mirrored))
  assert np.any(np.argmax(mean, -1) != np.argmax(plain, -1))  # the flip changes answers
  answer = np.asarray(flip.predict(None, jnp.asarray(image), task_ids, jax.random.key(0)))
  np.testing.assert_array_equal(answer, palette[np.argmax(mean, -1) + 1])

  slide, _ = _vpd_over_stub_heads(vpd_slide_crop=8, vpd_slide_stride=4)
  total, count = np.zeros_like(plain), np.zeros((16, 16, 1))
  for y in (0, 4, 8):
    for x in (0, 4, 8):
      total[:, y:y + 8, x:x + 8] += np.asarray(_positional(image[:, y:y + 8, x:x + 8], MIX7)[0])
      count[y:y + 8, x:x + 8] += 1
  windows = total / count
  assert np.any(np.argmax(windows, -1) != np.argmax(plain, -1))  # so do the windows
  answer = np.asarray(slide.predict(None, jnp.asarray(image), task_ids, jax.random.key(0)))
  np.testing.assert_array_equal(answer, palette[np.argmax(windows, -1) + 1])


def test_inference_settings_are_checked():
  config = vpd_seg.get_config()
  config.diffusion.vpd_slide_crop = 16  # no stride
  with pytest.raises(errors.ConfigError, match="0 < stride <= crop"):
    experiment.Experiment(config, abstract=True)
  config = vpd_depth.get_config()
  config.diffusion.vpd_flip = True
  with pytest.raises(errors.ConfigError, match="kind \\['depth'\\] have no flip mean"):
    experiment.Experiment(config, abstract=True)


STEPS = 20


def test_semantic_fpn_trains_in_a_tiny_vpd_run():
  """20 steps on one fixed batch of block images (2-core VM, 2026-12-08, busy: ~35 s, most of it
  compiling): cross-entropy 1.95 -> 0.95."""
  config = _tiny_unet(vpd_seg.get_config("head=semantic_fpn"))
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
