"""Mesh and sharding rules: the one place where logical axes meet mesh axes.

Modules name every parameter dimension with the logical names of
docs/design.md (`nn.with_logical_partitioning`); this file maps them onto a
mesh with axes `data`, `fsdp` and `tensor`. `config.mesh` sizes the mesh and
`config.sharding` ("dp" | "fsdp" | "fsdp_tp") picks the rule set.

Intended use in the engine (engine.build) (jit with explicit shardings, donated state):

  mesh = sharding.make_mesh(config.mesh)
  state, state_sh = sharding.create_sharded_state(init_fn, rng, mesh, config.sharding)
  step = jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)))
  for local_batch in data:  # this process's rows, numpy
    state, metrics = step(state, sharding.global_batch(local_batch, mesh), rng)

`init_fn(rng)` returns the state with *boxed* params (e.g. `TrainState.create(
params=model.init(...)["params"], tx=tx)`), and `state.params` (or
`state["params"]`) must be that tree; `create_sharded_state` unboxes it, so
the state the step sees holds plain arrays. Build the model and the optax
transformation once, outside `init_fn`: they are static pytree metadata, and
jit wants the same objects in the state and in its sharding tree.
"""
import functools
import logging
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
# The batch is split over every axis that holds distinct data.
BATCH_AXES = ("data", "fsdp")

# Pure data parallelism: every parameter replicated. Lists every logical name
# of docs/design.md, so a name missing here is an unknown name.
LOGICAL_RULES = (
    ("vocab", None),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("kv", None),
    ("joined_kv", None),
    ("position", None),
    ("patch", None),
    ("experts", None),
    ("levels", None),
    ("classes", None),
    ("norm", None),
)


def _override(rules, **mapping):
  return tuple((name, mapping.get(name, axis)) for name, axis in rules)


# ZeRO-3 style: the model width is split over `fsdp`; XLA all-gathers each
# weight where it is used and reduce-scatters its gradient.
FSDP_RULES = _override(LOGICAL_RULES, embed="fsdp")
# Megatron-style tensor parallelism on top: the wide dimensions go to `tensor`.
FSDP_TP_RULES = _override(
    FSDP_RULES, vocab="tensor", mlp="tensor", heads="tensor", joined_kv="tensor")

RULES = {"dp": LOGICAL_RULES, "fsdp": FSDP_RULES, "fsdp_tp": FSDP_TP_RULES}


def logical_rules(rules):
  """`config.sharding` (a key of RULES) or explicit (name, mesh_axis) pairs."""
  if isinstance(rules, str):
    if rules not in RULES:
      raise ValueError(f"config.sharding={rules!r} is not one of {sorted(RULES)}")
    return RULES[rules]
  return tuple((name, axis) for name, axis in rules)


def make_mesh(mesh_config, devices=None):
  """Builds the (data, fsdp, tensor) mesh from [(axis_name, size), ...].

  One size may be -1 (the rest of the devices); unnamed axes get size 1, so
  every mesh has all three axes and every rule set applies to it.
  """
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  sizes = dict.fromkeys(MESH_AXES, 1)
  seen = set()
  for name, size in mesh_config:
    if name not in sizes:
      raise ValueError(f"config.mesh={mesh_config!r}: unknown axis {name!r}, "
                       f"allowed: {MESH_AXES}")
    if name in seen:
      raise ValueError(f"config.mesh={mesh_config!r}: axis {name!r} given twice")
    seen.add(name)
    sizes[name] = int(size)
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ValueError(f"config.mesh={mesh_config!r}: only one axis may be -1")
  known = math.prod(size for size in sizes.values() if size != -1)
  if rest and known > 0 and n % known == 0:
    sizes[rest[0]] = n // known
  if any(size < 1 for size in sizes.values()) or math.prod(sizes.values()) != n:
    raise ValueError(f"config.mesh={mesh_config!r} gives mesh {sizes}, whose product does "
                     f"not equal the device count {n}")
  shape = tuple(sizes[name] for name in MESH_AXES)
  # Auto axes: GSPMD propagates shardings from the jit boundary (Explicit is
  # jax.make_mesh's default and would need sharding-aware model code).
  mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=devices)
  log.info("mesh %s over %d devices (%s)", dict(mesh.shape), n, devices[0].platform)
  return mesh


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """Leading (batch) dimension split over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def global_batch(local_batch, mesh):
  """This process's rows (numpy pytree) -> global jax.Arrays sharded on batch."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def check_batch_size(mesh, size, field="batch_size"):
  """A global batch must split evenly over the mesh's batch axes (data x fsdp)."""
  shards = _axis_size(mesh, tuple(a for a in BATCH_AXES if a in mesh.shape))
  if size % shards:
    raise ValueError(f"config.{field}={size} must be a multiple of the mesh's data x fsdp "
                     f"size ({shards}, mesh {dict(mesh.shape)})")


