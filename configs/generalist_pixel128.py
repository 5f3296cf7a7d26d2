"""The seed paper's set-up: one generalist at 128x128 in pixel space on six real datasets.

    python -m dense_diffusion.main train --config configs/generalist_pixel128.py \
        --config.model.pretrained_unet=weights/sd2-unet --config.model.text_encoder=weights/sd2 \
        --config.input.data_dir=/data/tfds --workdir runs/generalist128

An SD-2 UNet (diffusers `UNet2DConditionModel` keys) works directly on 128x128 RGB (no VAE),
input = concat(noisy target, condition image) = 6 channels: the converted 4-channel `conv_in`
is widened by `model.input_widening` (docs/models.md). Context = frozen text-encoder embeddings of
the task prompts (cached once) + CLIP image-encoder tokens of the condition image. Tasks: depth
(NYUv2), ADE20K's semantic classes, COCO's semantic classes + instance (COCO panoptic; panoptic is
their merge), denoise (SIDD), derain (Rain13K), low-light (LOL); DDIM sampling; bf16 compute
with float32 parameters; remat; FSDP mesh.
Data: data/README.md says how to prepare each TFDS dataset.

`arg`: `res=128` (image size), `batch=256` (global batch), `accum=1` (microbatches per step).
"""
import ml_collections
from ml_collections import config_dict

from configs import demo
from dense_diffusion.datasets import readers

# One label space per dataset: ADE20K's 150 classes and COCO panoptic's 133 are two tasks, each
# with its own prompt and palette; panoptic is answered from semantic_coco + instance.
# diffusers AutoencoderKL keys of stabilityai/stable-diffusion-2's VAE (SD-1.5's has the same
# architecture at sample_size 512): what the latent runs built on this config expect
# (configs/marigold.py, onestep.py, dmp.py, vpd_*.py with real=1). model.vae.pretrained loads
# the weights; the keys let `main compile` build the run abstractly with no files.
SD2_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
               layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32,
               scaling_factor=0.18215, sample_size=768)

# The TPU slices this config and the real configs built on it are sized for (docs/compile.md):
# each one's batch shards on them (tests/test_compile.py).
SLICES = ("v5e-16", "v5p-8")

TASKS = ("depth", "semantic_ade20k", "semantic_coco", "instance", "denoise", "derain", "lowlight")


def mixture(res: int) -> list:
  """The six datasets; weights roughly balance the tasks (COCO counts as two tasks)."""
  return [readers.nyu_depth_v2(res, weight=1.0),
          readers.ade20k(res, weight=1.0),
          *readers.coco_panoptic(res, weight=2.0),  # split evenly: semantic and instance.
          readers.sidd(res, weight=1.0),
          readers.rain(res, weight=1.0),
          readers.lol(res, weight=0.5)]  # LOL has 485 training pairs: sampled less.


