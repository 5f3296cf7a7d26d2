"""The real-data configs run from pretrained weights: generalist_pixel128, onestep real=1, dmp
real=1 and vpd_seg real=1 (VPD's Semantic FPN, class prompts, flip-averaged evaluation) pointed at a tiny Stable-Diffusion-2-style pipeline folder written by diffusers and
transformers (UNet, text encoder and tokenizer, CLIP vision tower, VAE, scheduler), on an ADE20K
folder tree prepared by the project's own TFDS builder, each trained, evaluated and predicted
for a few steps. Every other real=1 config (marigold, onestep's E2E-FT and dense-head variants,
dmp, vpd_depth, vpd_seg) is built from the same folder as shipped (its paradigm, space, tasks
and entries) and takes two train steps on tiny data in its own entries' datasets
(tfds.testing.mock_data at the real frame sizes; DMP's pseudo-labelled set made by its builder).
Also: the text-encoder layer the SD-2 config conditions on is the one diffusers' SD-2 pipeline
uses (transformers' hidden states)."""
import contextlib
import importlib
import json

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
import tensorflow as tf  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

from configs import dmp  # noqa: E402
from configs import generalist_pixel128  # noqa: E402
from configs import onestep  # noqa: E402
from configs import vpd_seg  # noqa: E402
from dense_diffusion import predict  # noqa: E402
from dense_diffusion import train  # noqa: E402
from dense_diffusion.datasets import readers  # noqa: E402
from dense_diffusion.experiment import model as model_lib  # noqa: E402

from test_text_encoder import _write_tiny_vocab  # noqa: E402  pylint: disable=wrong-import-position

RES = 32
CROSS = 16  # the text encoder's width = the UNet's cross_attention_dim, as in SD.
TASKS = ("semantic_ade20k",)  # ADE20K: a class task, the hardest for the encodings.
CONFIGS = {"generalist_pixel128": (generalist_pixel128, f"res={RES},batch=4"),
           "onestep_real": (onestep, f"real=1,res={RES}"),
           "dmp_real": (dmp, f"real=1,res={RES}"),
           # VPD's ADE20K set-up: class prompts through the text encoder, its Semantic FPN
           # head, flip averaging (and 512-pixel windows: one window at this size).
           "vpd_seg_real": (vpd_seg, f"real=1,res={RES}")}


@pytest.fixture(scope="module")
def sd2_folder(tmp_path_factory):
  """A tiny SD-2-style pipeline folder (v-prediction, linear projections, OpenCLIP-style text
  encoder whose last layer is already dropped, as diffusers' SD-2 folders), plus a CLIP vision
  tower in image_encoder/."""
  root = tmp_path_factory.mktemp("sd2")
  _write_tiny_vocab(root / "vocab", "!")  # SD-2 pads with "!".
  tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "vocab")
  torch.manual_seed(0)
  unet = diffusers.UNet2DConditionModel(
      sample_size=RES // 4, in_channels=4, out_channels=4, block_out_channels=(16, 32),
      layers_per_block=1, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",
                                                               "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS,
      attention_head_dim=(2, 4), use_linear_projection=True)
  vae = diffusers.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, latent_channels=4,
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2)
  text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=CROSS, intermediate_size=24, num_hidden_layers=2,
      num_attention_heads=2, max_position_embeddings=12, hidden_act="gelu",
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)).eval()
  scheduler = diffusers.DDIMScheduler(
      beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
      prediction_type="v_prediction", set_alpha_to_one=False, steps_offset=1)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(root / "pipe")
  vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
      image_size=16, patch_size=8))
  vision.save_pretrained(root / "pipe" / "image_encoder")
  return root / "pipe", pipe


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """ADE20K, prepared by our builder from a tiny folder tree in its real layout."""
  root = tmp_path_factory.mktemp("real_data")
  rng = np.random.default_rng(0)

  def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
  for folder, n in (("training", 4), ("validation", 2)):
    for i in range(n):
      stem = f"ADE_{folder[:3]}_{i:08d}"
      save(root / "manual_ade" / "ADEChallengeData2016" / "images" / folder / f"{stem}.jpg",
           rng.integers(0, 256, (36, 48, 3), np.uint8))
      save(root / "manual_ade" / "ADEChallengeData2016" / "annotations" / folder /
           f"{stem}.png", rng.integers(0, 151, (36, 48), np.uint8))
  tfds.builder("ade20k", data_dir=str(root / "tfds")).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(root / "manual_ade")))
  return root / "tfds"


