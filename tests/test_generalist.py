"""GeneralistModel's input residual: the answer is unet(...) + gate[task] * image."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import demo
from dense_diffusion import errors
from dense_diffusion import experiment
from dense_diffusion import tasks
from dense_diffusion.experiment import model as model_lib
from dense_diffusion.experiment import trainable as trainable_lib
from dense_diffusion.models import generalist

UNET = dict(sample_size=8, in_channels=6, out_channels=3, block_out_channels=[8, 16],
            layers_per_block=1, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], cross_attention_dim=8,
            attention_head_dim=4, norm_num_groups=4)
TASKS = ("depth", "denoise", "derain", "albedo")
TASK_OBJECTS = [tasks.get(n) for n in TASKS]


@pytest.fixture(scope="module")
def model():
  config = ml_collections.ConfigDict(dict(unet=UNET, input_residual=True, num_task_tokens=2))
  return model_lib.build_model(config, TASK_OBJECTS, seed=0)


def _inputs(batch=4):
  keys = jax.random.split(jax.random.key(1), 2)
  x_t = jax.random.normal(keys[0], (batch, 8, 8, 3))
  image = jax.random.uniform(keys[1], (batch, 8, 8, 3), minval=-1, maxval=1)
  return x_t, jnp.full((batch,), 500, jnp.int32), image, jnp.arange(batch, dtype=jnp.int32)


def test_gates_start_at_one_where_the_input_estimates_the_answer(model):
  np.testing.assert_array_equal(model.input_residual_gate[...],
                                np.array([[0.0] * 3, [1.0] * 3, [1.0] * 3, [0.0] * 3]))


@pytest.fixture(scope="module")
def forward_and_grads(model):
  """One jitted program: the model's output, the bare UNet's, and the gradient of a loss."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def run(params, x_t, t, image, task):
    m = nnx.merge(graphdef, params, rest)
    out = m(x_t, t, image, task)
    unet_only = m.unet(jnp.concatenate([x_t, image], -1), t, m.context(image, task))
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(x_t, t, image, task) ** 2)
    return out, unet_only, jax.grad(loss)(params)

  inputs = _inputs()
  return inputs, run(params, *inputs)


def test_output_is_unet_plus_gated_input(forward_and_grads):
  (_, _, image, _), (with_residual, unet_only, _) = forward_and_grads
  gate = np.array([0.0, 1.0, 1.0, 0.0])[:, None, None, None]
  np.testing.assert_allclose(with_residual, unet_only + gate * image, atol=1e-6)


def test_gate_is_trained(forward_and_grads):
  _, (_, _, grads) = forward_and_grads
  gate_grad = np.asarray(grads["input_residual_gate"][...])
  # Every task of the batch pulls on its own row of gates.
  assert np.all(np.abs(gate_grad).sum(axis=1) > 0), gate_grad


def test_no_residual_without_the_option():
  config = ml_collections.ConfigDict(dict(unet=UNET, num_task_tokens=2))
  assert model_lib.input_residual_init(config, []) is None
  m = generalist.GeneralistModel(UNET, num_tasks=2, rngs=nnx.Rngs(0))
  assert m.input_residual_gate is None


def test_bad_residual_init_length_raises():
  with pytest.raises(ValueError, match="one value per task"):
    generalist.GeneralistModel(UNET, num_tasks=2, input_residual_init=[1.0, 0.0, 0.0],
                               rngs=nnx.Rngs(0))


def test_residual_with_a_noise_or_v_parameterisation_fails_at_setup():
  config = demo.get_config()
  config.diffusion.prediction_type = "v_prediction"
  with pytest.raises(ValueError, match="input_residual.*prediction_type='sample'"):
    experiment.Experiment(config)


def test_zero_init_output_starts_at_the_gated_input():
  config = ml_collections.ConfigDict(dict(unet=UNET, input_residual=True, num_task_tokens=2,
                                          zero_init_output=True))
  m = model_lib.build_model(config, TASK_OBJECTS, seed=0)
  x_t, t, image, task = _inputs()
  gate = np.array([0.0, 1.0, 1.0, 0.0])[:, None, None, None]
  np.testing.assert_array_equal(m(x_t, t, image, task), gate * np.asarray(image))
  assert np.abs(np.asarray(m.unet.conv_in.kernel[...])).sum() > 0  # only conv_out is zeroed


def test_zero_init_output_refuses_a_pretrained_unet(tmp_path):
  config = ml_collections.ConfigDict(dict(unet=UNET, zero_init_output=True,
                                          pretrained_unet=str(tmp_path)))
  with pytest.raises(ValueError, match="zero_init_output would discard"):
    model_lib.build_model(config, TASK_OBJECTS, seed=0)