def host_rows(mesh, global_size, field="batch_size"):
  """(rows, shard_index, shard_count): this process's slice of a global batch.

  The slice follows the mesh, not the process count: processes whose devices
  differ only along `tensor` hold the same rows, so they must read the same
  data shard (batch_size // process_count would split them and mix rows).
  """
  check_batch_size(mesh, global_size, field)
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_size,))
  spans = sorted({sl[0].indices(global_size)[:2] for sl in index_map.values()})
  start, stop = spans[0][0], spans[-1][1]
  covered = sum(b - a for a, b in spans)
  rows = stop - start
  if covered != rows or rows == 0 or global_size % rows or start % rows:
    raise ValueError(
        f"config.{field}={global_size}: process {jax.process_index()} holds rows "
        f"{spans} of the batch on mesh {dict(mesh.shape)}, not one contiguous shard, "
        "so it cannot read one data shard; choose config.mesh sizes that keep each "
        "process's devices together (e.g. tensor <= devices per process, data x fsdp "
        "a multiple of the process count)")
  return rows, start // rows, global_size // rows


def all_rows(local_batch, mesh):
  """Every process's rows of a batch as numpy on every process, in the order of
  `global_batch`'s global array (the order of the eval step's gathered outputs)."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, local_batch)
  return jax.device_get(_gather_to_all(mesh)(global_batch(local_batch, mesh)))


@functools.cache
def _gather_to_all(mesh):
  """One jitted all-gather per mesh (a fresh jit per batch would recompile)."""
  return jax.jit(lambda x: x, out_shardings=replicated(mesh))


def _axis_size(mesh, axes):
  axes = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def _spec(box, shape, path, mesh, rules):
  """PartitionSpec for one boxed array; non-divisible dims stay replicated."""
  names = tuple(box.names)
  if isinstance(box, nn.LogicallyPartitioned):
    known = {name for name, _ in rules}
    for name in names:
      if name is not None and name not in known:
        raise ValueError(f"unknown logical axis name {name!r} on param {path} "
                         f"(known: {sorted(known)})")
    try:
      axes = list(nn.logical_to_mesh_axes(names, rules))
    except ValueError as e:
      raise ValueError(f"param {path}: {e}") from e
  else:  # nn.Partitioned names mesh axes directly.
    axes = list(names)
  axes += [None] * (len(shape) - len(axes))
  for i, axis in enumerate(axes):
    if axis is not None and shape[i] % _axis_size(mesh, axis):
      log.info("sharding: %s dim %d (%s, size %d) is not divisible by mesh axis %s (%d); "
                   "replicating that dim", path, i, names[i], shape[i], axis,
                   _axis_size(mesh, axis))
      axes[i] = None
  return P(*axes)


def _is_box(x):
  return isinstance(x, nn.Partitioned)


def param_shardings(abstract_params, mesh, rules):
  """Boxed (abstract) params -> NamedSharding tree shaped like the unboxed params.

  Unannotated params are replicated.
  """
  rules = logical_rules(rules)

  def one(path, x):
    if not _is_box(x):
      return replicated(mesh)
    spec = _spec(x, x.value.shape, jax.tree_util.keystr(path), mesh, rules)
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, abstract_params, is_leaf=_is_box)


def _params_of(state):
  params = getattr(state, "params", None)
  if params is None and isinstance(state, dict):
    params = state.get("params")
  if params is None:
    raise ValueError(f"state_shardings: {type(state).__name__} has no `params` field or key")
  return params


def state_shardings(abstract_state, mesh, rules):
  """NamedSharding tree for a whole train state, shaped like the unboxed state.

  Params get `param_shardings`. Optimizer states mirror the param tree (adam's
  mu/nu, also under optax.masked / multi_transform), so a leaf whose key path
  ends with a param's path and has its shape gets that param's sharding.
  Everything else (step counts, scalars, rng keys) is replicated.
  """
  params = _params_of(abstract_state)
  p_sh = jax.tree_util.tree_leaves_with_path(
      param_shardings(params, mesh, rules), is_leaf=lambda x: isinstance(x, NamedSharding))
  p_shape = dict(jax.tree_util.tree_leaves_with_path(nn.meta.unbox(params)))
  by_path = {tuple(path): (sh, p_shape[path].shape) for path, sh in p_sh}
  depth = max((len(p) for p in by_path), default=0)

  def one(path, x):
    x = x.value if _is_box(x) else x
    path = tuple(path)
    for k in range(min(depth, len(path)), 0, -1):  # longest matching suffix wins
      hit = by_path.get(path[-k:])
      if hit and hit[1] == np.shape(x):
        return hit[0]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, abstract_state, is_leaf=_is_box)


def create_sharded_state(init_fn, rng, mesh, rules, shardings=None):
  """jit(init_fn) straight into its shardings, so no host holds a full copy.

  Returns (state with unboxed params, its NamedSharding tree); `shardings`,
  when the caller already has them from `state_shardings`, saves a trace.
  """
  if shardings is None:
    shardings = state_shardings(jax.eval_shape(init_fn, rng), mesh, rules)
  init = jax.jit(lambda r: nn.meta.unbox(init_fn(r)), in_shardings=replicated(mesh),
                 out_shardings=shardings)
  return init(rng), shardings