def _shrunk(name, folder, data_dir):
  """The config at toy size: the pipeline's weights, two tasks, a few steps."""
  module, arg = CONFIGS[name]
  c = module.get_config(arg)
  c.tasks = TASKS
  c.input.entries = [readers.ade20k(RES)]
  c.eval.entries = [readers.ade20k(RES)]  # evaluated on what it trains (onestep's is NYUv2).
  c.input.data_dir = str(data_dir)
  c.input.shuffle_buffer = 4
  c.model.pretrained_unet = str(folder)
  c.model.text_encoder = str(folder)
  if c.model.latent:  # dmp real=1 works in SD's latent space: the pipeline's VAE.
    c.model.vae.pretrained = str(folder)
  c.model.dtype = "float32"  # bf16 is for accelerators; the CPU runs it slowly.
  assert c.model.remat  # kept: training recomputes the blocks, the sampler runs them plainly.
  if c.model.get("image_encoder"):
    c.model.image_encoder = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, image_size=16, patch_size=8)
    c.model.pretrained_image_encoder = str(folder)
  c.batch_size = 4
  c.total_steps = 2
  c.optimizer.warmup_steps = 1
  c.log_every = 1
  c.checkpoint_every = 2
  c.eval_every = 2
  c.eval.batch_size = 2
  c.eval.max_examples = 2
  c.diffusion.num_inference_steps = min(2, int(c.diffusion.num_inference_steps))
  return c


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_real_config_trains_evaluates_and_predicts(name, sd2_folder, data_dir, tmp_path, capsys):
  folder, _ = sd2_folder
  config = _shrunk(name, folder, data_dir)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  printed = capsys.readouterr().out
  assert set(results) == set(TASKS)
  for task, values in results.items():
    assert np.isfinite(values[values["headline"]]), (task, values)
  # The trainable-set summary: the pretrained UNet kernels are in, and for LoRA frozen.
  unet_row = next(line.split() for line in printed.splitlines() if line.strip().startswith("unet"))
  trained, frozen, fresh, pretrained = (int(x.replace(",", "")) for x in unet_row[1:])
  # Widened conv_in and the RGB conv_out are fresh; VPD's backbone takes the latent as it is.
  assert pretrained > fresh and (fresh > 0) == (name != "vpd_seg_real")
  assert (frozen > 0) == (name == "dmp_real")
  image = tmp_path / "photo.png"
  Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 36, 3), np.uint8)).save(image)
  summary = predict.Predictor(str(tmp_path / "run"), batch_size=1).run(
      "semantic_ade20k", [image], tmp_path / "out", log=lambda s: None)
  assert summary.written == 1
  answer = Image.open(tmp_path / "out" / "photo_semantic_ade20k.png")
  assert answer.size == (36, 24)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["pretrained_unet"] == str(folder)


def test_sd2_text_layer_is_the_pipelines(sd2_folder):
  """diffusers' SD-2 pipeline conditions on the text encoder's last hidden state (after the
  final layer norm) of a folder that already dropped OpenCLIP's last layer: text_skip_layers=0."""
  folder, pipe = sd2_folder
  config = generalist_pixel128.get_config(f"res={RES}")
  config.model.text_encoder = str(folder)
  prompts = ["depth", "perform a form"]
  ours = model_lib.prompt_embeddings(config.model, prompts)
  with torch.no_grad():
    want, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=12, truncation=True,
                         return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True)
    penultimate = pipe.text_encoder.final_layer_norm(hidden.hidden_states[-2]).numpy()
  np.testing.assert_allclose(ours, want.numpy(), atol=1e-5)
  np.testing.assert_allclose(ours, hidden.last_hidden_state.numpy(), atol=1e-5)
  # The penultimate layer (what text_skip_layers=1 gave) is another tensor.
  assert np.abs(ours - penultimate).max() > 1e-2


