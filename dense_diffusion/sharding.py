"""Device mesh, logical-axis rules, and the shardings of parameters, optimizer state and batches.

Parameters carry logical axis names (docs/sharding.md). Rules map each logical name to a mesh
axis of `("data", "fsdp", "tensor")`. Programs run under `jax.set_mesh(mesh)` with `jax.jit`
in/out shardings built here (no pmap, no pjit, no `with mesh:`).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dense_diffusion import errors

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallel too.

# logical axis name -> mesh axis (None = replicated). The first matching rule wins.
DEFAULT_RULES: tuple[tuple[str, Optional[str]], ...] = (
    ("conv_out", "fsdp"),
    ("embed", "fsdp"),
    ("context", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", None),
    ("conv_height", None),
    ("conv_width", None),
    ("norm", None),
    ("vocab", None),
    ("position", None),
    ("lora_rank", None),
)


def make_mesh(shape: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None
              ) -> jax.sharding.Mesh:
  """Builds the ("data", "fsdp", "tensor") mesh; one size may be -1 (= all remaining devices).

  Raises ConfigError saying what to change when the sizes do not fit the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise errors.ConfigError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
  sizes = [int(shape.get(axis, 1)) for axis in MESH_AXES]
  n = len(devices)
  if sizes.count(-1) > 1:
    raise errors.ConfigError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  if any(s == 0 or s < -1 for s in sizes):
    raise errors.ConfigError(
        f"mesh sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise errors.ConfigError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes use {known} devices, which does not "
          f"divide the {n} available; change config.mesh so that their product divides {n}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise errors.ConfigError(
        f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {n} are "
        f"available; change config.mesh (e.g. set one axis to -1)")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many shards a batch is split into: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_global_batch(global_batch: int, mesh: jax.sharding.Mesh) -> int:
  """Returns the per-process batch; raises when the batch does not divide the batch axes."""
  shards = batch_shards(mesh)
  if global_batch % shards:
    raise errors.ConfigError(
        f"global batch {global_batch} does not divide across the {shards} data-parallel shards "
        f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}); set config.batch_size to "
        f"a multiple of {shards}")
  if global_batch % jax.process_count():
    raise errors.ConfigError(f"global batch {global_batch} does not divide across "
                             f"{jax.process_count()} processes")
  return global_batch // jax.process_count()


@dataclasses.dataclass(frozen=True)
class ShardingRules:
  """How logical names become mesh axes.

  rules: (logical name, mesh axis or None) pairs, first match wins; names not listed replicate.
  fsdp_largest_dim: parameters that the rules leave unsharded over "fsdp" are sharded over it on
    their largest divisible dimension (ZeRO-3 style), when they have at least `fsdp_min_size`
    elements; small tensors (biases, norms) stay replicated.
  """

  rules: tuple[tuple[str, Optional[str]], ...] = DEFAULT_RULES
  fsdp_largest_dim: bool = True
  fsdp_min_size: int = 2**14

  @classmethod
  def from_config(cls, config: Any) -> "ShardingRules":
    """Reads `config.sharding` = {rules: [[name, axis], ...], fsdp_largest_dim, fsdp_min_size}."""
    if config is None:
      return cls()
    rules = tuple((str(a), None if b in (None, "None", "") else str(b))
                  for a, b in config.get("rules", DEFAULT_RULES))
    for name, axis in rules:
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"sharding rule {name!r} -> {axis!r}: mesh axes are {MESH_AXES}")
    return cls(rules=rules, fsdp_largest_dim=bool(config.get("fsdp_largest_dim", True)),
               fsdp_min_size=int(config.get("fsdp_min_size", 2**14)))

  def mesh_axis(self, logical: Optional[str]) -> Optional[str]:
    for name, axis in self.rules:
      if name == logical:
        return axis
    return None

  def spec(self, logical: Sequence[Optional[str]], shape: Sequence[int],
           mesh: jax.sharding.Mesh) -> P:
    """PartitionSpec of one array from its logical names and shape.

    A mesh axis is used at most once per array, and only on a dimension it divides; otherwise that
    dimension is replicated (it is a layout choice, never a numerical one).
    """
    if len(logical) != len(shape):
      raise ValueError(f"logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out: list[Optional[str]] = []
    for name, dim in zip(logical, shape):
      axis = self.mesh_axis(name)
      if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
        out.append(None)
        continue
      used.add(axis)
      out.append(axis)
    fsdp = mesh.shape["fsdp"]
    if (self.fsdp_largest_dim and "fsdp" not in used and fsdp > 1
        and math.prod(shape) >= self.fsdp_min_size):
      free = [i for i, d in enumerate(shape) if out[i] is None and d % fsdp == 0]
      if free:
        out[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*out)


def _is_spec(x) -> bool:
  return isinstance(x, P)


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: ShardingRules) -> Any:
  """NamedShardings for an `nnx.State` (or any pytree of nnx Variables / arrays).

  Logical names come from the variables' `out_sharding` metadata (`nnx.get_partition_spec`);
  arrays without names (step counters, RNG keys, optimizer scalars) are replicated.
  """
  from flax import nnx

  specs = nnx.get_partition_spec(state)
  shapes = jax.tree.map(lambda x: np.shape(x), state)

  def one(spec, shape):
    if not isinstance(spec, P) or len(spec) != len(shape):
      return NamedSharding(mesh, P())
    return NamedSharding(mesh, rules.spec(tuple(spec), shape, mesh))

  return jax.tree.map(one, specs, shapes, is_leaf=_is_spec)


