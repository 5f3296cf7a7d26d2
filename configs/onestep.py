"""GenPercept / Lotus / E2E-FT one-step perception: a fixed timestep, the answer in one pass.

    python -m dense_diffusion.main train --config configs/onestep.py --workdir runs/onestep
    python -m dense_diffusion.main train --config configs/onestep.py:loss=image,latent=1 ...
    python -m dense_diffusion.main train --config configs/onestep.py:real=1,latent=1,loss=image \
        --config.model.pretrained_unet=weights/sd2 --config.model.vae.pretrained=weights/sd2 \
        --config.input.data_dir=/data/tfds ...

The UNet sees concat(x_t, condition) at the fixed t = T - 1 and predicts the answer directly
(`pred=sample`) or its v (`pred=v_prediction`, with zero-terminal SNR so that t = T - 1 is pure
noise and v = -x0, i.e. a direct prediction as well). Evaluation is the same single pass.
`loss=image` is GenPercept's and E2E-FT's recipe: the answer is decoded (through the frozen VAE
in latent space, with gradients) and scored by each task's image-level loss (scale-and-shift-
invariant L1 for affine-invariant depth, angular for normals, RGB MSE otherwise).

`head=1` is GenPercept's custom decoder head: the UNet sees the image alone at t = T - 1 and
its decoder features feed a dense head per task (the `vpd` paradigm's heads and losses,
paradigms/backbone.py, without cross-attention maps or class prompts; `pred` and `loss` do not
apply). With `real=1` the heads sit on SD's pretrained UNet, whose conv_in takes the 4-channel
latent: `real=1,head=1` needs `latent=1` (in pixels the backbone would see 3 channels, and a
pretrained conv_in is not narrowed).

`arg`: `real` (0: the small synthetic_scenes set-up of configs/demo.py; 1: the SD2-size
set-up of configs/generalist_pixel128.py on GenPercept's depth data, Marigold's mixture of
Hypersim and Virtual KITTI 2 sampled 9 : 1, evaluated on NYUv2), `res` (image size), `pred`
(sample | v_prediction), `latent` (0: pixels, 1: the VAE's latents; the only key in which the
two runs differ), `loss` (prediction | image), `head` (0 | 1).
"""
from configs import demo
from configs import generalist_pixel128
from dense_diffusion.datasets import readers


def get_config(arg=None):
  arg = demo.parse_arg(arg, real=0, res=0, pred="sample", latent=0, loss="prediction", head=0)
  if arg.real:
    c = generalist_pixel128.get_config(f"res={arg.res or 128}")
    res = c.model.unet["sample_size"]
    c.tasks = ("depth",)
    # GenPercept's depth data: Marigold's mixture (Hypersim + Virtual KITTI 2, 9 : 1), depth
    # normalised per image; evaluated zero-shot on NYUv2 after scale-and-shift alignment.
    c.input.entries = readers.marigold_depth_mixture(res, affine_invariant=True)
    c.input.shuffle_buffer = 2_000  # per entry; a Hypersim example holds ~2.5 MB while shuffled.
    c.eval.entries = [readers.nyu_depth_v2(res, affine_invariant=True)]
    c.model.vae.dtype = "bfloat16"  # frozen VAE at half precision on accelerators.
    # At 480x640, 2 examples per 80 GB GPU fit (55 GiB in XLA's buffer assignment), 4 do not
    # (92 GiB): set batch_size to 2 x devices there (docs/training.md, "Memory on one device").
  else:
    c = demo.get_config(f"res={arg.res or 32}")  # latent=1: the synthetic VAE (model.vae.recipe).
  c.model.latent = bool(arg.latent)  # pixels or the VAE's latents: the one switch.
  c.diffusion.mode = "onestep"
  c.diffusion.prediction_type = arg.pred  # sample | v_prediction.
  c.diffusion.loss_space = arg.loss  # prediction | image (GenPercept / E2E-FT).
  c.model.input_residual = arg.pred == "sample"  # restoration as input + correction; x0 only.
  # A zero output is a flat latent, whose decoder gradients overflow under an image-level loss.
  c.model.zero_init_output = c.model.zero_init_output and arg.loss != "image"
  c.diffusion.timestep = None  # None = T - 1 (GenPercept's fixed timestep).
  c.diffusion.num_inference_steps = 1  # one pass.
  c.diffusion.weighting = "none"  # one timestep: nothing to weight.
  c.schedule.rescale_betas_zero_snr = True  # t = T - 1 is pure noise, so v = -x0 there.
  if arg.head:
    if arg.real and not arg.latent:
      raise ValueError("onestep real=1,head=1 puts the heads on SD's UNet, whose conv_in takes "
                       "the 4-channel latent: add latent=1")
    _custom_head(c)
  return c


def _custom_head(c) -> None:
  """GenPercept's dense-head variant: the vpd paradigm's backbone pass at t = T - 1."""
  c.diffusion.mode = "vpd"
  c.diffusion.timestep = c.schedule.num_train_timesteps - 1  # GenPercept's fixed timestep.
  c.diffusion.loss_space = "prediction"  # each head's own loss.
  c.diffusion.vpd_attention_maps = False  # GenPercept feeds the decoder features alone ...
  c.diffusion.vpd_class_prompts = False  # ... and conditions every task on its task tokens.
  c.model.head = dict(width=64)  # channels inside each dense head.
  c.model.input_residual = False  # the heads answer directly.
  c.model.zero_init_output = False
  c.model.image_encoder = None  # the image enters through the UNet's input alone.
  # The backbone pass adds no task to the timestep embedding: the heads are per task.
  c.model.unet = demo.without_task_embedding(c.model.unet)
  c.model.task_token_init_std = 0.02  # the tokens this recipe was measured with.