# -- every real=1 config: built from the stand-in weights, one train step on its own entries ------

# Every config with a real=1 set-up (configs/*.py), at the test's image size; each keeps its
# paradigm, space, tasks and input entries. Above, generalist_pixel128 (every dataset at once)
# and onestep real=1 (in pixels; its entries are marigold's) train, evaluate and predict on
# ADE20K; here the rest take steps on their own entries.
REAL_CONFIGS = {
    "marigold": ("marigold", f"real=1,res={RES}"),
    "onestep_latent_image_loss": ("onestep", f"real=1,res={RES},latent=1,loss=image"),  # GenPercept
    # GenPercept's dense heads on SD latents (in pixels the backbone would see 3 channels, and
    # SD's 4-channel conv_in cannot be narrowed to them).
    "onestep_head": ("onestep", f"real=1,res={RES},head=1,latent=1"),
    "dmp": ("dmp", f"real=1,res={RES}"),
    "vpd_depth": ("vpd_depth", f"real=1,res={RES}"),
    # vpd_seg real=1 trains, evaluates and predicts above (vpd_seg_real).
}
# Frame sizes of the mocked datasets: the entries' crops are the real sets' (Hypersim's 768 x 768
# crop of 768 x 1024 renders, NYUv2's Eigen crop of 480 x 640, ...).
MOCK_SIZES = {"hypersim": (768, 1024), "vkitti2": (375, 1242), "nyu_depth_v2": (480, 640),
              "ade20k": (36, 48)}
MOCK_EXAMPLES = 4


def _mock_split(self, split, decoders=None, read_config=None, **kwargs):
  """tfds mock_data's reader: MOCK_EXAMPLES random examples of the builder's own features at its
  dataset's frame size (depth 0.5-8 m, ADE20K classes 0-150, PNG bytes where the pipeline reads
  images undecoded)."""
  del split, kwargs
  rng = np.random.default_rng(0)
  height, width = MOCK_SIZES[self.name]
  if isinstance(decoders, tfds.decode.PartialDecoding):  # entries that list their features
    decoders = decoders.decoders
  decoders = decoders or {}
  examples = {}
  for key, feature in self.info.features.items():
    if isinstance(feature, tfds.features.Image):
      high = 151 if key == "semantic" else 256
      arrays = [rng.integers(0, high, (height, width, feature.shape[-1]), np.uint8)
                for _ in range(MOCK_EXAMPLES)]
      if isinstance(decoders.get(key), tfds.decode.SkipDecoding):
        arrays = [tf.io.encode_png(a).numpy() for a in arrays]
      examples[key] = arrays
    elif isinstance(feature, tfds.features.Text):
      examples[key] = [f"example_{i}" for i in range(MOCK_EXAMPLES)]
    else:  # depth maps
      examples[key] = [rng.uniform(0.5, 8.0, (height, width)).astype(feature.np_dtype)
                       for _ in range(MOCK_EXAMPLES)]
  ds = tf.data.Dataset.from_tensor_slices(examples)
  if read_config and read_config.add_tfds_id:
    ds = ds.enumerate().map(lambda i, e: {**e, "tfds_id": tf.strings.as_string(i)})
  return ds


