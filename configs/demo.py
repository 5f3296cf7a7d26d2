"""The README's main job: the generalist on `synthetic_scenes`, every task at once, on a CPU.

    python -m dense_diffusion.main train --config configs/demo.py --workdir runs/demo
    python -m dense_diffusion.main train --config configs/demo.py:res=64 --config.total_steps=200 ...

Random initialisation (no pre-trained weights can be downloaded here), a small UNet told the task
by its prompt alone (learned prompt tokens, their pooled embedding projected into the timestep
embedding; no class label) and a tiny ViT image encoder, x0-prediction diffusion sampled with a
few DDIM steps (trailing spacing, so the first step starts from pure noise at t = T - 1).
"""
import ml_collections
from ml_collections import config_dict

from dense_diffusion.datasets import readers

TASKS = ("depth", "normals", "semantic", "instance", "albedo", "shading", "denoise", "derain",
         "lowlight")
# A small AutoencoderKL (diffusers keys) for latent runs on synthetic_scenes: factor 4 (a 32x32
# image is an 8x8x4 latent). configs/synthetic_vae.py trains it on these scenes (the default
# `model.vae.recipe`); randomly initialised, its latents carry little of the image.
SYNTHETIC_VAE = dict(block_out_channels=[16, 32, 32], layers_per_block=1, latent_channels=4,
                     norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 3,
                     up_block_types=["UpDecoderBlock2D"] * 3)


# The model.unet keys that add the task to the timestep embedding, so that every ResNet block
# knows it (cross-attention reads the prompt's tokens besides): the prompt's pooled embedding
# projected (class_embed_type), or the task index as a class label (num_class_embeds).
TASK_EMBEDDING_KEYS = ("num_class_embeds", "class_embed_type",
                       "projection_class_embeddings_input_dim")


def without_task_embedding(unet) -> dict:
  """`model.unet` without TASK_EMBEDDING_KEYS (a backbone pass, VPD's, takes no class labels)."""
  return {k: v for k, v in dict(unet).items() if k not in TASK_EMBEDDING_KEYS}


def task_as_class_label(c: ml_collections.ConfigDict) -> None:
  """Tells `c`'s UNet the task as a class label (num_class_embeds = the number of tasks, beside
  task tokens at std 0.02) instead of the prompt's pooled embedding: the demo's conditioning
  until 2026-12-07, with which the synthetic DMP and Marigold recipes were tuned and measured."""
  c.model.unet = {**without_task_embedding(c.model.unet), "num_class_embeds": len(c.tasks)}
  c.model.task_token_init_std = 0.02


def attention_options() -> ml_collections.ConfigDict:
  """`config.model.attention`: every field of models/attention.py `Options`, None = its default
  (so each can be set from the command line, e.g. --config.model.attention.tpu=xla)."""
  # One placeholder per field (a shared FieldReference would link the fields).
  text = lambda: config_dict.placeholder(str)
  count = lambda: config_dict.placeholder(int)
  return ml_collections.ConfigDict(dict(
      tpu=text(),  # TPU implementation for long sequences: auto (splash) or a registered name.
      gpu=text(),  # GPU: auto (cudnn for bf16/f16, chunked for f32) or a registered name.
      cpu=text(),  # CPU: auto (chunked for long sequences, matmul otherwise) or a registered name.
      platform=text(),  # force the target platform (None: the mesh's devices').
      tpu_min_tokens=count(),  # TPU: queries from which splash replaces XLA's attention (1024).
      gpu_min_tokens=count(),  # GPU f32: queries from which chunked replaces XLA's (4096).
      cpu_min_tokens=count(),  # CPU: queries from which chunked replaces matmul (4096).
      query_chunk=count(),  # chunked: queries per chunk (1024).
      block_q=count(), block_kv=count(), block_kv_compute=count(),  # splash forward (512).
      block_q_dkv=count(), block_kv_dkv=count(),  # splash backward dK/dV blocks (512).
      block_q_dq=count(), block_kv_dq=count(),  # splash backward dQ blocks (512).
      interpret=config_dict.placeholder(bool)))  # Pallas interpreter (CPU tests only).


