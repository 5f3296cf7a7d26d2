"""Parity of our AutoencoderKL with diffusers' (tiny random configs), latent scaling, errors."""
import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from dense_diffusion.convert import common
from dense_diffusion.convert import vae as vae_convert
from dense_diffusion.models import vae as vae_lib

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SIZE = 16

CASES = {
    # Two blocks, odd group count (3 divides 6 and 12), quant convs, mid attention.
    "quant": dict(block_out_channels=(6, 12), norm_num_groups=3, layers_per_block=1,
                  use_quant_conv=True, use_post_quant_conv=True, latent_channels=4),
    # No quant convs, no mid attention, two layers per block, a shift factor (SD3/Flux style).
    "plain": dict(block_out_channels=(8, 16), norm_num_groups=4, layers_per_block=2,
                  use_quant_conv=False, use_post_quant_conv=False, latent_channels=3,
                  mid_block_add_attention=False, shift_factor=0.1, scaling_factor=0.5),
}


def randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
      p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))


def _reference(case):
  kw = CASES[case]
  n = len(kw["block_out_channels"])
  ref = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
      up_block_types=("UpDecoderBlock2D",) * n, sample_size=SIZE, **kw).eval()
  randomise(ref, seed=len(case))
  return ref


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
  ref = _reference(request.param)
  path = tmp_path_factory.mktemp(f"vae_{request.param}")
  ref.save_pretrained(path / "vae")  # read through the pipeline sub-folder
  ours = vae_convert.load_diffusers_vae(path)
  return ref, ours, path


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
  return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def test_encode_mean_and_decode_match(pair):
  ref, ours, _ = pair
  x = np.random.default_rng(0).uniform(-1, 1, size=(2, SIZE, SIZE, 3)).astype(np.float32)
  with torch.no_grad():
    dist = ref.encode(_nchw(x)).latent_dist
    want_mean, want_logvar = _nhwc(dist.mean), _nhwc(dist.logvar)
  mean, logvar = jax.jit(lambda v: ours.encode_moments(v))(jnp.asarray(x))
  assert mean.shape == (2, SIZE // 2, SIZE // 2, ref.config.latent_channels)
  np.testing.assert_allclose(np.asarray(mean), want_mean, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(logvar), want_logvar, atol=1e-4, rtol=0)
  z = np.random.default_rng(1).normal(size=mean.shape).astype(np.float32)
  with torch.no_grad():
    want = _nhwc(ref.decode(_nchw(z)).sample)
  got = jax.jit(lambda v: ours.decode(v))(jnp.asarray(z))
  assert got.shape == x.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=0)


def test_sampling_and_scaling(pair):
  ref, ours, _ = pair
  x = np.random.default_rng(2).uniform(-1, 1, size=(1, SIZE, SIZE, 3)).astype(np.float32)
  key = jax.random.key(0)

  @jax.jit
  def run(x, key):
    z = ours.encode(x, scaled=True)
    return (ours.encode_moments(x), ours.encode(x), ours.encode(x, rng=key, sample=True), z,
            ours.decode(z, scaled=True))

  (mean, logvar), plain, sampled, z, decoded = run(jnp.asarray(x), key)
  np.testing.assert_allclose(np.asarray(plain), np.asarray(mean), atol=1e-6)
  noise = jax.random.normal(key, mean.shape)
  np.testing.assert_allclose(np.asarray(sampled),
                             np.asarray(mean + jnp.exp(0.5 * logvar) * noise), atol=1e-5)
  sf = ref.config.scaling_factor
  shift = ref.config.shift_factor or 0.0
  np.testing.assert_allclose(np.asarray(z), (np.asarray(mean) - shift) * sf, atol=1e-6)
  with torch.no_grad():
    want = _nhwc(ref.decode(_nchw(np.asarray(mean))).sample)
  np.testing.assert_allclose(np.asarray(decoded), want, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match="rng"):
    ours.encode(jnp.asarray(x), sample=True)