# Logical names of activation dimensions (`constrain`): "batch" is split over BATCH_AXES,
# "heads" / "mlp" over the mesh axis the rules give the parameters' "heads" / "mlp" (tensor
# parallelism: the same split as the kernels that make them), "replicated" is whole on every
# device of those axes; None leaves a dimension to the compiler.
ACTIVATION_NAMES = ("batch", "heads", "mlp", "replicated")


def constrain(x: jax.Array, names: Sequence[Optional[str]],
              rules: Optional["ShardingRules"] = None) -> jax.Array:
  """`with_sharding_constraint` of an activation by the logical names of its dimensions, under
  the mesh set with `jax.set_mesh`; the identity without a mesh (or on one device).

  For the few places where sharding propagation from the parameters alone picks a layout that
  costs activation traffic (docs/sharding.md). A name whose mesh axis is absent, of size 1,
  already used, or does not divide the dimension leaves that dimension to the compiler.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return x
  if len(names) != x.ndim:
    raise ValueError(f"activation names {tuple(names)} do not match shape {x.shape}")
  rules = rules or ShardingRules()
  used: set[str] = set()
  spec: list[Any] = []
  for name, dim in zip(names, x.shape):
    if name not in ACTIVATION_NAMES and name is not None:
      raise ValueError(f"unknown activation name {name!r}; known: {ACTIVATION_NAMES}")
    if name == "replicated":
      spec.append(None)
      continue
    candidates = BATCH_AXES if name == "batch" else (
        (rules.mesh_axis(name),) if name in ("heads", "mlp") else ())
    axes, shards = [], 1
    for axis in candidates:
      size = mesh.shape.get(axis, 1) if axis else 1
      if axis and axis not in used and size > 1 and dim % (shards * size) == 0:
        axes.append(axis)
        shards *= size
    used.update(axes)
    spec.append(tuple(axes) if axes else P.UNCONSTRAINED)
  return jax.lax.with_sharding_constraint(x, P(*spec))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int = 4) -> NamedSharding:
  """Sharding of a batch array [B, ...]: B over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full (e.g. an eval batch).

  Each process puts on its own devices the slices they hold in `sharding`, wherever those
  devices sit in the mesh. (Training batches, where each process holds only its own rows, use
  `jax.make_array_from_process_local_data` instead.)
  """
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
  """The whole value of `x` as numpy, on every process.

  Arrays spread over several processes are all-gathered across them, so with more than one
  process every process must call this for the same array (it is a collective).
  """
  if x.is_fully_addressable or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def per_device_bytes(array: jax.Array) -> int:
  """Bytes of the largest addressable shard of `array` (what one device holds)."""
  return max(s.data.nbytes for s in array.addressable_shards)


def describe(state: Any) -> str:
  """A short table of how many bytes of `state` each device holds, for logs."""
  leaves = [x for x in jax.tree.leaves(state) if isinstance(x, jax.Array)]
  total = sum(x.nbytes for x in leaves)
  local = sum(per_device_bytes(x) for x in leaves)
  logging.debug("state: %d arrays", len(leaves))
  return f"{total / 2**20:.1f} MiB in total, {local / 2**20:.1f} MiB on each device"
