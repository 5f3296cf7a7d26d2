"""A tiny config for tests: 32x32 synthetic scenes, 3 tasks, a UNet that compiles in seconds.

    python -m dense_diffusion.main train --config configs/tiny.py --workdir /tmp/tiny \
        --config.input.data_dir=/tmp/tfds

Derived from configs/demo.py (same keys), only smaller. `arg` may set `res` (32; the
`synthetic_scenes/tiny32` builder config has 16 train + 8 validation scenes).
"""
from ml_collections import config_dict

from configs import demo
from dense_diffusion.datasets import readers

TASKS = ("depth", "semantic", "denoise")


def get_config(arg=None):
  arg = demo.parse_arg(arg, res=32)
  c = demo.get_config(f"res={arg.res}")
  c.tasks = TASKS
  c.total_steps = 6  # optimizer steps.
  c.batch_size = 8  # global batch; divides data=2 x fsdp=4 in the multi-device test.
  c.input.data_dir = config_dict.placeholder(str)  # tests pass a tmp folder.
  c.input.entries = readers.synthetic_mixture(TASKS, config=f"tiny{arg.res}")
  c.input.shuffle_buffer = 16  # the whole tiny32 train split.
  c.task_loss_weights = {}  # equal weights (tests swap in other task lists).
  c.model.unet = dict(  # diffusers UNet2DConditionModel keys; 2 levels, 16/32 channels.
      sample_size=arg.res,  # the image size; in/out channels follow the space (model.latent).
      block_out_channels=[16, 32], layers_per_block=1,
      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
      cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
  c.model.num_task_tokens = 2  # learned tokens per task.
  c.model.image_encoder = dict(  # CLIP-layout ViT: 1 layer, 16 patch tokens.
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      image_size=arg.res, patch_size=8)
  c.diffusion.num_inference_steps = 2  # DDIM steps at evaluation.
  c.optimizer.warmup_steps = 2
  c.optimizer.lr = 1e-3  # peak learning rate (AdamW).
  c.sharding.fsdp_min_size = 256  # elements; small enough that the tiny UNet's kernels shard.
  c.log_every = 2  # steps between console / TensorBoard metrics.
  c.checkpoint_every = 2  # steps between checkpoints.
  c.keep_checkpoints = 3
  c.eval.batch_size = 8
  c.eval.max_examples = 8  # per task: the whole tiny32 validation split.
  c.eval.num_grid_examples = 2  # examples per task in the prediction grid.
  return c