@pytest.fixture(scope="module")
def bedrooms(tmp_path_factory):
  """configs/dmp.py's default set, pseudo_labelled/bedrooms, made by its builder: 4 images with
  labels in DMP_LABELS' options."""
  from dense_diffusion import tasks as tasks_lib
  from dense_diffusion.datasets.pseudo_labelled import pseudo_labelled as builder
  root = tmp_path_factory.mktemp("pseudo")
  rng = np.random.default_rng(0)
  for i in range(MOCK_EXAMPLES):
    labels = {"depth": rng.uniform(0.5, 7.5, (36, 48)), "normals": rng.normal(size=(36, 48, 3)),
              "semantic": rng.integers(0, 150, (36, 48)),
              "albedo": rng.uniform(0, 1, (36, 48, 3)), "shading": rng.uniform(0, 1, (36, 48))}
    stored = {t: builder.label_format(t).store(a, tasks_lib.get(t, **dmp.DMP_LABELS[t]))
              for t, a in labels.items()}
    builder.write_example(root / "staging", f"room_{i}.jpg",
                          rng.integers(0, 256, (36, 48, 3), np.uint8), stored)
  config = builder.PseudoLabelledConfig(
      name=dmp.DEFAULT_SET, tasks=dmp.DMP_TASKS, task_options=dmp.DMP_LABELS,
      teachers={t: "stand-in" for t in dmp.DMP_TASKS})
  builder.build(config, root / "staging", root / "tfds")
  return root / "tfds"


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_every_real_config_takes_train_steps(name, sd2_folder, bedrooms, tmp_path):
  """Each real=1 config as shipped, with the tiny pipeline's weights and tiny data in its own
  entries' datasets: built (paradigm, space, tasks, entries its own) and trained two steps."""
  import jax  # pylint: disable=g-import-not-at-top
  from dense_diffusion import experiment  # pylint: disable=g-import-not-at-top
  from dense_diffusion import input_pipeline  # pylint: disable=g-import-not-at-top
  folder, _ = sd2_folder
  module, arg = REAL_CONFIGS[name]
  config = importlib.import_module(f"configs.{module}").get_config(arg)
  structure = (config.diffusion.mode, "latent" if config.model.latent else "pixel",
               tuple(config.tasks), [(e["dataset"], e["task"]) for e in config.input.entries])
  config.model.pretrained_unet = str(folder)
  if config.model.latent:
    config.model.vae.pretrained = str(folder)
  config.model.text_encoder = str(folder)
  if config.model.get("image_encoder"):
    config.model.image_encoder = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, image_size=16, patch_size=8)
    config.model.pretrained_image_encoder = str(folder)
  config.model.dtype = "float32"  # bf16 is for accelerators; the CPU runs it slowly.
  config.model.vae.dtype = None
  # Rematerialisation only changes what the backward pass keeps (the runs above keep it): off,
  # the step compiles in about half the time.
  config.model.remat = "none"
  config.model.vae.remat_decoder = False
  config.batch_size = 2
  config.optimizer.warmup_steps = 1
  config.input.data_dir = str(bedrooms if name == "dmp" else tmp_path)
  exp = experiment.Experiment(config)
  assert (exp.paradigm.name, exp.space.name, tuple(exp.task_names),
          [(e["dataset"], e["task"]) for e in config.input.entries]) == structure
  # The real sets are mocked (tfds.testing.mock_data); dmp's pseudo-labelled set is real.
  mocked = (contextlib.nullcontext() if name == "dmp" else
            tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, as_dataset_fn=_mock_split))
  with mocked:
    batch = next(iter(tfds.as_numpy(input_pipeline.get_train_dataset(
        list(config.input.entries), exp.task_names, 2, data_dir=config.input.data_dir,
        process_index=0, process_count=1, shuffle_buffer=2))))
  before = jax.tree.map(np.asarray, exp.state.params)
  with jax.set_mesh(exp.mesh):  # two steps: the learning rate's warmup starts at 0.
    for _ in range(2):
      exp.state, metrics = exp.train_step(exp.state, exp.frozen, exp.device_batch(batch))
      assert np.isfinite(float(metrics["loss"])), metrics
  assert int(exp.state.nonfinite_steps) == 0
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), before,
                                       exp.state.params))
  assert any(moved)
