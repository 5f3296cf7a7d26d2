"""Image matting and dichotomous image segmentation (GenPercept's foreground tasks) on a CPU.

    python -m dense_diffusion.main train --config configs/matting.py --workdir runs/matting \
        --config.input.data_dir=/tmp/tfds

Both tasks at once on `synthetic_scenes` (the composite of a foreground object with an exact
soft alpha over a rendered room, datasets/synthetic_scenes/matte.py): `alpha_matte` answers the
alpha, `dichotomous` the object's binary mask. GenPercept's recipe (configs/onestep.py): one
UNet pass at the fixed timestep T - 1 predicts the answer from the image; here a tiny UNet from
scratch in pixel space (configs/tiny.py's): its 200 steps, rendering and evaluation included,
took 141 CPU-seconds on a 2-core VM (docs/tasks.md has what it reaches). `arg`: `res` (image size: 32) and `data` (the
synthetic_scenes config: res32, 512 training scenes).
"""
from configs import demo
from configs import onestep
from dense_diffusion.datasets import readers

TASKS = ("alpha_matte", "dichotomous")


def get_config(arg=None):
  arg = demo.parse_arg(arg, res=32, data="res32")
  c = onestep.get_config(f"res={arg.res}")
  c.tasks = TASKS
  c.input.entries = [readers.synthetic_scenes(t, config=arg.data) for t in TASKS]
  c.input.shuffle_buffer = 512  # the whole res32 training split.
  c.task_loss_weights = {}  # equal weights.
  c.total_steps = 200  # optimizer steps.
  c.batch_size = 8  # global batch.
  c.model.unet = dict(  # diffusers UNet2DConditionModel keys; 2 levels, 16/32 channels.
      sample_size=arg.res,  # the image size; in/out channels follow the space (model.latent).
      block_out_channels=[16, 32], layers_per_block=1,
      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
      cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
      num_class_embeds=len(TASKS))  # the task as a class label (configs/demo.py).
  c.model.num_task_tokens = 2  # learned tokens per task.
  c.model.image_encoder = dict(  # CLIP-layout ViT: 1 layer, 16 patch tokens.
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
      image_size=arg.res, patch_size=arg.res // 4)
  c.model.input_residual = False  # the answers are not corrections of the input image.
  # GenPercept's loss on the decoded answer: each task's `image_loss` (the matte's L1, as the
  # matting literature; MSE for the mask). With the MSE the matte's background keeps a haze
  # that SAD sums over the image: at 160 steps SAD was 0.114 with it, 0.085 with the L1
  # (all-background baseline 0.129; docs/tasks.md).
  c.diffusion.loss_space = "image"
  c.optimizer.lr = 4e-3  # peak learning rate (AdamW).
  c.optimizer.warmup_steps = 20  # linear warm-up, then cosine decay.
  c.log_every = 50  # steps between console / TensorBoard metrics.
  c.checkpoint_every = 1000  # steps between checkpoints (and one at the end).
  c.eval.batch_size = 32
  c.eval.max_examples = 64  # per task: the whole res32 validation split.
  c.eval.num_grid_examples = 4  # examples per task in the prediction grid.
  return c
