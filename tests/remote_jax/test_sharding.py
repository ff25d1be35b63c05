"""Sharded training on 8 CPU devices equals the 1-device steps (dp, fsdp, fsdp_tp)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from remote_jax import sharding

VOCAB, SEQ, EMBED, MLP, HEADS, KV, CLASSES, BATCH = 64, 8, 16, 32, 2, 8, 5, 16
STEPS = 3


NORMAL = nn.initializers.normal(0.05)


def _init(names, init=NORMAL):
  return nn.with_logical_partitioning(init, names)


class TinyModel(nn.Module):
  """A one-block transformer-ish classifier whose params use design.md's logical names."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(VOCAB, EMBED, embedding_init=_init(("vocab", "embed")))(ids)
    x += self.param("pos", _init(("position", "embed")), (SEQ, EMBED))
    h = nn.LayerNorm(scale_init=_init(("embed",), nn.initializers.ones), use_bias=False)(x)
    qkv = nn.DenseGeneral((3, HEADS, KV), kernel_init=_init(("embed", None, "heads", "kv")),
                          use_bias=False, name="qkv")(h)
    q, k, v = jnp.moveaxis(qkv, 2, 0)
    attn = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(KV), axis=-1)
    x += nn.DenseGeneral(EMBED, axis=(-2, -1), kernel_init=_init(("heads", "kv", "embed")),
                         use_bias=False, name="out")(jnp.einsum("bhqk,bkhd->bqhd", attn, v))
    h = nn.Dense(MLP, kernel_init=_init(("embed", "mlp")),
                 bias_init=_init(("mlp",), nn.initializers.zeros))(x)
    x += nn.Dense(EMBED, kernel_init=_init(("mlp", "embed")), use_bias=False)(nn.gelu(h))
    return nn.Dense(CLASSES, kernel_init=_init(("embed", "classes")),
                    bias_init=_init(("classes",), nn.initializers.zeros), name="head")(x.mean(1))


MODEL, TX = TinyModel(), optax.adamw(1e-2, weight_decay=0.1)


def init_fn(rng):
  params = MODEL.init(rng, jnp.zeros((1, SEQ), jnp.int32))["params"]
  return train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=TX)


def train_step(state, batch):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, batch["ids"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  return state.apply_gradients(grads=grads), loss


def make_batches(n, seed=0, batch=BATCH):
  rs = np.random.RandomState(seed)
  return [{"ids": rs.randint(0, VOCAB, (batch, SEQ)).astype(np.int32),
           "label": rs.randint(0, CLASSES, (batch,)).astype(np.int32)} for _ in range(n)]


def sharded_run(mesh, rules, batches, rng=0):
  """create_sharded_state + jit with explicit shardings and donated state, as the trainer will."""
  state, state_sh = sharding.create_sharded_state(init_fn, jax.random.key(rng), mesh, rules)
  step = jax.jit(train_step, donate_argnums=(0,),
                 in_shardings=(state_sh, sharding.batch_sharding(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)))
  losses = []
  for b in batches:
    state, loss = step(state, sharding.global_batch(b, mesh))
    losses.append(float(loss))
  return state, losses


@functools.cache
def reference_run():
  """Plain jit on one device: what every sharded layout must reproduce."""
  state = nn.meta.unbox(jax.jit(init_fn)(jax.random.key(0)))
  step = jax.jit(train_step)
  losses = []
  for b in make_batches(STEPS):
    state, loss = step(state, b)
    losses.append(float(loss))
  return jax.device_get(state), losses


@pytest.mark.parametrize("rules,mesh_config", [
    ("dp", [("data", -1)]),
    ("fsdp", [("data", 2), ("fsdp", -1)]),
    ("fsdp_tp", [("data", 2), ("fsdp", 2), ("tensor", 2)]),
])
def test_sharded_step_matches_single_device(rules, mesh_config):
  assert jax.device_count() == 8
  mesh = sharding.make_mesh(mesh_config)
  state, losses = sharded_run(mesh, rules, make_batches(STEPS))
  ref_state, ref_losses = reference_run()
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               jax.device_get(state.params), ref_state.params)
  assert int(state.step) == STEPS

  wi = state.params["Dense_0"]["kernel"]  # (embed, mlp)
  mu = state.opt_state[0].mu["Dense_0"]["kernel"]
  if rules == "dp":
    assert wi.sharding.is_fully_replicated
  else:
    # Really sharded: params and adam moments split on embed over fsdp.
    for x in (wi, mu):
      assert x.sharding.spec[0] == "fsdp"
      shard = x.addressable_shards[0].data.shape
      assert shard[0] == EMBED // mesh.shape["fsdp"] and shard[0] < x.shape[0]
    assert state.opt_state[0].count.sharding.is_fully_replicated
  if rules == "fsdp_tp":
    assert wi.sharding.spec == P("fsdp", "tensor")
    assert wi.addressable_shards[0].data.shape == (EMBED // 2, MLP // 2)
    # (embed, heads, kv): heads to tensor
    assert state.params["qkv"]["kernel"].sharding.spec == P("fsdp", None, "tensor", None)


def test_non_divisible_dim_falls_back_to_replication(caplog):
  mesh = sharding.make_mesh([("fsdp", 8)])
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  sh = sharding.state_shardings(abstract, mesh, "fsdp")
  assert sh.params["Dense_0"]["kernel"].spec == P("fsdp", None)  # embed=16 splits 8 ways
  odd = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((12, 5), jnp.float32), ("embed", "classes"))
  with caplog.at_level("INFO", logger="remote_jax.sharding"):
    assert sharding.param_shardings({"w": odd}, mesh, "fsdp")["w"].spec == P(None, None)
  assert "['w'] dim 0 (embed, size 12) is not divisible by mesh axis fsdp (8)" in caplog.text
  # 3 x 2 on a data=2, fsdp=2, tensor=2 mesh: embed (fsdp) splits, vocab=3 (tensor) does not.
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
  emb = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((3, 4), jnp.float32), ("vocab", "embed"))
  assert sharding.param_shardings({"e": emb}, mesh, "fsdp_tp")["e"].spec == P(None, "fsdp")


