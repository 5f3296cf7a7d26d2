"""DMP-style interpolation (Lee et al. 2024): the image takes the place of the noise.

    python -m dense_diffusion.main train --config configs/dmp.py --workdir runs/dmp
    # DMP's set-up: a folder of images labelled by teachers (docs/data.md, "Pseudo-labelled
    # sets"), then LoRA on SD weights in SD's latent space, evaluated on NYUv2 and ADE20K.
    python -m dense_diffusion.main pseudo-label --input bedrooms/ --output /data/tfds \
        --teacher depth=runs/depth,normals=runs/normals,semantic=runs/ade \
        --teacher albedo=weights/marigold-iid-lighting,shading=weights/marigold-iid-lighting
    python -m dense_diffusion.main train \
        --config configs/dmp.py:real=1,data=/data/tfds/pseudo_labelled/bedrooms \
        --config.model.pretrained_unet=weights/sd2 --config.model.vae.pretrained=weights/sd2 \
        --config.input.data_dir=/data/tfds --workdir runs/dmp_bedrooms

z_t = sqrt(a_t) y + sqrt(1 - a_t) x (y: the answer, x: the image), v-prediction on Stable
Diffusion's scaled_linear schedule, 5 DDIM steps from z_T = x. What trains is the trainable-set
default of a LoRA run (docs/training.md, "What trains"): LoRA adapters (rank 4) on the UNet's
attention projections, and every parameter without a pretrained value. With SD weights
(`real=1`) those are the widened `conv_in`, the image encoder's projection and the task tokens
(and the RGB `conv_out` in pixel space), while the pretrained kernels stay as they are; the
synthetic and tiny set-ups have no pretrained UNet, so there the whole (random) UNet trains
beside its adapters.

`arg`:
- `real`: 0, DMP's five tasks on synthetic_scenes (the small set-up of configs/demo.py); 1,
  DMP's set-up: the five tasks on a pseudo-labelled set (`main pseudo-label`), the SD2-size
  network of configs/generalist_pixel128.py in SD's latent space, DMP's batch 8 and 50K steps
  (rounded up to a batch that shards on `chips` devices, with as many examples: see `chips`),
  evaluated out of domain on NYUv2 (depth) and ADE20K (semantic, when the labels have its 150
  classes); normals, albedo and shading are scored with `main eval --protocol` on a folder
  (docs/evaluation.md).
- `data` (real=1): the pseudo-labelled set's folder, DATA_DIR/pseudo_labelled/NAME (what
  pseudo-label printed); its entries read DATA_DIR, with the task options its labels are in.
  Default: pseudo_labelled/bedrooms in config.input.data_dir, labelled as `DMP_LABELS` says
  (checked against the set when training starts).
- `tiny`: 1, test size: configs/tiny.py's network and a random frozen VAE (plumbing only); with
  real=1 the out-of-domain evaluation is synthetic_scenes/tiny<res> (NYUv2 and ADE20K are not
  at hand).
- `res` (image size), `rank` (LoRA rank), `latent` (0: pixels, 1: the VAE's latents; default
  1 with real=1, as DMP, else 0). With real=1 the VAE is SD's (`model.vae.pretrained`); on
  synthetic_scenes, the small VAE of configs/synthetic_vae.py trained on first use and cached
  (`model.vae.recipe`).
- `chips` (real=1): the data-parallel devices the batch must shard on (16: a v5e-16, whose
  batch 16 also shards on a v5p-8; 1 on one GPU: DMP's batch 8).
"""
import math

from configs import demo
from configs import generalist_pixel128
from configs import tiny as tiny_config
from dense_diffusion.datasets import readers
from dense_diffusion.datasets.synthetic_scenes import renderer

DMP_BATCH = 8  # DMP's global batch ...
DMP_STEPS = 50_000  # ... and steps.

# The tasks of DMP's paper (Lee et al. 2024, Table 1), all rendered by synthetic_scenes.
DMP_TASKS = ("depth", "normals", "semantic", "albedo", "shading")
# real=1 without data=: the set pseudo_labelled/DEFAULT_SET whose labels are in these options:
# metric depth to 8 m (DMP encodes depth as 2 d / 8 - 1), ADE20K's 150 classes (unnamed), shading
# in [0, 1]. pseudo-label records the options of its teachers; training checks them.
DEFAULT_SET = "bedrooms"
DMP_LABELS = {"depth": {"min_depth": 0.0, "max_depth": 8.0, "affine_invariant": False},
              "normals": {}, "semantic": {"num_classes": 150, "categories": []},
              "albedo": {}, "shading": {"max_shading": 1.0}}
