"""diffusers / peft LoRA files (convert/lora.py): our adapters exported load into diffusers'
UNet2DConditionModel with `load_lora_adapter` and give our outputs; LoRAs made and saved by
diffusers / peft load onto our UNet and give diffusers' outputs; folding gives a plain UNet with
the same outputs; a file for another UNet is one clear error."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from configs import tiny  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

from dense_diffusion import checkpointing  # noqa: E402
from dense_diffusion import errors  # noqa: E402
from dense_diffusion import experiment  # noqa: E402
from dense_diffusion import main as cli  # noqa: E402
from dense_diffusion.convert import command  # noqa: E402
from dense_diffusion.convert import common  # noqa: E402
from dense_diffusion.convert import load_diffusers_unet  # noqa: E402
from dense_diffusion.convert import lora as lora_convert  # noqa: E402
from dense_diffusion.models import lora as lora_lib  # noqa: E402
from dense_diffusion.models import unet as unet_lib  # noqa: E402

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
ATOL = 1e-4

# Our adapters, as if trained: (pattern, rank, alpha). Several ranks and alphas (the file's
# rank_pattern / alpha_pattern), dense and conv layers (3x3, 1x1, strided).
OUR_LORA = (
    (lora_lib.DEFAULT_PATTERN, 2, 4.0),  # attention q/k/v/out: scale 2
    (r"resnets\.\d+\.conv1$", 3, 1.5),  # 3x3 convs: scale 0.5
    (r"downsamplers\.0\.conv$", 2, 3.0),  # stride-2 conv
    (r"attentions\.\d+\.proj_in$", 2, 4.0),  # 1x1 conv
    (r"time_emb_proj$", 1, 0.75),  # dense
)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny diffusers UNet folder with random non-zero weights, and inputs (NHWC numpy)."""
  root = tmp_path_factory.mktemp("unet")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**UNET)
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))  # non-zero everywhere (diffusers zero-inits some).
  unet.save_pretrained(root)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([10.0, 500.0], np.float32)
  ctx = rng.standard_normal((2, 3, 8)).astype(np.float32)
  return root, (x, t, ctx)


def _diffusers_unet(root):
  return diffusers.UNet2DConditionModel.from_pretrained(root).eval()


def _torch_out(unet, inputs):
  x, t, ctx = inputs
  with torch.no_grad():
    out = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
               torch.from_numpy(ctx)).sample
  return out.permute(0, 2, 3, 1).numpy()


@nnx.jit
def _apply(model, x, t, ctx):
  return model(x, t, ctx)


def _ours_out(model, inputs):
  return np.asarray(_apply(model, *inputs))


def _adapted(model):
  return {p: layer for p, layer in lora_lib.lora_layers(model, "") if layer.lora_down is not None}


@pytest.fixture(scope="module")
def trained(base):
  """Our UNet with adapters given non-zero values (as if trained), its outputs, its file."""
  root, inputs = base
  model = load_diffusers_unet(root)
  plain_out = _ours_out(model, inputs)
  rngs = nnx.Rngs(1)
  for pattern, rank, alpha in OUR_LORA:
    lora_lib.apply_lora(model, pattern, rank=rank, alpha=alpha, rngs=rngs)
  rng = np.random.default_rng(2)
  for layer in _adapted(model).values():
    shape = layer.lora_up.get_value().shape
    layer.lora_up.set_value(jnp.asarray(0.3 * rng.standard_normal(shape), jnp.float32))
  out = _ours_out(model, inputs)
  assert np.abs(out - plain_out).max() > 1e-2  # the adapters matter
  path = lora_convert.save_diffusers_lora(model, root.parent / "ours" / "lora.safetensors")
  return dict(model=model, out=out, plain_out=plain_out, path=path)