def test_a_zeroed_output_trains_with_lora_and_adapters_alone_are_refused():
  """LoRA-only training would never move a zeroed (random) conv_out: the trainable set's default
  for LoRA runs trains it, and an adapters-only set is refused unless said explicitly."""
  config = ml_collections.ConfigDict(dict(unet=UNET, zero_init_output=True, lora=dict(rank=2),
                                          trainable=None))
  provenance = trainable_lib.Provenance()
  model = model_lib.build_model(config, TASK_OBJECTS, seed=0, provenance=provenance)
  assert "unet/conv_out/kernel" in trainable_lib.select(model, config, provenance).names
  config.trainable = ["lora"]
  chosen = trainable_lib.select(model, config, provenance)
  assert "unet/conv_out/kernel" not in chosen.names
  with pytest.raises(errors.ConfigError, match=r"allow_frozen_fresh=\('task_embedding', 'unet'\)"):
    chosen.check_fresh_frozen([])
  chosen.check_fresh_frozen(["unet", "task_embedding"])


def test_task_is_the_class_label_of_a_unet_with_class_embeddings():
  """With `num_class_embeds` = number of tasks, the task index reaches the timestep embedding:
  the model equals its UNet called with class_labels=task, and a wrong count fails at build."""
  unet_config = dict(UNET, num_class_embeds=len(TASKS))
  config = ml_collections.ConfigDict(dict(unet=unet_config, num_task_tokens=2))
  m = model_lib.build_model(config, TASK_OBJECTS, seed=0)
  x_t, t, image, task = _inputs()
  sample = jnp.concatenate([x_t, image], -1)
  expected = m.unet(sample, t, m.context(image, task), class_labels=task)
  np.testing.assert_allclose(m(x_t, t, image, task), expected, atol=1e-6)
  # Same context tokens, another class label: the class embedding alone changes the answer.
  relabelled = m.unet(sample, t, m.context(image, task), class_labels=(task + 1) % len(TASKS))
  assert np.abs(np.asarray(relabelled - expected)).max() > 1e-4
  with pytest.raises(ValueError, match="num_class_embeds=3 must equal the number of tasks"):
    generalist.GeneralistModel(dict(UNET, num_class_embeds=3), num_tasks=4, rngs=nnx.Rngs(0))


def test_the_prompts_pooled_embedding_is_projected_into_the_timestep_embedding():
  """With `class_embed_type="projection"` the UNet's class_labels are the prompt's pooled
  embedding: the mean of the task's learned tokens (no class label), or a text encoder's pooled
  embeddings when given; their width must be the projection's."""
  unet_config = dict(UNET, class_embed_type="projection")
  config = ml_collections.ConfigDict(dict(unet=unet_config, num_task_tokens=2))
  m = model_lib.build_model(config, TASK_OBJECTS, seed=0)
  assert m.unet.config["projection_class_embeddings_input_dim"] == UNET["cross_attention_dim"]
  x_t, t, image, task = _inputs()
  sample = jnp.concatenate([x_t, image], -1)
  pooled = np.asarray(m.task_embedding[...]).mean(axis=1)[np.asarray(task)]
  expected = m.unet(sample, t, m.context(image, task), class_labels=pooled)
  np.testing.assert_allclose(m(x_t, t, image, task), expected, atol=1e-6)
  elsewhere = m.unet(sample, t, m.context(image, task), class_labels=pooled[::-1])
  assert np.abs(np.asarray(elsewhere - expected)).max() > 1e-4
  projected = dict(UNET, class_embed_type="projection", projection_class_embeddings_input_dim=8)
  prompts = np.random.default_rng(0).standard_normal((4, 3, 8)).astype(np.float32)
  frozen = generalist.GeneralistModel(projected, num_tasks=4, prompt_embeddings=prompts,
                                      pooled_prompt_embeddings=prompts[:, -1], rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(frozen.class_labels(task), prompts[np.asarray(task), -1])
  with pytest.raises(ValueError, match="pass pooled_prompt_embeddings"):
    generalist.GeneralistModel(projected, num_tasks=4, prompt_embeddings=prompts,
                               rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="projection_class_embeddings_input_dim=8 must equal"):
    generalist.GeneralistModel(projected, num_tasks=4, prompt_embeddings=prompts,
                               pooled_prompt_embeddings=prompts[:, -1, :4], rngs=nnx.Rngs(0))