def test_opt_state_mirrors_params_and_scalars_replicate():
  mesh = sharding.make_mesh([("fsdp", -1)])
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  sh = sharding.state_shardings(abstract, mesh, "fsdp")
  adam = sh.opt_state[0]
  assert adam.mu["Embed_0"]["embedding"].spec == P(None, "fsdp")
  assert adam.nu["out"]["kernel"].spec == P(None, None, "fsdp")
  assert adam.count.spec == P()
  assert sh.step.spec == P()


def test_partitioned_optimizer_state_follows_params():
  """optax.multi_transform states hold MaskedNodes where a group is absent."""
  def init(rng):
    params = MODEL.init(rng, jnp.zeros((1, SEQ), jnp.int32))["params"]
    labels = {k: "head" if k == "head" else "body" for k in params}
    tx = optax.multi_transform({"body": optax.adam(1e-3), "head": optax.sgd(1e-3, 0.9)}, labels)
    return train_state.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)

  mesh = sharding.make_mesh([("fsdp", -1)])
  sh = sharding.state_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, "fsdp")
  inner = sh.opt_state.inner_states
  assert inner["body"].inner_state[0].mu["Dense_0"]["kernel"].spec == P("fsdp", None)
  assert inner["head"].inner_state[0].trace["head"]["kernel"].spec == P("fsdp", None)


def test_unknown_logical_name_is_an_error():
  mesh = sharding.make_mesh([("data", -1)])
  bad = nn.LogicallyPartitioned(jax.ShapeDtypeStruct((8, 4), jnp.float32), ("embed", "hidden"))
  with pytest.raises(ValueError, match=r"unknown logical axis name 'hidden'.*\['w'\]"):
    sharding.param_shardings({"w": bad}, mesh, "dp")
  with pytest.raises(ValueError, match="config.sharding='zero3'"):
    sharding.logical_rules("zero3")


def test_rule_sets_cover_the_design_names():
  for rules in sharding.RULES.values():
    assert [n for n, _ in rules] == [n for n, _ in sharding.LOGICAL_RULES]
  assert all(axis is None for _, axis in sharding.LOGICAL_RULES)


@pytest.mark.parametrize("mesh_config", [
    [("data", 3)],
    [("data", 2), ("fsdp", 2)],
    [("data", -1), ("fsdp", 3)],
    [("data", -1), ("fsdp", -1)],
    [("pipeline", 8)],
])
def test_mesh_validation(mesh_config):
  with pytest.raises(ValueError, match="config.mesh"):
    sharding.make_mesh(mesh_config)


def test_mesh_fills_the_rest():
  mesh = sharding.make_mesh([("tensor", 2), ("data", -1)])
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_global_batch_shards_rows():
  mesh = sharding.make_mesh([("data", 4), ("fsdp", 2)])
  b = sharding.global_batch(make_batches(1)[0], mesh)
  assert b["ids"].shape == (BATCH, SEQ)
  assert b["ids"].addressable_shards[0].data.shape == (BATCH // 8, SEQ)
  assert b["label"].sharding.spec == P(("data", "fsdp"))


@pytest.mark.parametrize("mesh_config", [[("data", -1)], [("fsdp", 4), ("tensor", 2)]])
def test_one_process_reads_the_whole_batch(mesh_config):
  # Multi-process shares (and processes that share rows over `tensor`) are
  # checked in test_distributed's two-process worker.
  assert sharding.host_rows(sharding.make_mesh(mesh_config), 16) == (16, 0, 1)
