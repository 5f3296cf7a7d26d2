"""VPD semantic segmentation: the diffusion UNet once at t = 1 as a backbone, class-name prompts.

    python -m dense_diffusion.main train --config configs/vpd_seg.py --workdir runs/vpd_seg
    python -m dense_diffusion.main train --config configs/vpd_seg.py:real=1 \
        --config.model.pretrained_unet=weights/sd15 --config.model.vae.pretrained=weights/sd15 \
        --config.model.text_encoder=weights/sd15 --config.input.data_dir=/data/tfds ...

One text token per class ("a photo of a {class}" through the frozen text encoder, pooled, or
one learned token per class without one), refined by the text adapter, is the UNet's context;
its decoder features with the per-class cross-attention maps concatenated feed a semantic-FPN
head of class logits, trained with cross-entropy on the known pixels (paradigms/backbone.py).

With `real=1` the head is VPD's Semantic FPN (`model.head.type="semantic_fpn"`, 256 channels)
and evaluation slides 512 x 512 windows every 341 pixels and averages the class probabilities
with the mirrored image's (docs/vpd.md "Inference"); the synthetic variant keeps the dense head
and one whole-image pass unless told otherwise.

`arg`: `real` (0: synthetic_scenes' 7 classes on the CPU; 1: ADE20K's 150 classes with a
Stable Diffusion 1.5 UNet, VAE and text encoder by path), `res`, `latent` (default: 1 for
real, 0 for synthetic), `steps`, `head` (dense | semantic_fpn; default: semantic_fpn for real,
dense for synthetic).
"""
from configs import demo
from configs import vpd_common
from dense_diffusion import errors
from dense_diffusion.datasets import readers


def get_config(arg=None):
  arg = demo.parse_arg(arg, real=0, res=0, latent=-1, steps=0, head="")
  res = arg.res or (512 if arg.real else 32)
  if arg.real:
    c = vpd_common.real_config(res)
    c.tasks = ("semantic_ade20k",)  # ADE20K's own label space (tasks/segmentation.py).
    c.input.entries = [readers.ade20k(res)]  # 512 x 512 (VPD: 512 x 512 crops)
    c.optimizer.lr = 8e-5  # VPD's segmentation learning rate (AdamW).
    c.total_steps = arg.steps or 80_000  # VPD: 80k iterations at batch 16.
    c.batch_size = 16
    # VPD's test protocol: 512 x 512 windows at stride 341 (the test_cfg of VPD's mmseg
    # config, mmseg's ADE20K slide setting), each pixel's logits averaged over its windows.
    # VPD's released config does not flip (MultiScaleFlipAug flip=False, one scale); mmseg's
    # multi-scale test flips and averages the class probabilities. Flipping is on here at one
    # scale: set vpd_flip=False for VPD's released single-scale protocol exactly.
    c.diffusion.vpd_slide_crop = 512
    c.diffusion.vpd_slide_stride = 341
    c.diffusion.vpd_flip = True
  else:
    c = vpd_common.synthetic_config(res, ("semantic",))
    c.total_steps = arg.steps or 300
  c.model.latent = bool(arg.real) if arg.latent < 0 else bool(arg.latent)
  head = arg.head or ("semantic_fpn" if arg.real else "dense")
  if head == "semantic_fpn":
    c.model.head = dict(vpd_common.SEMANTIC_FPN if arg.real else vpd_common.SEMANTIC_FPN_SMALL)
  elif head != "dense":
    raise errors.ConfigError(f"configs/vpd_seg.py: head={head!r}; use dense or semantic_fpn")
  return c
