"""Checkpoints: state + grain iterator round trip, cross-mesh restore, errors."""
import pathlib
import shutil

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from remote_jax import checkpoint


def make_iter():
  return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def make_state():
  params = nn.Dense(8).init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
  return {"params": params, "opt_state": opt_state, "step": jnp.asarray(3, jnp.int32)}


def assert_tree_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_round_trip_state_and_iterator_onto_another_mesh(tmp_path):
  devices = np.array(jax.devices())
  if devices.size < 8:
    pytest.skip("needs 8 (virtual) devices, see conftest")
  save_mesh = jax.sharding.Mesh(devices, ("data",))
  state = jax.device_put(make_state(), NamedSharding(save_mesh, P()))
  it = make_iter()
  for _ in range(3):
    next(it)
  with checkpoint.Checkpointer.for_workdir(tmp_path, async_save=False) as ckpt:
    assert ckpt.save(3, state, it, meta={"config": {"lr": 1e-5}, "best": np.float32(61.5)})
  expected = [next(it) for _ in range(3)]

  # Restore onto a 4x2 mesh with the kernel sharded over "a": shardings come
  # from the abstract tree, not from the checkpoint.
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
          mesh, P(None, "a") if x.ndim == 2 else P())), make_state())
  fresh = make_iter()
  ckpt = checkpoint.Checkpointer.for_workdir(tmp_path, async_save=False)
  restored, step = ckpt.restore_latest(abstract, fresh)
  assert step == 3
  assert_tree_equal(restored, state)
  kernel = restored["params"]["kernel"]
  assert kernel.sharding == NamedSharding(mesh, P(None, "a"))
  for want in expected:  # the iterator continues where it was saved
    np.testing.assert_array_equal(next(fresh), want)
  assert ckpt.load_meta() == {"config": {"lr": 1e-5}, "best": 61.5}


def test_save_interval_max_to_keep_and_force(tmp_path):
  state = {"w": jnp.ones((2,))}
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2, save_every=2,
                                 async_save=False)
  saved = [ckpt.save(s, state) for s in range(1, 6)]
  assert saved == [False, True, False, True, False]
  assert ckpt.save(5, state, force=True)  # the end of training
  assert not ckpt.save(5, state, force=True)  # already there: not an error
  assert ckpt.all_steps() == [4, 5]


def test_empty_dir_and_missing_iterator_state(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
  assert ckpt.restore_latest({"w": jnp.ones(2)}) is None
  ckpt.save(1, {"w": jnp.ones(2)})
  with pytest.raises(checkpoint.CheckpointError, match="no data iterator state"):
    ckpt.restore_latest({"w": jnp.ones(2)}, make_iter())
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint step 7"):
    ckpt.restore(7, {"w": jnp.ones(2)})


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
  state = {"w": jnp.arange(4.0)}
  checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False).save(2, state)
  state_dir = tmp_path / "ckpt" / "2" / "state"
  for p in state_dir.rglob("*"):
    if p.is_file() and p.name != "_METADATA":
      p.write_bytes(b"garbage")
  with pytest.raises(checkpoint.CheckpointError, match=r"step 2 from .*ckpt"):
    checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False).restore_latest(state)
  shutil.rmtree(state_dir)
  with pytest.raises(checkpoint.CheckpointError, match="step 2"):
    checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False).restore_latest(state)


def scramble(step_dir, seed=0):
  """Overwrites the second half of every file of a step with random bytes."""
  rng = np.random.default_rng(seed)
  for p in pathlib.Path(step_dir).rglob("*"):
    if p.is_file():
      data = p.read_bytes()
      p.write_bytes(data[:len(data) // 2] + rng.bytes(len(data) - len(data) // 2))


def test_resume_skips_an_unreadable_newest_step(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
  it = make_iter()
  for s in (1, 2):
    next(it)
    ckpt.save(s, {"w": jnp.full((64,), float(s))}, it, meta={"history": [s]})
  scramble(tmp_path / "ckpt" / "2")
  fresh = make_iter()
  state, step = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False).restore_latest(
      {"w": jnp.zeros(64)}, fresh)
  assert step == 1
  np.testing.assert_array_equal(state["w"], np.ones(64))
  ref = make_iter()
  next(ref)
  np.testing.assert_array_equal(next(fresh), next(ref))   # the iterator of step 1 too
  assert "skipping checkpoint step 2: cannot restore checkpoint step 2" in caplog.text
  assert (tmp_path / "ckpt_unreadable" / "2").is_dir()   # set aside: step 2 can be saved again
  again = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
  assert again.all_steps() == [1] and again.save(2, {"w": jnp.zeros(64)}, force=True)
  scramble(tmp_path / "ckpt" / "1")
  scramble(tmp_path / "ckpt" / "2")
  with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint .* restores"):
    checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False).restore_latest(
        {"w": jnp.zeros(64)})


def test_open_checkpoint_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.open_checkpoint(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(checkpoint.CheckpointError, match="no finished checkpoint"):
    checkpoint.open_checkpoint(tmp_path / "empty")
  ckpt = checkpoint.Checkpointer.for_workdir(tmp_path / "run", async_save=False)
  for s in (1, 2):
    ckpt.save(s, {"w": jnp.full((2,), float(s))})
  assert checkpoint.open_checkpoint(tmp_path / "run")[1] == 2  # a workdir: latest
  reader, step = checkpoint.open_checkpoint(tmp_path / "run" / "ckpt" / "1")
  assert step == 1
  np.testing.assert_array_equal(reader.restore(step, {"w": jnp.zeros(2)})["w"], [1.0, 1.0])


def test_resume_precedence(tmp_path):
  work, other = tmp_path / "work", tmp_path / "other"
  other.mkdir()
  assert checkpoint.resume_source(work) == ("scratch", None)
  assert checkpoint.resume_source(work, str(other)) == ("resume", str(other))
  with pytest.raises(FileNotFoundError, match="config.resume"):
    checkpoint.resume_source(work, resume=str(tmp_path / "gone"))
  checkpoint.Checkpointer.for_workdir(work, async_save=False).save(1, {"w": jnp.ones(1)})
  start = checkpoint.resume_source(work, str(other))
  assert start.kind == "workdir" and pathlib.Path(start.path) == work / "ckpt"


def test_a_state_of_another_config_is_named_and_nothing_is_set_aside(tmp_path):
  """A checkpoint read with a config that builds another state tree (optim.ema flipped) is a
  one-line error naming the cause; restore_latest moves no step to _unreadable/."""
  state = make_state()
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", async_save=False)
  for step in (1, 2):
    ckpt.save(step, state, force=True)
  ckpt.wait()
  other = {**state, "ema": state["params"]}
  with pytest.raises(checkpoint.CheckpointMismatch, match="optim.ema"):
    ckpt.restore_latest(other)
  assert ckpt.all_steps() == [1, 2] and not (tmp_path / "ckpt_unreadable").exists()
  ckpt.close()