def test_export_loads_into_diffusers_with_load_lora_adapter(base, trained):
  root, inputs = base
  path = trained["path"]
  model = trained["model"]
  n = len(_adapted(model))
  assert n == 32 + 8 + 1 + 4 + 8  # attention, conv1, downsampler, proj_in, time_emb_proj
  with open(path, "rb") as f:  # the file: unet.<path>.lora_A/B.weight, metadata with the config
    header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
  config = json.loads(header["__metadata__"][lora_convert.METADATA_KEY])
  # Every scale is in lora_B and alpha = r, so a loader that ignores the metadata agrees.
  assert config["unet.r"] == 2 and config["unet.lora_alpha"] == 2
  assert config["unet.rank_pattern"]["^mid_block\\.resnets\\.0\\.conv1"] == 3
  assert config["unet.alpha_pattern"]["^mid_block\\.resnets\\.0\\.conv1"] == 3
  q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  assert header[f"unet.{q}.lora_A.weight"]["shape"] == [2, 16]
  assert header[f"unet.{q}.lora_B.weight"]["shape"] == [16, 2]
  assert header["unet.mid_block.resnets.0.conv1.lora_A.weight"]["shape"] == [3, 32, 3, 3]
  assert header["unet.mid_block.resnets.0.conv1.lora_B.weight"]["shape"] == [32, 3, 1, 1]

  unet = _diffusers_unet(root)
  unet.load_lora_adapter(str(path), prefix="unet")
  peft_layers = {name: m for name, m in unet.named_modules()
                 if isinstance(m, peft.tuners.lora.LoraLayer)}
  assert sorted(peft_layers) == sorted(_adapted(model))
  assert all(list(m.scaling.values()) == [1.0] for m in peft_layers.values())
  np.testing.assert_allclose(_torch_out(unet, inputs), trained["out"], atol=ATOL, rtol=0)

  # A pipeline's load_lora_weights: lora_state_dict + load_lora_into_unet.
  pipe_cls = diffusers.StableDiffusionPipeline
  state, alphas, metadata = pipe_cls.lora_state_dict(str(path), return_lora_metadata=True)
  unet2 = _diffusers_unet(root)
  pipe_cls.load_lora_into_unet(state, alphas, unet2, metadata=metadata)
  np.testing.assert_allclose(_torch_out(unet2, inputs), trained["out"], atol=ATOL, rtol=0)

  # And back onto a fresh UNet of ours: the same adapters, the scale inside lora_up.
  again = load_diffusers_unet(root)
  assert lora_convert.load_diffusers_lora(again, path) == sorted(_adapted(model))
  for name, layer in _adapted(again).items():
    ref = _adapted(model)[name]
    assert layer.lora_scale == 1.0
    np.testing.assert_array_equal(np.asarray(layer.lora_down.get_value()),
                                  np.asarray(ref.lora_down.get_value()))
    np.testing.assert_allclose(np.asarray(layer.lora_up.get_value()),
                               ref.lora_scale * np.asarray(ref.lora_up.get_value()), rtol=1e-7)


def test_diffusers_saved_lora_imports(base, tmp_path):
  root, inputs = base
  unet = _diffusers_unet(root)
  unet.add_adapter(peft.LoraConfig(
      r=4, lora_alpha=6, init_lora_weights="gaussian",
      target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out", "conv2", "time_emb_proj"],
      rank_pattern={"conv2": 2}, alpha_pattern={"time_emb_proj": 1.5}))
  gen = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, p in unet.named_parameters():
      if "lora_B" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  expected = _torch_out(unet, inputs)
  # As diffusers' training scripts save (attention keys become `.lora.down` / `.lora.up`).
  diffusers.StableDiffusionPipeline.save_lora_weights(
      tmp_path / "pipe", unet_lora_layers=convert_state_dict_to_diffusers(
          get_peft_model_state_dict(unet)),
      unet_lora_adapter_metadata=unet.peft_config["default"].to_dict())
  # As the model saves its own adapter (no prefix).
  unet.save_lora_adapter(tmp_path / "model")

  keys = common.read_safetensors(tmp_path / "pipe" / lora_convert.WEIGHT_NAME)
  assert any(k.endswith(".to_q.lora.down.weight") for k in keys)  # diffusers' other spelling
  for folder, prefix in (("pipe", "unet"), ("model", None)):
    model = load_diffusers_unet(root)
    paths = lora_convert.load_diffusers_lora(model, tmp_path / folder, prefix=prefix)
    assert len(paths) == 32 + 4 + 8 + 8  # attention, proj_out, conv2, time_emb_proj
    layers = _adapted(model)
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].lora_scale == 1.5
    assert layers["mid_block.resnets.1.conv2"].lora_scale == 3.0
    assert layers["mid_block.resnets.1.time_emb_proj"].lora_scale == 1.5 / 4
    np.testing.assert_allclose(_ours_out(model, inputs), expected, atol=ATOL, rtol=0,
                               err_msg=folder)


def test_fold_gives_a_plain_unet_with_the_same_outputs(base, trained, tmp_path, capsys):
  root, inputs = base
  model = trained["model"]
  plain = lora_convert.fold_lora(model)
  assert not _adapted(plain) and not nnx.state(plain, nnx.LoRAParam)
  assert all(not layer.lora_merged for layer in _adapted(model).values())  # a copy was folded
  np.testing.assert_allclose(_ours_out(plain, inputs), trained["out"], atol=ATOL, rtol=0)
  # `convert --lora`: the converted UNet is the folded one (a plain UNet checkpoint).
  command.run("diffusers", str(root), str(tmp_path / "out"), lora=str(trained["path"]))
  assert "folded" in capsys.readouterr().out
  restored = nnx.to_flat_state(nnx.state(command.restore_unet(tmp_path / "out" / "unet")))
  folded = nnx.to_flat_state(nnx.state(plain))
  assert [p for p, _ in restored] == [p for p, _ in folded]
  for (p, v), (_, w) in zip(restored, folded):
    np.testing.assert_allclose(np.asarray(v.get_value()), np.asarray(w.get_value()), atol=1e-6,
                               rtol=0, err_msg=str(p))


