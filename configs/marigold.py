"""Marigold (Ke et al. 2024): latent diffusion of the answer, conditioned on the image latent.

    python -m dense_diffusion.main train --config configs/marigold.py --workdir runs/marigold
    python -m dense_diffusion.main train --config configs/marigold.py:real=1 \
        --config.model.pretrained_unet=weights/sd2 --config.model.vae.pretrained=weights/sd2 \
        --config.input.data_dir=/data/tfds --workdir runs/marigold_hypersim_vkitti

The recipe: an SD-2 UNet on VAE latents, its input widened from 4 to 8 channels (the image
latent beside the noisy answer latent: the pretrained `conv_in` kernel duplicated and halved,
`model.input_widening="copy_scale"`), v-prediction on Stable Diffusion's scaled-linear schedule,
multi-resolution noise annealed with t, affine-invariant depth targets (per-image 2% / 98%
quantiles to [-1, 1]), DDIM with trailing spacing at test time (Marigold v1-1 uses 1-4 steps)
and depth ensembles aligned by scale and shift. The frozen VAE encodes the image and the
RGB-encoded answer inside the train step and decodes the sampled latents: with `real=1`
SD-2's (`model.vae.pretrained`); on synthetic_scenes the small VAE of configs/synthetic_vae.py,
trained on first use and cached (`model.vae.recipe`; docs/training.md has the 400-step table).

`arg`: `real` (0: depth and normals on synthetic_scenes, small UNet, trains on the CPU;
1: Marigold's data, depth on Hypersim and Virtual KITTI 2 sampled 9 : 1, evaluated on NYUv2,
and an SD-2 UNet from weights given by path; data/README.md prepares the three sets), `res`
(image size), `latent` (1: the VAE's latents, Marigold; 0: the same recipe on pixels; the only
key in which the two runs differ), `steps` (DDIM steps at test time), `ensemble` (members per
test prediction).
"""
from configs import demo
from configs import generalist_pixel128
from dense_diffusion.datasets import readers


def get_config(arg=None):
  arg = demo.parse_arg(arg, real=0, res=0, latent=1, steps=4, ensemble=1)
  if arg.real:
    c = generalist_pixel128.get_config(f"res={arg.res or 128}")
    c.tasks = ("depth",)
    res = c.model.unet["sample_size"]
    # Marigold's training mixture: Hypersim + Virtual KITTI 2 sampled 9 : 1, depth normalised
    # per image; evaluated zero-shot on NYUv2 after scale-and-shift alignment.
    c.input.entries = readers.marigold_depth_mixture(res, affine_invariant=True)
    c.input.shuffle_buffer = 2_000  # per entry; a Hypersim example holds ~2.5 MB while shuffled.
    c.eval.entries = [readers.nyu_depth_v2(res, affine_invariant=True)]
    c.model.vae.dtype = "bfloat16"  # frozen VAE at half precision on accelerators.
    c.model.image_encoder = None  # Marigold conditions on the image latent alone.
    c.optimizer.lr = 3e-5  # Marigold's learning rate.
  else:
    c = demo.get_config(f"res={arg.res or 32}")
    c.tasks = ("depth", "normals")
    c.input.entries = [
        readers.synthetic_scenes("depth", config=f"res{arg.res or 32}", task_options=dict(
            max_depth=readers.SYNTHETIC_MAX_DEPTH, affine_invariant=True)),
        readers.synthetic_scenes("normals", config=f"res{arg.res or 32}")]
    c.task_loss_weights = {}
    demo.task_as_class_label(c)  # the conditioning this recipe was measured with.
    c.model.zero_init_output = False  # v-prediction: a zero output is not "no answer".
  c.model.latent = bool(arg.latent)  # the VAE's latents (Marigold) or pixels: the one switch.
  c.model.input_residual = False  # v-prediction: the output is no estimate of the answer.
  c.diffusion.mode = "generalist"
  c.diffusion.prediction_type = "v_prediction"
  c.diffusion.noise = "multires"  # multi-resolution noise ...
  c.diffusion.multires_strength = 0.9  # ... each coarser level weighted 0.9^level ...
  c.diffusion.multires_annealed = True  # ... and the whole pyramid scaled by t / T.
  c.diffusion.weighting = "none"
  c.diffusion.sampler = "ddim"
  c.diffusion.num_inference_steps = arg.steps  # DDIM steps at test time.
  c.diffusion.timestep_spacing = "trailing"  # the first step starts from pure noise.
  c.diffusion.ensemble_size = arg.ensemble  # members averaged at test time ...
  c.diffusion.ensemble = "depth_affine"  # ... depth ones aligned by scale and shift first.
  c.diffusion.clip_sample = False
  c.schedule.kind = "scaled_linear"  # Stable Diffusion's schedule.
  c.schedule.beta_start = 0.00085
  c.schedule.beta_end = 0.012
  c.schedule.rescale_betas_zero_snr = False
  return c