def parse_arg(arg, **defaults):
  """'res=64,steps=100' -> ConfigDict of the defaults with those values (types from defaults)."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, value = item.split("=", 1)
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    out[key] = type(defaults[key])(value)
  return out


def get_config(arg=None):
  from configs import synthetic_vae  # pylint: disable=g-import-not-at-top  (it imports this module)
  arg = parse_arg(arg, res=32)
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Modules imported before the run is built (and by eval / predict, from config.json): tasks,
  # paradigms or pp ops registered outside the package (docs/architecture.md).
  c.imports = ()
  c.tasks = TASKS
  # Every task beats its baseline by a wide margin after 800 steps (docs/training.md). Start,
  # compilation and 800 steps on 2 CPU devices of a 2-core VM: ~7.5 min idle (2.0 steps/s),
  # 9.9 min measured while the VM was busy (1.3-1.9 steps/s; docs/benchmarks.md).
  c.total_steps = 800
  c.batch_size = 16  # global batch, split over the mesh's ("data", "fsdp") axes.
  # Microbatches per step (gradients summed in a scan): activation memory / N, same update.
  c.grad_accum_steps = 1

  c.input = ml_collections.ConfigDict()
  c.input.data_dir = config_dict.placeholder(str)  # TFDS data_dir (None: TFDS's default, ~/tensorflow_datasets).
  # Restoration needs pixel-exact output, the hardest thing for a small net to learn: sampled
  # twice as often as the other tasks.
  c.input.entries = readers.synthetic_mixture(
      TASKS, config=f"res{arg.res}", weights={"denoise": 2.0, "derain": 2.0, "lowlight": 1.5})
  c.input.shuffle_buffer = 1000  # examples per entry held for shuffling.
  c.input.on_bad_example = "fail"  # or "skip" (counted and logged).
  # Loss multipliers per task. Restoration answers are close to their input, so their losses are
  # 5-10x smaller than the other tasks' and their gradients drown in the shared UNet: alone,
  # deraining reaches 32 dB in 400 steps; in the mixture, unweighted, it stays at its input's
  # 24.5 dB for 1300 steps (docs/training.md). Instance centres x2: at 800 steps, unweighted,
  # instance PQ was 0.004; x2, 0.030.
  c.task_loss_weights = {"derain": 16.0, "denoise": 8.0, "instance": 2.0}

  c.model = ml_collections.ConfigDict()
  c.model.unet = dict(  # diffusers UNet2DConditionModel keys.
      sample_size=arg.res,  # the image size; in/out channels follow the space (model.latent).
      # 16 channels at full resolution: XLA:CPU's convolutions cost ~3x more at 32 (bench).
      block_out_channels=[16, 48, 96], layers_per_block=1,
      down_block_types=["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
      cross_attention_dim=64, attention_head_dim=4, norm_num_groups=8,
      # The task reaches the UNet only through its prompt, as in configs/generalist_pixel128.py:
      # its tokens in the 8x8 cross-attention blocks, and its pooled embedding (the mean of its
      # learned tokens) added to the timestep embedding through a projection (diffusers'
      # class_embed_type="projection", as wide as the tokens), so every ResNet block, not only
      # the cross-attention ones, knows the task (docs/models.md, docs/studies.md).
      class_embed_type="projection")
  c.model.pretrained_unet = config_dict.placeholder(str)  # folder of a diffusers UNet (or pipeline) to start from.
  c.model.input_widening = "copy_scale"  # rule for 4 -> 6 input channels of a pretrained UNet.
  c.model.text_encoder = config_dict.placeholder(str)  # pipeline / CLIPTextModel folder; None = learned task tokens.
  c.model.num_task_tokens = 4  # learned tokens per task (when no text encoder).
  # Their initialisation N(0, std^2): unit scale, as a text encoder's (layer-normed) tokens and
  # the image tokens beside them. At 0.02 they were 65x smaller than the image tokens and the
  # cross-attention did not read them (normals stayed at the baseline; docs/studies.md).
  c.model.task_token_init_std = 1.0
  # Restoration predicts a correction added to its input (models/generalist.py): a small UNet
  # cannot reproduce every pixel of the input in a few minutes (docs/training.md).
  c.model.input_residual = True
  # Random init only: the output conv starts at zero (ADM), so the first answers are the input
  # residual alone; restoration came out 0.2-0.3 dB better with it (docs/training.md).
  c.model.zero_init_output = True
  c.model.image_encoder = dict(  # CLIP-layout ViT, random init here.
      hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
      image_size=arg.res, patch_size=arg.res // 4)  # 16 image tokens
  c.model.image_encoder_options = dict(trainable=True, tokens="patch")
  c.model.pretrained_image_encoder = config_dict.placeholder(str)  # CLIPVisionModel folder.
  c.model.dtype = "float32"  # compute dtype; "bfloat16" on accelerators.
  # What the UNet keeps for the backward pass (models/unet.py, REMAT_POLICIES): False
  # (everything); block scope: True / "full" (each down/mid/up block's inputs: recompute the
  # rest), "save_attention", "save_dots"; layer scope: "layer" (each resnet's and transformer
  # layer's inputs: the least memory), "layer_save_attention", "layer_save_dots".
  c.model.remat = "none"  # a name (a string), so that --config.model.remat=layer parses.
  # Attention formulation per platform and splash kernel blocks (None: models/attention.py's).
  c.model.attention = attention_options()
  c.model.lora = None  # e.g. dict(rank=4, alpha=4.0, pattern=...) adapters (see trainable).
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
      # Without a folder: the small VAE of configs/synthetic_vae.py trained on these scenes on
      # first use, cached beside the data (experiment/vae_cache.py; None: no recipe).
      recipe=synthetic_vae.recipe(),
      # diffusers AutoencoderKL keys of a random VAE, for tests of the latent plumbing only
      # (with recipe=None and model.allow_frozen_fresh=("vae",): it cannot represent answers).
      config={},
      dtype=config_dict.placeholder(str),  # compute dtype (None: model.dtype).
      remat_decoder=False,  # recompute decoder activations in the backward (image-level loss).
      trainable=False))  # train the VAE too (only with a config that means it).

  c.diffusion = ml_collections.ConfigDict(dict(
      mode="generalist",  # generalist | onestep | dmp
      prediction_type="sample",  # x0-prediction: learns fastest from scratch.
      sampler="ddim", num_inference_steps=2, timestep_spacing="trailing",
      train_timesteps="uniform",  # or "inference": train only at the sampler's timesteps.
      weighting="none", clip_sample=True))
  c.schedule = ml_collections.ConfigDict(dict(
      kind="squaredcos_cap_v2", num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
      rescale_betas_zero_snr=False))

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 2e-3  # peak learning rate (AdamW).
  c.optimizer.warmup_steps = 100
  c.optimizer.end_lr_fraction = 0.05  # cosine decays to lr * this.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.weight_decay = 1e-4
  c.optimizer.grad_clip_norm = 1.0
  c.optimizer.ema_decay = 0.995  # EMA of parameters, used for evaluation and prediction.

  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1 = all remaining devices.
  c.sharding = dict(fsdp_largest_dim=True, fsdp_min_size=2**14)
  c.nonfinite = "stop"  # "stop" the run, or "skip" the update, when loss or grads are not finite.

  c.log_every = 100  # steps between console / TensorBoard training metrics.
  c.checkpoint_every = 500  # steps between checkpoints (and one at the end).
  c.keep_checkpoints = 2
  c.eval_every = 0  # steps between evaluations during training (0 = only at the end).
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.max_examples = 64  # per task (None = the whole split).
  c.eval.num_grid_examples = 4  # examples per task in the prediction grid image.
  c.eval.use_ema = True
  return c
