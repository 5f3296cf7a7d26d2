"""`convert --from diffusers`: tiny pipeline folder -> orbax checkpoints -> restored modules."""
import json

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from dense_diffusion.convert import command  # noqa: E402
from dense_diffusion.convert import load_diffusers_unet  # noqa: E402

UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
  root = tmp_path_factory.mktemp("pipe")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(**UNET)
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))  # non-zero everywhere (diffusers zero-inits some).
  unet.save_pretrained(root / "unet")
  diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
      down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
      layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(root / "vae")
  (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
  return root, unet.eval()


def test_convert_pipeline_and_restore(pipeline, tmp_path, capsys):
  root, unet = pipeline
  dst = tmp_path / "out"
  command.run("diffusers", str(root), str(dst))
  printed = capsys.readouterr().out
  assert "wrote unet" in printed and str(dst / "unet" / "params") in printed
  assert "wrote vae" in printed and (dst / "vae" / "params").is_dir()
  assert "no text_encoder, image_encoder" in printed
  assert json.loads((dst / "unet" / "config.json").read_text())["block_out_channels"] == [16, 32]
  restored = command.restore_unet(dst / "unet")
  loaded = load_diffusers_unet(root)
  for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(restored, nnx.Param)),
                                nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
    assert p1 == p2
    np.testing.assert_array_equal(np.asarray(v1.get_value()), np.asarray(v2.get_value()))
  rng = np.random.default_rng(0)
  x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
  t = np.array([10.0], np.float32)
  ctx = rng.standard_normal((1, 3, 8)).astype(np.float32)
  with torch.no_grad():
    expected = unet(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                    torch.from_numpy(ctx)).sample.permute(0, 2, 3, 1).numpy()
  got = np.asarray(nnx.jit(lambda m, *a: m(*a))(restored, x, t, ctx))
  np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_convert_single_unet_folder(pipeline, tmp_path):
  root, _ = pipeline
  command.run("diffusers", str(root / "unet"), str(tmp_path / "o"))
  assert (tmp_path / "o" / "unet" / "params").is_dir()
  assert (tmp_path / "o" / "unet" / "config.json").is_file()


def test_convert_errors(pipeline, tmp_path):
  root, _ = pipeline
  with pytest.raises(ValueError, match="not supported"):
    command.run("pytorch_lightning", str(root), str(tmp_path))
  with pytest.raises(FileNotFoundError):
    command.run("diffusers", str(tmp_path / "absent"), str(tmp_path / "o"))


# Stable Diffusion 2's layout, tiny: cross-attention at three of four levels, linear projections.
SD2_LAYOUT = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16, 16),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=1,
    cross_attention_dim=8, attention_head_dim=(2, 2, 4, 4), use_linear_projection=True,
    norm_num_groups=4)


def test_converted_sd2_layout_loads_with_a_fresh_prompt_projection(tmp_path):
  """A diffusers SD-2-layout UNet, converted by `main convert`, builds the generalist with the
  prompt's pooled embedding projected into the timestep embedding (`class_embed_type=
  "projection"`): every checkpoint weight loads as it was, the projection (which SD has not)
  starts fresh and is marked so for the trainable set, and the task then changes the answer."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dense_diffusion import tasks  # pylint: disable=g-import-not-at-top
  from dense_diffusion.experiment import model as model_lib  # pylint: disable=g-import-not-at-top
  from dense_diffusion.experiment import trainable  # pylint: disable=g-import-not-at-top
  torch.manual_seed(1)
  unet = diffusers.UNet2DConditionModel(**SD2_LAYOUT)
  with torch.no_grad():
    for p in unet.parameters():
      p.add_(0.05 * torch.randn_like(p))
  unet.save_pretrained(tmp_path / "sd2" / "unet")
  command.run("diffusers", str(tmp_path / "sd2"), str(tmp_path / "converted"))

  config = ml_collections.ConfigDict(dict(
      unet=dict(sample_size=16, class_embed_type="projection",
                projection_class_embeddings_input_dim=8),
      pretrained_unet=str(tmp_path / "converted"), num_task_tokens=2, task_token_init_std=1.0))
  provenance = trainable.Provenance()
  model = model_lib.build_model(config, [tasks.get("depth"), tasks.get("normals")],
                                provenance=provenance)
  assert model.unet.config["class_embed_type"] == "projection"
  assert model.unet.class_embedding.linear_1.kernel[...].shape == (8, 32)
  fresh = {p.name for p in trainable.select(model, config, provenance).params if p.fresh}
  assert {"unet/class_embedding/linear_1/kernel", "unet/class_embedding/linear_2/bias",
          "unet/conv_in/kernel", "unet/conv_out/kernel", "task_embedding"} <= fresh
  assert not any(n.startswith("unet/down_blocks") or n.startswith("unet/time_embedding")
                 for n in fresh)
  reference = load_diffusers_unet(tmp_path / "sd2")
  ours = dict(nnx.to_flat_state(nnx.state(model.unet, nnx.Param)))
  for path, var in nnx.to_flat_state(nnx.state(reference, nnx.Param)):
    if path[0] in ("conv_in", "conv_out"):
      continue  # widened to 6 input channels; RGB out (3 channels) is a fresh conv.
    np.testing.assert_array_equal(np.asarray(ours[path].get_value()),
                                  np.asarray(var.get_value()), err_msg=str(path))
  assert not any(p[0] == "class_embedding" for p in
                 dict(nnx.to_flat_state(nnx.state(reference, nnx.Param))))

  rng = np.random.default_rng(0)
  x_t = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  t = np.array([500, 500], np.int32)
  run = nnx.jit(lambda m, task: m(x_t, t, image, task))
  depth, normals = (np.asarray(run(model, np.array([k, k], np.int32))) for k in (0, 1))
  assert np.abs(depth - normals).max() > 1e-3  # the prompt (tokens + pooled) sets the answer.