def test_legacy_attention_names_and_fp16_variant(tmp_path):
  # Pre-0.14 diffusers VAEs name the mid attention query/key/value/proj_attn, as 1x1 convs.
  ref = _reference("quant")
  sd = {}
  for k, v in ref.state_dict().items():
    for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      if f"attentions.0.{new}." in k:
        k = k.replace(f".{new}.", f".{old}.")
        if k.endswith("weight"):
          v = v[:, :, None, None]
    sd[k] = v.contiguous().half()
  safetensors_torch.save_file(sd, tmp_path / "diffusion_pytorch_model.fp16.safetensors")
  ref.save_config(tmp_path)
  ours = vae_convert.load_diffusers_vae(tmp_path, variant="fp16")
  x = np.random.default_rng(3).uniform(-1, 1, size=(1, SIZE, SIZE, 3)).astype(np.float32)
  ref_half = ref.to(torch.float16).float()  # the weights the fp16 file holds
  with torch.no_grad():
    want = _nhwc(ref_half.encode(_nchw(x)).latent_dist.mean)
  np.testing.assert_allclose(np.asarray(ours.encode(jnp.asarray(x))), want, atol=1e-4, rtol=0)


def test_missing_and_unused_keys_are_named(pair, tmp_path):
  ref, _, path = pair
  tensors = common.load_weights(path / "vae", vae_convert.WEIGHTS_NAME)
  tensors.pop("decoder.conv_out.bias")
  tensors["decoder.conv_outt.bias"] = np.zeros(3, np.float32)
  safetensors_torch.save_file({k: torch.from_numpy(v) for k, v in tensors.items()},
                              tmp_path / vae_convert.WEIGHTS_NAME)
  ref.save_config(tmp_path)
  with pytest.raises(common.CheckpointMismatchError) as info:
    vae_convert.load_diffusers_vae(tmp_path)
  assert info.value.missing == ["decoder.conv_out.bias"]
  assert info.value.unused == ["decoder.conv_outt.bias"]


def test_unsupported_config_values_name_the_key(tmp_path):
  base = dict(block_out_channels=[8, 16], norm_num_groups=4)
  with pytest.raises(ValueError, match="down_block_types"):
    vae_lib.VAEConfig.from_dict({**base, "down_block_types": ["DownBlock2D", "DownEncoderBlock2D"],
                                 "up_block_types": ["UpDecoderBlock2D"] * 2})
  with pytest.raises(ValueError, match="norm_type"):
    vae_lib.VAEConfig.from_dict({**base, "norm_type": "spatial"})
  with pytest.raises(ValueError, match="norm_num_groups"):
    vae_lib.VAEConfig.from_dict({**base, "norm_num_groups": 3,
                                 "down_block_types": ["DownEncoderBlock2D"] * 2,
                                 "up_block_types": ["UpDecoderBlock2D"] * 2})
  cfg = vae_lib.VAEConfig.from_dict({"_class_name": "AutoencoderKL", "sample_size": 32,
                                     "down_block_types": ["DownEncoderBlock2D"] * 2,
                                     "up_block_types": ["UpDecoderBlock2D"] * 2, **base})
  vae = nnx.eval_shape(lambda: vae_lib.AutoencoderKL(cfg, rngs=nnx.Rngs(0)))  # shapes only
  with pytest.raises(ValueError, match="channels"):
    vae.decode(jnp.zeros((1, 4, 4, 3)))


def test_every_parameter_has_logical_axes():
  from test_text_encoder import assert_logical_axes
  cfg = vae_lib.VAEConfig(**{**CASES["quant"], "down_block_types": ("DownEncoderBlock2D",) * 2,
                             "up_block_types": ("UpDecoderBlock2D",) * 2})
  assert_logical_axes(nnx.eval_shape(lambda: vae_lib.AutoencoderKL(cfg, rngs=nnx.Rngs(0))))


def test_full_size_sd_vae_key_set_maps_one_to_one():
  # Stable Diffusion's VAE configuration on torch's meta device: keys and shapes only.
  from test_text_encoder import param_count, stand_ins
  kw = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
            norm_num_groups=32, sample_size=512, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4)
  with torch.device("meta"):
    ref = diffusers.AutoencoderKL(**kw)
  ours = vae_convert.vae_from_tensors(dict(ref.config), stand_ins(ref), dry_run=True)
  n = sum(p.numel() for p in ref.parameters())
  assert param_count(ours) == n == 83_653_863
