"""VPD depth (Zhao et al. 2023): the diffusion UNet once at t = 1 as a backbone, a dense depth head.

    python -m dense_diffusion.main train --config configs/vpd_depth.py --workdir runs/vpd_depth
    python -m dense_diffusion.main train --config configs/vpd_depth.py:real=1 \
        --config.model.pretrained_unet=weights/sd15 --config.model.vae.pretrained=weights/sd15 \
        --config.model.text_encoder=weights/sd15 --config.input.data_dir=/data/tfds ...

The image (its VAE latent with `latent=1`, as VPD, or its pixels) goes through the UNet at
t = 1 with the text adapter's refined task tokens as context; the decoder features (and the
cross-attention maps) feed a dense head whose sigmoid output is the depth code, trained with
VPD's scale-invariant log loss (paradigms/backbone.py). docs/vpd.md has the data flow.

`arg`: `real` (0: synthetic_scenes on the CPU, a small UNet from scratch; 1: NYUv2 with a
Stable Diffusion 1.5 UNet, VAE and text encoder by path), `res` (image size), `latent` (0:
pixels; 1: VAE latents; default: 1 for real, 0 for synthetic), `steps` (training steps),
`chips` (real: the data-parallel devices the batch is sized for, 3 examples each as VPD; 16).
"""
from configs import demo
from configs import vpd_common
from dense_diffusion.datasets import readers

VPD_PER_DEVICE = 3  # examples per GPU in VPD's depth recipe ...
VPD_BATCH = 24  # ... on 8 GPUs ...
VPD_STEPS = 25_000  # ... for 25k steps.


def get_config(arg=None):
  arg = demo.parse_arg(arg, real=0, res=0, latent=-1, steps=0, chips=16)
  res = arg.res or (512 if arg.real else 32)
  if arg.real:
    c = vpd_common.real_config(res)
    c.tasks = ("depth",)
    # NYUv2 at 512 x 512 (VPD trains on 480 x 480 crops padded to 512), metres up to 10.
    c.input.entries = [readers.nyu_depth_v2(res)]
    c.optimizer.lr = 5e-4  # VPD's depth learning rate (AdamW).
    # VPD trains with 3 examples per GPU (8 GPUs: 24 in all). Kept per device: 3 on each of
    # `chips` data-parallel devices (16, a v5e-16: 48 in all, which also shards on a v5p-8's 4
    # chips, 12 each); a batch of 24 would not divide 16 shards.
    c.batch_size = VPD_PER_DEVICE * arg.chips
    # As many examples as VPD's 25k steps at batch 24 (~25 epochs of its NYUv2 set).
    c.total_steps = arg.steps or VPD_STEPS * VPD_BATCH // c.batch_size
  else:
    c = vpd_common.synthetic_config(res, ("depth",))
    c.total_steps = arg.steps or 300
  c.model.latent = bool(arg.real) if arg.latent < 0 else bool(arg.latent)
  # VPD's depth decoder upsamples the latent-scale features by transposed convolutions.
  c.model.head = dict(width=64, upsampling="deconv")
  return c
