"""What configs/vpd_depth.py and configs/vpd_seg.py share (not a config of its own)."""
import ml_collections

from configs import demo
from configs import generalist_pixel128
from dense_diffusion.datasets import readers

# Stable Diffusion 1.5's UNet (diffusers UNet2DConditionModel keys), VPD's backbone.
SD15_UNET = dict(
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"],
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)


# VPD's ADE20K head (mmseg FPN neck + FPNHead in its config): the pyramid's and the semantic
# branch's channels, and GroupNorm groups (Panoptic FPN's norm; mmseg uses SyncBN there).
SEMANTIC_FPN = dict(type="semantic_fpn", fpn_width=256, head_width=256, norm_groups=32)
# The same head at the synthetic configs' scale (a UNet of 16-96 channels).
SEMANTIC_FPN_SMALL = dict(type="semantic_fpn", fpn_width=64, head_width=64, norm_groups=8)


def _vpd(c: ml_collections.ConfigDict) -> None:
  """The backbone paradigm's settings, common to both configs."""
  c.diffusion = ml_collections.ConfigDict(dict(
      mode="vpd",
      timestep=1,  # VPD runs the UNet once at t = 1.
      backbone_noise=False,  # VPD's main results use the clean latent.
      vpd_attention_maps=True,  # cross-attention maps concatenated to the features.
      # Evaluation only: average with the mirrored image's answer (class probabilities) ...
      vpd_flip=False,
      # ... and slide square windows of this many pixels every stride pixels over the image,
      # averaging each pixel's outputs (0, 0: the whole image in one pass).
      vpd_slide_crop=0, vpd_slide_stride=0,
      prediction_type="epsilon", num_inference_steps=1))  # unused by vpd (one pass).
  c.schedule = ml_collections.ConfigDict(dict(
      kind="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      rescale_betas_zero_snr=False))  # Stable Diffusion's schedule (for backbone_noise).
  # The head architecture (models/heads.py:HEADS): "dense", channels inside each head, its 2x
  # upsampling stages (latent space) bilinear + conv; or SEMANTIC_FPN (VPD's segmentation head).
  c.model.head = dict(type="dense", width=64, upsampling="bilinear")
  c.model.image_encoder = None  # VPD conditions on text alone.
  c.model.input_residual = False  # the heads answer directly.
  c.model.zero_init_output = False
  c.model.frozen = ()  # e.g. ("unet",) to train the heads (and adapter) alone (docs/training.md).
  c.task_loss_weights = {}


def synthetic_config(res: int, tasks: tuple) -> ml_collections.ConfigDict:
  """A small UNet from scratch on synthetic_scenes, one task, CPU-sized."""
  c = demo.get_config(f"res={res}")
  c.tasks = tasks
  c.input.entries = readers.synthetic_mixture(tasks, config=f"res{res}")
  c.model.unet = demo.without_task_embedding(c.model.unet)  # the backbone takes no class labels.
  c.model.task_token_init_std = 0.02  # the tokens VPD's recipe was measured with.
  c.model.num_task_tokens = 4  # learned tokens of a task without class names.
  _vpd(c)
  c.optimizer.lr = 2e-3  # from scratch, small model.
  c.optimizer.warmup_steps = 30
  c.eval.batch_size = 32
  return c


def real_config(res: int) -> ml_collections.ConfigDict:
  """Stable Diffusion 1.5 UNet / VAE / text encoder by path, bf16, the frozen VAE."""
  c = generalist_pixel128.get_config(f"res={res}")
  c.model.unet = dict(sample_size=res, **SD15_UNET)
  c.model.text_skip_layers = 0  # SD 1.5 conditions on CLIP's last layer.
  c.model.vae.dtype = "bfloat16"  # frozen VAE at half precision on accelerators.
  _vpd(c)
  c.optimizer.warmup_steps = 500
  c.optimizer.weight_decay = 1e-2
  c.eval.max_examples = 654  # the NYUv2 test split (ADE20K: set 2000).
  return c
