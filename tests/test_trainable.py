"""Trainable sets (experiment/trainable.py): which parameters train is the config's, parts with no
pretrained value train by default next to LoRA adapters, a set that would leave them frozen is
refused, and a `main convert` folder serves as pretrained weights like the diffusers one.

The DMP test starts `configs/dmp.py` from a tiny diffusers UNet saved by diffusers, trains a few
steps, and compares the parameters with the ones before training and with the file's tensors."""
import re

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from configs import dmp  # noqa: E402
from dense_diffusion import errors  # noqa: E402
from dense_diffusion import experiment  # noqa: E402
from dense_diffusion.convert import command  # noqa: E402
from dense_diffusion.convert import common  # noqa: E402
from dense_diffusion.experiment import trainable as trainable_lib  # noqa: E402

RES = 16
UNET = dict(  # SD's layout at toy size: 4 latent channels in and out, no class embedding.
    sample_size=RES, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
TASKS = ("depth", "semantic")


@pytest.fixture(scope="module")
def sd_unet(tmp_path_factory):
  """A tiny diffusers UNet folder (random non-zero weights) and its tensors, torch layout."""
  root = tmp_path_factory.mktemp("sd_unet")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**UNET)
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
  unet.save_pretrained(root)
  return root, {k: v.numpy() for k, v in unet.state_dict().items()}


def _dmp_config(pretrained_unet=None):
  c = dmp.get_config(f"res={RES}")
  c.tasks = TASKS
  c.input.entries = [e for e in c.input.entries if e["task"] in TASKS]
  c.model.unet["num_class_embeds"] = len(TASKS)
  c.model.image_encoder = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, image_size=RES, patch_size=8)
  c.model.pretrained_unet = pretrained_unet and str(pretrained_unet)
  c.batch_size = 4
  c.total_steps = 4
  c.optimizer.warmup_steps = 1
  return c


def _flat(state) -> dict[str, np.ndarray]:
  return {trainable_lib.path_name(p): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
          for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def dmp_run(sd_unet):
  """configs/dmp.py on the tiny SD UNet: (experiment, parameters before, after 3 steps)."""
  root, _ = sd_unet
  exp = experiment.Experiment(_dmp_config(root))
  before = {**_flat(exp.state.params), **_flat(exp.frozen)}
  rng = np.random.default_rng(0)
  state = exp.state
  with jax.set_mesh(exp.mesh):
    for _ in range(3):
      batch = {"image": rng.uniform(-1, 1, (4, RES, RES, 3)).astype(np.float32),
               "target": rng.uniform(-1, 1, (4, RES, RES, 3)).astype(np.float32),
               "valid": np.ones((4, RES, RES, 1), bool),
               "task": np.array([0, 1, 0, 1], np.int32)}
      state, _ = exp.train_step(state, exp.frozen, exp.device_batch(batch))
  after = {**_flat(state.params), **_flat(exp.frozen)}
  return exp, before, after


def test_dmp_trains_the_fresh_parts_and_adapters_and_keeps_the_pretrained_kernels(
    sd_unet, dmp_run):
  _, tensors = sd_unet
  exp, before, after = dmp_run
  trained = exp.trainable.names
  # What the model adds on top of the checkpoint trains and moves ...
  fresh = ["unet/conv_in/kernel", "unet/conv_out/kernel", "unet/conv_out/bias",
           "unet/class_embedding/embedding", "task_embedding", "image_encoder/proj/kernel"]
  lora_ups = [n for n in trained if n.endswith("lora_up")]
  assert lora_ups
  for name in fresh + lora_ups:
    assert name in trained, name
    assert np.abs(after[name] - before[name]).max() > 0, name
  # ... and every kernel the checkpoint gave stays as the file has it (torch layout -> ours).
  pretrained = [n for n in before if n.startswith("unet/") and n not in fresh and "lora" not in n]
  assert len(pretrained) > 50
  assert not set(pretrained) & trained
  for name in pretrained:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  q = "unet/down_blocks/0/attentions/0/transformer_blocks/0/attn1/to_q/kernel"
  np.testing.assert_array_equal(
      after[q], tensors["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"].T)
  # conv_in: the widened kernel (answer + image = 6 input channels from SD's 4) trains.
  assert before["unet/conv_in/kernel"].shape == (3, 3, 6, 16)


def test_the_summary_counts_each_module(dmp_run):
  exp, before, _ = dmp_run
  summary = exp.trainable.summary()
  rows = {line.split()[0]: [int(x.replace(",", "")) for x in line.split()[1:]]
          for line in summary.splitlines()[2:]}
  sizes = {}
  for name, value in before.items():
    sizes.setdefault(name.split("/")[0], []).append(value.size)
  for module, values in sizes.items():
    trained, frozen, fresh, pretrained = rows[module]
    assert trained + frozen == sum(values) == fresh + pretrained, module
  assert rows["unet"][1] > 0 and rows["task_embedding"][1] == 0  # the base kernels are frozen.
  assert rows["total"][0] == sum(before[n].size for n in exp.trainable.names)


def test_fresh_parts_left_frozen_are_refused_unless_said(sd_unet):
  root, _ = sd_unet
  config = _dmp_config(root)
  config.model.trainable = ["lora"]  # the adapters alone: conv_in, conv_out, tokens stay random
  with pytest.raises(errors.ConfigError, match=re.escape(
      "allow_frozen_fresh=('image_encoder', 'task_embedding', 'unet')")):
    experiment.Experiment(config)
  config.model.allow_frozen_fresh = ["image_encoder", "task_embedding", "unet"]
  exp = experiment.Experiment(config)
  assert all(n.endswith(("lora_down", "lora_up")) for n in exp.trainable.names)


def test_selectors(sd_unet):
  root, _ = sd_unet
  config = _dmp_config(root)
  config.model.trainable = ["re:attn1/to_(q|k)/kernel$", "task_embedding", "unet/conv_in"]
  config.model.frozen = ["re:down_blocks"]
  config.model.allow_frozen_fresh = ["all"]
  names = experiment.Experiment(config).trainable.names
  assert "task_embedding" in names and "unet/conv_in/kernel" in names
  assert "unet/conv_in/bias" in names  # a path prefix takes the module's parameters
  assert "unet/up_blocks/1/attentions/0/transformer_blocks/0/attn1/to_q/kernel" in names
  assert not any("down_blocks" in n or "to_v" in n or "lora" in n for n in names)
  config.model.trainable = ["unets"]
  with pytest.raises(errors.ConfigError, match="'unets' matches no parameter; modules .*unet"):
    experiment.Experiment(config, abstract=True)
  config.model.trainable = ["re:("]
  with pytest.raises(errors.ConfigError, match="not a valid regex"):
    experiment.Experiment(config, abstract=True)


def test_a_main_convert_folder_is_pretrained_weights_too(sd_unet, dmp_run, tmp_path):
  root, _ = sd_unet
  command.run("diffusers", root, tmp_path / "converted")
  assert common.converted_dir(tmp_path / "converted", "unet") == tmp_path / "converted" / "unet"
  exp_diffusers, before, _ = dmp_run
  exp = experiment.Experiment(_dmp_config(tmp_path / "converted"))
  ours = {**_flat(exp.state.params), **_flat(exp.frozen)}
  assert exp.trainable.names == exp_diffusers.trainable.names
  for name, value in before.items():
    np.testing.assert_array_equal(ours[name], value, err_msg=name)
