"""DMP-style interpolation (Lee et al. 2024): the image takes the place of the noise.

    python -m dense_diffusion.main train --config configs/dmp.py --workdir runs/dmp
    python -m dense_diffusion.main train --config configs/dmp.py:real=1 \
        --config.model.pretrained_unet=weights/sd2-unet --config.input.data_dir=/data/tfds ...

z_t = sqrt(a_t) y + sqrt(1 - a_t) x (y: the answer, x: the image), v-prediction on Stable
Diffusion's scaled_linear schedule, 5 DDIM steps from z_T = x. What trains is the trainable-set
default of a LoRA run (docs/training.md, "What trains"): LoRA adapters (rank 4) on the UNet's
attention projections, and every parameter without a pretrained value. With SD weights
(`real=1`) those are the widened `conv_in`, the RGB `conv_out`, the image encoder's projection
and the task tokens, while the pretrained kernels stay as they are; the synthetic set-up has no
pretrained UNet, so there the whole (random) UNet trains beside its adapters.

`arg`: `real=0` (0: small synthetic_scenes set-up of configs/demo.py on DMP's five tasks, 1: the
real-data SD2-size set-up of configs/generalist_pixel128.py), `res` (image size), `rank` (LoRA
rank), `latent` (0: pixels, 1: the VAE's latents).
"""
from configs import demo
from configs import generalist_pixel128
from dense_diffusion.datasets import readers

# The tasks of DMP's paper (Lee et al. 2024, Table 1), all rendered by synthetic_scenes.
DMP_TASKS = ("depth", "normals", "semantic", "albedo", "shading")


def get_config(arg=None):
  arg = demo.parse_arg(arg, real=0, res=0, rank=4, latent=0)
  if arg.real:
    c = generalist_pixel128.get_config(f"res={arg.res or 128}")
    c.model.vae.dtype = "bfloat16"  # frozen VAE at half precision on accelerators.
  else:
    c = demo.get_config(f"res={arg.res or 32}")
    c.tasks = DMP_TASKS
    c.input.entries = readers.synthetic_mixture(DMP_TASKS, config=f"res{arg.res or 32}")
    c.task_loss_weights = {}  # demo's weights are for restoration and instance centres.
    demo.task_as_class_label(c)  # the conditioning this recipe was measured with.
    c.model.vae.config = demo.SYNTHETIC_VAE
    c.model.allow_frozen_fresh = ("vae",)  # a random frozen VAE: the latent path as plumbing.
  c.model.latent = bool(arg.latent)  # pixels or the VAE's latents: the one switch.
  c.diffusion.mode = "dmp"
  c.diffusion.prediction_type = "v_prediction"  # DMP's parameterisation.
  c.diffusion.sampler = "ddim"
  c.diffusion.num_inference_steps = 5  # DDIM steps from z_T = image.
  c.diffusion.timestep_spacing = "trailing"  # the first step is at t = T - 1.
  c.diffusion.weighting = "none"
  c.schedule.kind = "scaled_linear"  # Stable Diffusion's schedule.
  c.schedule.beta_start = 0.00085
  c.schedule.beta_end = 0.012
  c.schedule.rescale_betas_zero_snr = False
  # Adapters on the attention projections (lora.DEFAULT_PATTERN; a regex over layer paths).
  c.model.lora = dict(rank=arg.rank, alpha=4.0, pattern=r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
  c.model.trainable = ("lora", "fresh")  # the LoRA default, spelt out: adapters + new parts.
  c.model.input_residual = False  # the image is already DMP's starting point (and v-prediction).
  c.model.zero_init_output = False  # SD's conv_out is kept where it fits (real=1, latent=1).
  if not arg.real:
    c.optimizer.lr = 1e-3  # LoRA from a random UNet on synthetic data: a larger step.
  return c
