"""The real REMOTE train step (engine.make_train_step on the micro paper model,
OT + MMoE + head, dropout on) sharded over 8 CPU devices equals the 1-device
step, and an 8-device FSDP checkpoint resumes on 1 device to the same loss.

The jit wiring mirrors task.setup (create_sharded_state, explicit in/out
shardings, donated state); setup itself needs a dataset builder. Dropout stays
on: the step folds the rng with the step and jax_threefry_partitionable makes
the dropout masks independent of the sharding.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from remote_jax import checkpoint, engine, sharding, task
from remote_jax import config as config_lib
from remote_jax.models import remote
from tests.conftest import C, make_batch, micro_config

TOL = dict(rtol=1e-5, atol=1e-5)
STEPS = 2
COMPILER = {"xla_backend_optimization_level": 0}
LAYOUTS = {   # name: (rules, mesh config); "one" is the reference
    "one": ("dp", [("data", 1)]),
    "dp": ("dp", [("data", 8)]),
    "fsdp": ("fsdp", [("data", 2), ("fsdp", 4)]),
}
MODEL = remote.build(micro_config("paper", **{"mot.iters": 2}), C, 2100)
# Large lr: the 2 steps move every weight. eps=1e-3: Adam divides by sqrt(v) + eps, which for
# a near-zero gradient turns reduction-order noise (different on 8 devices) into a full-size
# step; with a larger eps such elements move in proportion to their gradient instead.
TX = optax.adamw(1e-2, eps=1e-3, weight_decay=0.1)


def batch(seed):
  """8 examples: 4 make_batch pairs (entity-entity and entity-object each)."""
  parts = [make_batch(seed=4 * seed + i) for i in range(4)]
  out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  out["label"] = np.arange(8, dtype=np.int32) % C
  return task.model_batch(out)


def init_fn(rng):
  params = MODEL.init({"params": rng, "dropout": rng}, batch(0))["params"]
  return engine.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=TX.init(nn.meta.unbox(params)))


class Run:
  """One layout: mesh, sharded state, jitted step (as task.setup builds them)."""

  def __init__(self, name):
    rules, mesh_config = LAYOUTS[name]
    devices = jax.devices()[:1] if name == "one" else jax.devices()
    self.mesh = sharding.make_mesh(mesh_config, devices=devices)
    with self.mesh:
      self.state, self.sh = sharding.create_sharded_state(
          init_fn, jax.random.key(0), self.mesh, rules)
    self.step = jax.jit(
        engine.make_train_step(MODEL, TX, task.remote_loss), donate_argnums=(0,),
        in_shardings=(self.sh, sharding.batch_sharding(self.mesh),
                      sharding.replicated(self.mesh)),
        out_shardings=(self.sh, sharding.replicated(self.mesh)),
        compiler_options=COMPILER)
    self.rng = jax.random.key(1)

  def train(self, state, seeds):
    losses = []
    for seed in seeds:
      state, m = self.step(state, sharding.global_batch(batch(seed), self.mesh), self.rng)
      losses.append(float(m["loss"]))
    return state, losses


@functools.cache
def trained(name):
  """(Run, state after STEPS steps, losses); the state is never donated later."""
  run = Run(name)
  state, losses = run.train(run.state, range(STEPS))
  return run, state, losses


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


def fsdp_kernels(state, sh):
  """(path, param, adam mu) of kernels whose spec shards a dimension over fsdp."""
  mu = state.opt_state[0].mu
  out = []
  for path, s in jax.tree_util.tree_leaves_with_path(
      sh.params, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding)):
    if "kernel" in jax.tree_util.keystr(path) and "fsdp" in jax.tree.leaves(tuple(s.spec)):
      get = lambda t, path=path: functools.reduce(lambda node, k: node[k.key], path, t)
      out.append((jax.tree_util.keystr(path), get(state.params), get(mu)))
  return out


def test_fsdp_rules_split_the_remote_state_without_compiling():
  """Where fsdp puts REMOTE's params and Adam moments (shapes only; the compiled steps
  below are slow-marked, test_sharding.py runs sharded steps on a small model)."""
  mesh = sharding.make_mesh(LAYOUTS["fsdp"][1], devices=jax.devices())
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  sh = sharding.state_shardings(abstract, mesh, "fsdp")
  state = nn.meta.unbox(abstract)
  kernels = fsdp_kernels(state, sh)
  assert len(kernels) > 10 and any("text" in p and "attention" in p for p, _, _ in kernels)
  def by_path(tree):
    return {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))}
  p_sh = by_path(sh.params)
  assert by_path(sh.opt_state[0].mu) == p_sh
  for path, param, _ in kernels:
    spec = p_sh[path].spec
    dim = [i for i, a in enumerate(spec) if a == "fsdp" or (isinstance(a, tuple) and "fsdp" in a)]
    assert dim and param.shape[dim[0]] % 4 == 0, (path, spec, param.shape)
  assert sh.opt_state[0].count.is_fully_replicated


# Each layout compiles the micro REMOTE train step (40-100 s on 2 cores): slow-marked.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dp", "fsdp"])
def test_sharded_remote_step_matches_one_device(name):
  assert jax.device_count() == 8
  _, ref_state, ref_losses = trained("one")
  run, state, losses = trained(name)
  assert all(np.isfinite(losses)) and losses[0] != losses[1]
  np.testing.assert_allclose(losses, ref_losses, **TOL)
  assert int(state.step) == STEPS
  ref = host(ref_state.params)
  got = host(state.params)
  assert jax.tree.structure(ref) == jax.tree.structure(got)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
               host(state.opt_state[0].mu), host(ref_state.opt_state[0].mu))

  kernels = fsdp_kernels(state, run.sh)
  if name == "dp":
    assert not kernels
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    return
  # Really sharded: embed-axis kernels and their adam mu split over fsdp.
  assert len(kernels) > 10, [p for p, _, _ in kernels]
  for path, param, mu in kernels:
    for x in (param, mu):
      assert "fsdp" in jax.tree.leaves(tuple(x.sharding.spec)), (path, x.sharding)
      shard = x.addressable_shards[0].data.shape
      assert np.prod(shard) * 4 == np.prod(x.shape), (path, shard, x.shape)
  assert any("text" in p and "attention" in p for p, _, _ in kernels)
  assert state.opt_state[0].count.sharding.is_fully_replicated


@pytest.mark.slow   # test_checkpoint.py restores a small state onto another mesh in the fast suite
def test_fsdp_checkpoint_resumes_on_one_device(tmp_path):
  fsdp, state8, _ = trained("fsdp")
  one = trained("one")[0]
  with checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False) as ckpt:
    assert ckpt.save(STEPS, state8, force=True)
  # Abstract target: the 1-device setup's state (its shardings, not the saved ones).
  shapes = jax.eval_shape(lambda r: nn.meta.unbox(init_fn(r)), jax.random.key(0))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          shapes, one.sh)
  restored = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False).restore(
      STEPS, abstract)
  assert int(restored.step) == STEPS
  leaves = jax.tree.leaves(restored)
  assert all(x.sharding.device_set == {jax.devices()[0]} for x in leaves)
  jax.tree.map(np.testing.assert_array_equal, host(restored), host(state8))

  # Continue: step 3 on 8 devices (on a copy, the cached state stays) vs on 1.
  copy8 = jax.tree.map(lambda x: jax.device_put(x, x.sharding, may_alias=False), state8)
  next8, loss8 = fsdp.train(copy8, [STEPS])
  next1, loss1 = one.train(restored, [STEPS])
  np.testing.assert_allclose(loss1, loss8, **TOL)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL),
               host(next1.params), host(next8.params))


def test_cutting_padding_is_refused_where_the_model_attends_it():
  from configs import mnre_text
  config = mnre_text.get_config()
  config.data.pad_to_multiple_of = 8
  config_lib.check_padding_cut(config)   # the paper's masks: cutting changes nothing
  released = mnre_text.get_config("semantics=reference")
  released.data.pad_to_multiple_of = 8
  with pytest.raises(ValueError, match=r"model.respect_masks=False, model.mot.mask=False: "
                     r"this model attends padding .* --config.data.pad_to_multiple_of=0"):
    config_lib.check_padding_cut(released)


class _BagOfTokens(nn.Module):
  @nn.compact
  def __call__(self, batch, deterministic=True):
    mask = batch["attention_mask"][..., None]
    h = (nn.Embed(50, 8)(batch["input_ids"]) * mask).sum(1) / mask.sum(1)
    return nn.Dense(3)(h)


def test_compiled_step_compiles_once_per_cut_length():
  """The ahead-compiled step (compile_batch) takes batches cut to other lengths
  (data.pad_to_multiple_of): one executable per length, the same loss as uncut."""
  mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  full = dict(input_ids=rng.integers(1, 50, (4, 16)).astype(np.int32),
              attention_mask=np.repeat([[1] * 8 + [0] * 8], 4, 0).astype(np.int32),
              label=np.arange(4, dtype=np.int32) % 3)
  cut = dict(full, input_ids=full["input_ids"][:, :8], attention_mask=full["attention_mask"][:, :8])
  abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
              for k, v in full.items()}

  def losses(batches):
    from configs import common
    s = engine.build(_BagOfTokens(), full, common.optim_config(lr=1e-2), 4, mesh,
                     loss_fn=engine.classifier_loss, compile_batch=abstract)
    state, out = s.state, []
    for b in batches:
      state, m = s.train_step(state, sharding.global_batch(b, mesh), jax.random.key(0))
      out.append(float(m["loss"]))
    return out, s.train_step
  got, step = losses([full, cut, cut, full])
  assert len(step._compiled) == 2
  np.testing.assert_allclose(got, losses([full] * 4)[0], rtol=1e-5)


def test_parameter_average_follows_the_warmed_up_decay_and_is_what_is_evaluated(tmp_path):
  """optim.ema: after each step the average is d * avg + (1 - d) * params with
  d = min(ema, (1 + t) / (10 + t)), recomputed here from the parameter trajectory of a run
  without it (the average never feeds back into training); eval_params is the average,
  and it survives a checkpoint round trip."""
  from configs import common
  mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
  rng = np.random.default_rng(0)
  b = dict(input_ids=rng.integers(1, 50, (4, 8)).astype(np.int32),
           attention_mask=np.ones((4, 8), np.int32), label=np.arange(4, dtype=np.int32) % 3)

  def run(ema):
    s = engine.build(_BagOfTokens(), b, common.optim_config(lr=1e-1, ema=ema), 5, mesh,
                     loss_fn=engine.classifier_loss)
    host = lambda tree: jax.tree.map(np.asarray, tree)   # the step donates the state
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            s.state)
    state, trajectory = s.state, [host(s.state.params)]
    for _ in range(5):
      state, _ = s.train_step(state, sharding.global_batch(b, mesh), jax.random.key(0))
      trajectory.append(host(state.params))
    return abstract, state, trajectory

  _, plain, trajectory = run(0.0)
  # Without it the state (so the checkpoint tree) is the one of before the average existed:
  # older checkpoints still restore.
  assert type(plain) is engine.TrainState and plain.eval_params is plain.params
  assert [f.name for f in dataclasses.fields(plain)] == ["step", "params", "opt_state"]
  abstract, state, _ = run(0.5)
  expected = trajectory[0]
  for t, params in enumerate(trajectory[1:]):
    d = min(0.5, (1 + t) / (10 + t))
    expected = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, expected, params)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(state.eval_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(jax.tree.leaves(state.ema)[0], jax.tree.leaves(state.params)[0])
  ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
  ckpt.save(5, state, force=True)
  ckpt.wait()
  back = ckpt.restore(5, abstract)
  ckpt.close()
  for got, want in zip(jax.tree.leaves(back.eval_params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_build_loads_the_weights_and_restarts_the_average_at_them():
  """build(load=...): the loaded parameters replace the initial ones, and the average
  (optim.ema > 0) starts at them (a copy: the step donates both); without the average the
  state stays the plain TrainState."""
  from configs import common
  mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
  b = dict(input_ids=np.ones((2, 4), np.int32), attention_mask=np.ones((2, 4), np.int32),
           label=np.zeros(2, np.int32))

  def build(ema, load=None):
    return engine.build(_BagOfTokens(), b, common.optim_config(ema=ema), 3, mesh, load=load)

  init = jax.tree.map(np.asarray, build(0.5).state.params)
  s = build(0.5, load=lambda params: jax.tree.map(lambda x: x + 1.0, params))
  for got, avg, want in zip(*map(jax.tree.leaves, (s.state.params, s.state.ema, init))):
    np.testing.assert_array_equal(got, want + 1.0)
    np.testing.assert_array_equal(avg, want + 1.0)
    assert avg.unsafe_buffer_pointer() != got.unsafe_buffer_pointer()
  plain = build(0.0, load=lambda params: params).state
  assert type(plain) is engine.TrainState


def _imports(path):
  """The modules `path` imports anywhere (top level or inside functions)."""
  import ast
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
  return out


def test_the_engine_knows_no_model_and_no_data():
  """engine.py, and every module of ours it reaches, imports nothing from remote_jax.models,
  remote_jax.data or mi2rage_jax, not even lazily inside a function."""
  import pathlib
  root = pathlib.Path(engine.__file__).parents[1]
  seen, todo = set(), ["remote_jax.engine"]
  while todo:
    module = todo.pop()
    if module in seen:
      continue
    seen.add(module)
    path = root / (module.replace(".", "/") + ".py")
    if path.exists():
      todo += [m for m in _imports(path) if m.startswith(("remote_jax", "mi2rage_jax"))]
  bad = sorted(m for m in seen if m.startswith(("remote_jax.models", "remote_jax.data",
                                                "mi2rage_jax")))
  assert "remote_jax.sharding" in seen and not bad, bad