def get_config(arg=None):
  arg = demo.parse_arg(arg, res=128, batch=256, accum=1)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.imports = ()  # modules registering tasks / paradigms outside the package.
  c.tasks = TASKS
  c.total_steps = 100_000  # optimizer steps.
  c.batch_size = arg.batch  # global batch, split over the mesh's ("data", "fsdp") axes.
  # Microbatches per step (gradients summed in a scan): activation memory / N, same update.
  c.grad_accum_steps = arg.accum

  c.input = ml_collections.ConfigDict()
  c.input.data_dir = config_dict.placeholder(str)  # TFDS data_dir with the prepared datasets.
  c.input.entries = mixture(arg.res)
  c.input.shuffle_buffer = 10_000  # examples per entry held for shuffling.
  c.input.on_bad_example = "skip"  # real data: count and log undecodable examples.
  # Loss multiplier per task (default 1). The demo needed derain 16 / denoise 8 (their losses are
  # 5-10x smaller than the others'); set these from the per-task losses of a first run.
  c.task_loss_weights = {}

  c.model = ml_collections.ConfigDict()
  c.model.unet = dict(  # diffusers UNet2DConditionModel keys of stabilityai/stable-diffusion-2.
      sample_size=arg.res,  # the image size; in/out channels follow the space (model.latent).
      block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
      down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                        "CrossAttnDownBlock2D", "DownBlock2D"],
      up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                      "CrossAttnUpBlock2D"],
      attention_head_dim=[5, 10, 20, 20],  # SD2's config: these are head counts (64-dim heads).
      use_linear_projection=True, cross_attention_dim=1024,  # OpenCLIP ViT-H text width.
      upcast_attention=False, norm_num_groups=32, norm_eps=1e-5, act_fn="silu",
      flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
      # The task reaches the UNet only through its prompt: its tokens in cross-attention (three
      # of four levels) and its pooled embedding (the EOS token's state) added to the timestep
      # embedding through a fresh projection (diffusers' class_embed_type="projection", as wide
      # as the text tokens when projection_class_embeddings_input_dim is left out), so every
      # ResNet block knows the task; SD-2 has no such projection: it starts fresh.
      class_embed_type="projection")
  c.model.pretrained_unet = config_dict.placeholder(str)  # converted SD2 UNet folder (None: random init).
  c.model.input_widening = "copy_scale"  # 4 -> 6 input channels: copy, scale by 4/6 (docs/models.md).
  c.model.text_encoder = config_dict.placeholder(str)  # SD2 pipeline / CLIPTextModel folder.
  c.model.text_skip_layers = 0  # diffusers SD-2 folders already end at the penultimate layer (23 of 24).
  c.model.num_task_tokens = 4  # learned tokens per task, used only without a text encoder.
  # Their initialisation N(0, std^2): unit scale, as a text encoder's (layer-normed) tokens and
  # the image tokens beside them; at 0.02 they are too small for cross-attention to read
  # (docs/studies.md, `conditioning`).
  c.model.task_token_init_std = 1.0
  c.model.input_residual = False  # input + correction for restoration; needs prediction_type="sample".
  c.model.zero_init_output = False  # zero the UNet's output conv (random init only, not with LoRA).
  c.model.image_encoder = dict(  # CLIP ViT-L/14 vision tower (transformers CLIPVisionConfig).
      hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
      image_size=224, patch_size=14, hidden_act="quick_gelu")
  c.model.image_encoder_options = dict(trainable=False, tokens="all", layer=-2)  # frozen tower.
  c.model.pretrained_image_encoder = config_dict.placeholder(str)  # CLIPVisionModel folder.
  c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32.
  c.model.remat = "full"  # recompute UNet blocks in the backward pass (names: demo.py).
  # Attention per platform: splash on TPU, cuDNN on GPU (None: models/attention.py's defaults).
  c.model.attention = demo.attention_options()
  c.model.lora = None  # full fine-tuning.
  # What trains (docs/training.md, "What trains"): selectors "all", "lora", "fresh" (no
  # pretrained value), "pretrained", a module path ("unet", "unet/conv_in") or "re:<regex>".
  c.model.trainable = config_dict.placeholder(tuple)  # None: ("lora", "fresh") with LoRA, else ("all",).
  c.model.frozen = ()  # selectors held fixed, besides the latent VAE and an image tower not trainable.
  c.model.allow_frozen_fresh = ()  # selectors of random parameters that may stay frozen (("all",)).
  # The space the UNet works in, the one switch between pixel and latent runs: False = RGB
  # pixels; True = the latents of model.vae (Marigold, GenPercept, E2E-FT), frozen unless
  # model.vae.trainable.
  c.model.latent = False
  c.model.vae = ml_collections.ConfigDict(dict(
      pretrained=config_dict.placeholder(str),  # diffusers AutoencoderKL (or pipeline) folder.
      # diffusers AutoencoderKL keys: the architecture without a folder (an abstract compile);
      # a run with model.latent loads the weights from `pretrained` (a VAE built from these
      # keys alone is random, and frozen random parameters are refused).
      config=dict(SD2_VAE),
      dtype=config_dict.placeholder(str),  # compute dtype (None: model.dtype).
      remat_decoder=False,  # recompute decoder activations in the backward (image-level loss).
      trainable=False))  # train the VAE too (only with a config that means it).

  c.diffusion = ml_collections.ConfigDict(dict(
      mode="generalist", prediction_type="v_prediction",  # SD2's parameterisation.
      sampler="ddim", num_inference_steps=20, timestep_spacing="trailing",
      weighting="min_snr", snr_gamma=5.0, clip_sample=True))
  c.schedule = ml_collections.ConfigDict(dict(
      kind="scaled_linear", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
      rescale_betas_zero_snr=True))  # SD2 numbers; zero terminal SNR so sampling starts at noise.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-4  # peak learning rate (AdamW); fine-tuning a pre-trained UNet.
  c.optimizer.warmup_steps = 1000
  c.optimizer.end_lr_fraction = 0.01  # cosine decays to lr * this.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 1e-2
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.ema_decay = 0.9999  # EMA of parameters for evaluation.

  c.mesh = dict(data=1, fsdp=-1, tensor=1)  # FSDP over all devices (ZeRO-3).
  c.sharding = dict(fsdp_largest_dim=True, fsdp_min_size=2**14)  # elements; smaller replicate.
  c.nonfinite = "skip"  # bf16 at scale: drop the rare bad step, the count is logged.

  c.log_every = 100  # steps between training metrics.
  c.checkpoint_every = 2000  # steps between checkpoints.
  c.keep_checkpoints = 3
  c.eval_every = 10_000  # steps between evaluations.
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.max_examples = 500  # per task (None = the whole split).
  c.eval.num_grid_examples = 4  # examples per task in the prediction grid.
  c.eval.use_ema = True
  return c