def _cli(*args):
  argv = cli.FLAGS(["main", *args])
  try:
    return cli.main(argv)
  finally:
    cli.FLAGS.unparse_flags()


def test_errors(base, trained, tmp_path, capsys):
  root, _ = base
  # A LoRA made for another UNet (wider blocks, other context width): one error listing it all.
  other_config = dict(UNET, block_out_channels=(32, 64), cross_attention_dim=16)
  other = nnx.eval_shape(lambda: unet_lib.UNet(other_config, rngs=nnx.Rngs(0)))
  lora_lib.apply_lora(other, rank=2, rngs=nnx.Rngs(0))
  lora_lib.apply_lora(other, r"^conv_out$", rank=2, rngs=nnx.Rngs(0))
  other_file = lora_convert.save_diffusers_lora(other, tmp_path / "other.safetensors")
  model = load_diffusers_unet(root)
  with pytest.raises(common.CheckpointMismatchError) as info:
    lora_convert.load_diffusers_lora(model, other_file)
  message = str(info.value)
  assert message.startswith(f"LoRA file {other_file} does not match the module:")
  assert len(info.value.shape_mismatches) == 2 * 32 + 1
  assert "attn2.to_k.lora_A.weight -> " in message and "(2, 16) " in message
  assert not _adapted(model)  # nothing attached on failure
  # The command: one line, exit status 2.
  assert _cli("convert", f"--src={root}", f"--dst={tmp_path / 'o'}",
              f"--lora={other_file}") == errors.EXIT_USER_ERROR
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: convert --lora: ")
  assert "65 shape mismatch(es)" in err[0]

  with pytest.raises(errors.MissingError, match="no LoRA file"):
    lora_convert.load_diffusers_lora(model, tmp_path / "absent.safetensors")
  with pytest.raises(errors.ConfigError, match="no LoRA tensors under the prefix 'text_encoder'"):
    lora_convert.load_diffusers_lora(model, trained["path"], prefix="text_encoder")
  with pytest.raises(errors.ConfigError, match="has no LoRA adapters to export"):
    lora_convert.save_diffusers_lora(model, tmp_path / "none.safetensors")
  with pytest.raises(errors.ConfigError, match="do not have rank 3"):
    lora_convert.load_diffusers_lora(model, trained["path"], rank=3)
  # Adapters elsewhere on the UNet: the file must fill exactly those.
  lora_lib.apply_lora(model, r"^conv_in$", rank=2, rngs=nnx.Rngs(0))
  with pytest.raises(common.CheckpointMismatchError, match="conv_in.lora_down"):
    lora_convert.load_diffusers_lora(model, trained["path"])
  # A LoRA variant we do not compute.
  q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
  dora = tmp_path / "dora.safetensors"
  safetensors.numpy.save_file(
      {f"{q}.lora_A.weight": np.zeros((2, 16), np.float32),
       f"{q}.lora_B.weight": np.zeros((16, 2), np.float32)}, str(dora),
      metadata={lora_convert.METADATA_KEY: json.dumps({"unet.r": 2, "unet.use_dora": True})})
  with pytest.raises(errors.ConfigError, match="use_dora"):
    lora_convert.load_diffusers_lora(load_diffusers_unet(root), dora)


def test_export_lora_command_writes_the_runs_ema_adapters(tmp_path, capsys):
  config = tiny.get_config()
  config.model.lora = dict(rank=2, alpha=4.0)
  config.model.zero_init_output = False
  experiment.save_config(config, tmp_path)
  exp = experiment.Experiment(config)
  # A checkpoint whose EMA adapters differ from the trained ones (and are non-zero).
  state = exp.state.replace(step=exp.state.step + 3,
                            ema=jax.tree.map(lambda x: x + 0.01, exp.state.ema))
  checkpointer = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  with jax.set_mesh(exp.mesh):
    assert checkpointer.maybe_save(3, state, force=True)
  checkpointer.close()
  dst = tmp_path / "lora.safetensors"
  assert _cli("export-lora", f"--workdir={tmp_path}", f"--dst={dst}") == 0
  assert "step 3, EMA" in capsys.readouterr().out
  adapters, scales = lora_convert.read_diffusers_lora(dst)
  layers = _adapted(exp.model(state.ema).unet)
  assert sorted(adapters) == sorted(layers) and len(layers) == 4 * 2 * 4
  for name, layer in layers.items():
    assert scales[name] == 1.0 and layer.lora_scale == 2.0
    np.testing.assert_array_equal(adapters[name]["A"], np.asarray(layer.lora_down.get_value()).T)
    np.testing.assert_allclose(adapters[name]["B"], 2.0 * np.asarray(layer.lora_up.get_value()).T,
                               rtol=1e-7)
    assert np.abs(adapters[name]["B"]).min() > 0
