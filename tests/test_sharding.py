"""Mesh construction, logical-axis rules, and real sharding on 8 fake CPU devices (subprocess)."""
import os
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from dense_diffusion import sharding
import subprocess_env


class _FakeMesh:
  def __init__(self, **shape):
    self.shape = {"data": 1, "fsdp": 1, "tensor": 1, **shape}


def test_rules_map_logical_names_and_respect_divisibility():
  rules = sharding.ShardingRules(fsdp_largest_dim=False)
  mesh = _FakeMesh(fsdp=4, tensor=2)
  assert rules.spec(("embed", "mlp"), (64, 256), mesh) == P("fsdp", "tensor")
  assert rules.spec(("conv_height", "conv_width", "conv_in", "conv_out"), (3, 3, 32, 64),
                    mesh) == P(None, None, None, "fsdp")
  # 6 is not divisible by 4: replicated rather than an error at jit time.
  assert rules.spec(("embed", "mlp"), (6, 256), mesh) == P(None, "tensor")
  # A mesh axis is used once per array.
  assert rules.spec(("embed", "embed"), (64, 64), mesh) == P("fsdp", None)
  assert rules.spec(("norm",), (64,), mesh) == P(None)
  with pytest.raises(ValueError, match="do not match shape"):
    rules.spec(("embed",), (4, 4), mesh)


def test_fsdp_largest_dim_fallback():
  rules = sharding.ShardingRules(rules=(), fsdp_largest_dim=True, fsdp_min_size=100)
  mesh = _FakeMesh(fsdp=4)
  assert rules.spec(("a", "b"), (8, 64), mesh) == P(None, "fsdp")
  assert rules.spec(("a", "b"), (64, 6), mesh) == P("fsdp", None)
  assert rules.spec(("a",), (64,), mesh) == P(None)  # below fsdp_min_size


def test_rules_from_config_validates_axes():
  cfg = {"rules": [["embed", "tensor"], ["mlp", None]], "fsdp_largest_dim": False}
  rules = sharding.ShardingRules.from_config(cfg)
  assert rules.mesh_axis("embed") == "tensor" and rules.mesh_axis("mlp") is None
  with pytest.raises(ValueError, match="mesh axes are"):
    sharding.ShardingRules.from_config({"rules": [["embed", "model"]]})


def test_make_mesh_errors_say_what_to_change():
  n = len(jax.devices())
  with pytest.raises(ValueError, match=f"needs {2 * n} devices but {n} are available"):
    sharding.make_mesh({"data": 2 * n})
  with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
    sharding.make_mesh({"data": -1, "fsdp": -1})
  with pytest.raises(ValueError, match="unknown mesh axes"):
    sharding.make_mesh({"model": 1})
  mesh = sharding.make_mesh({"data": -1})
  assert mesh.shape == {"data": n, "fsdp": 1, "tensor": 1}


def test_global_batch_must_divide():
  mesh = sharding.make_mesh({"data": -1})
  assert sharding.check_global_batch(4 * len(jax.devices()), mesh) == 4 * len(jax.devices())


_EIGHT_DEVICES = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from dense_diffusion import sharding
    from dense_diffusion.models import layers

    assert len(jax.devices()) == 8
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    try:
      sharding.make_mesh({"data": 3, "fsdp": -1})
      raise SystemExit("expected a mesh error")
    except ValueError as e:
      assert "does not divide the 8 available" in str(e), e
    try:
      sharding.check_global_batch(12, mesh)
      raise SystemExit("expected a batch error")
    except ValueError as e:
      assert "multiple of 8" in str(e), e

    class Net(nnx.Module):
      def __init__(self, rngs):
        self.conv = layers.Conv2d(8, 64, 3, rngs=rngs)
        self.dense = layers.Dense(64, 256, rngs=rngs)
      def __call__(self, x):
        return self.dense(jax.nn.silu(self.conv(x))).mean()

    model = Net(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rules = sharding.ShardingRules()
    shardings = sharding.state_shardings(state, mesh, rules)
    x = np.random.default_rng(0).normal(size=(16, 8, 8, 8)).astype(np.float32)
    reference = float(nnx.merge(graphdef, state)(x))

    with jax.set_mesh(mesh):
      sharded_state = jax.device_put(state, shardings)
      xs = jax.device_put(x, sharding.batch_sharding(mesh))
      @jax.jit
      def loss(state, x):
        return nnx.merge(graphdef, state)(x)
      value = float(loss(sharded_state, xs))
    np.testing.assert_allclose(value, reference, rtol=1e-5)
    kernel = sharded_state["dense"]["kernel"][...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None), kernel.sharding
    assert sharding.per_device_bytes(kernel) * 4 == kernel.nbytes
    conv = sharded_state["conv"]["kernel"][...]
    assert sharding.per_device_bytes(conv) * 4 == conv.nbytes
    assert xs.sharding.spec[0] == ("data", "fsdp")
    assert sharding.per_device_bytes(xs) * 8 == xs.nbytes

    # Activation constraints: "batch" over the batch axes that divide it, "mlp" over tensor.
    mesh3 = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    names = ("batch", None, "mlp")
    with jax.set_mesh(mesh3):
      constrained = jax.jit(lambda x: sharding.constrain(x * 2, names))
      y = constrained(np.ones((8, 3, 6), np.float32))
      assert tuple(y.sharding.spec) == (("data", "fsdp"), None, "tensor"), y.sharding.spec
      y = constrained(np.ones((6, 3, 5), np.float32))  # 6 rows: data only; 5 features: free
      assert tuple(y.sharding.spec)[0] in ("data", ("data",)), y.sharding.spec
      assert "tensor" not in str(y.sharding.spec), y.sharding.spec
      try:
        sharding.constrain(np.ones((8, 3)), ("batch", "channels"))
        raise SystemExit("expected an unknown-name error")
      except ValueError as e:
        assert "unknown activation name 'channels'" in str(e), e
    assert sharding.constrain(x, ("batch", None, None, "mlp")) is x  # no mesh: the identity
    print("OK")
""")


def test_real_sharding_on_eight_fake_devices():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess_env.run(subprocess_env.python_script(_EIGHT_DEVICES), capture_output=True,
                              env=env, timeout=300)
  assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