NYU_MAX_DEPTH = 10.0  # metres: NYUv2's range, where relative depth is scored after alignment.


def get_config(arg=None):
  arg = demo.parse_arg(arg, real=0, res=0, rank=4, latent=-1, data="", tiny=0, chips=16)
  if arg.data and not arg.real:
    raise ValueError("data= names the pseudo-labelled set of real=1")
  latent = arg.real if arg.latent < 0 else arg.latent
  res = arg.res or (128 if arg.real and not arg.tiny else 32)
  if arg.tiny:
    c = tiny_config.get_config(f"res={res}")
  elif arg.real:
    c = generalist_pixel128.get_config(f"res={res}")
    c.model.vae.dtype = "bfloat16"  # frozen VAE at half precision on accelerators.
  else:
    c = demo.get_config(f"res={res}")
  c.tasks = DMP_TASKS
  c.task_loss_weights = {}  # demo's weights are for restoration and instance centres.
  if arg.real:
    c.input.entries = _pseudo_labelled_entries(arg.data, res)
    options = {e["task"]: dict(e["task_options"]) for e in c.input.entries}
    c.eval.entries = (_synthetic_eval(options, res) if arg.tiny else _nyu_ade_eval(options, res))
  else:
    c.input.entries = readers.synthetic_mixture(
        DMP_TASKS, config=f"{'tiny' if arg.tiny else 'res'}{res}")
  if arg.real and not arg.tiny:
    # DMP's batch 8 where it shards, else the least multiple of `chips` (16 on a v5e-16), with
    # DMP's 50K steps scaled to as many examples (lr 1e-4 cosine: the base config's).
    c.batch_size = math.lcm(DMP_BATCH, arg.chips)
    c.total_steps = DMP_STEPS * DMP_BATCH // c.batch_size
    # Per entry, examples held encoded while shuffled: the five entries read one set.
    c.input.shuffle_buffer = 1_000
  else:
    demo.task_as_class_label(c)  # the conditioning this recipe was measured with.
  if arg.tiny:  # test size: a random frozen VAE, the latent path as plumbing only.
    c.model.vae.recipe = None
    c.model.vae.config = demo.SYNTHETIC_VAE
    c.model.allow_frozen_fresh = ("vae",)
  c.model.latent = bool(latent)  # pixels or the VAE's latents: the one switch.
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
  if not arg.real or arg.tiny:
    c.optimizer.lr = 1e-3  # LoRA from a random UNet: a larger step.
  return c


def _pseudo_labelled_entries(data: str, res: int) -> list:
  """The five tasks of the pseudo-labelled set `data` (its folder), or of DEFAULT_SET."""
  if data:
    return [readers.pseudo_labelled(t, path=data, resolution=res) for t in DMP_TASKS]
  return [readers.pseudo_labelled(t, name=DEFAULT_SET, task_options=DMP_LABELS[t],
                                  resolution=res) for t in DMP_TASKS]


def _depth_eval_options(train: dict, truth_max_depth: float) -> dict:
  """Depth options of an evaluation set whose truth reaches `truth_max_depth`: metric answers
  are decoded in the training range, relative ones scored after scale-and-shift alignment."""
  if train.get("affine_invariant"):
    return {"min_depth": 0.0, "max_depth": truth_max_depth, "affine_invariant": True}
  return dict(train)


def _nyu_ade_eval(options: dict, res: int) -> list:
  """Out of domain: NYUv2 depth; ADE20K semantic when the labels are ADE20K's 150 classes."""
  depth = _depth_eval_options(options["depth"], NYU_MAX_DEPTH)
  entries = [readers.nyu_depth_v2(res, max_depth=depth["max_depth"],
                                  affine_invariant=depth["affine_invariant"])]
  if options["semantic"].get("num_classes") == 150:
    ade = readers.ade20k(res)
    ade["task_options"] = dict(options["semantic"])
    entries.append(ade)
  return entries


def _synthetic_eval(options: dict, res: int) -> list:
  """Out of domain at test size: synthetic_scenes/tiny<res> (semantic when the labels have its
  classes)."""
  entries = []
  for task in DMP_TASKS:
    task_options = dict(options[task])
    if task == "depth":
      task_options = _depth_eval_options(task_options, readers.SYNTHETIC_MAX_DEPTH)
    if task == "semantic" and task_options.get("num_classes") != renderer.NUM_CLASSES:
      continue
    entries.append(readers.synthetic_scenes(task, config=f"tiny{res}", task_options=task_options))
  return entries
