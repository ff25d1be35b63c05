"""MI2RAGE trains on REMOTE's engine, sharded: a teacher fitted (remote_jax.engine.fit,
dropout on, checkpointed) data-parallel or FSDP over 2 of the 8 CPU devices, or by two
processes joined by jax.distributed, equals the one-device fit, and so do its predictions;
FSDP rules split the students' encoders and cross-attention.

The two-process test runs this file as a module (`python -m tests.mi2rage_jax.test_sharding DIR`)
in each process: one CPU device each, every process making only its rows of each batch.
"""
import functools
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import portpicker
import pytest

from configs import common
from mi2rage_jax import models
from remote_jax import distributed, engine, sharding
from tests.conftest import FAST_COMPILE, REPO, C
from tests.conftest import mi2rage_model_cfg as model_cfg
from tests.mi2rage_jax.models.test_models import BATCHES

TOL = dict(rtol=1e-5, atol=1e-5)
STEPS, ROWS, BATCH, VIEWS = 3, 8, 4, 2
# Large lr: the steps move every weight; eps=1e-3 keeps Adam's near-zero-gradient
# elements from turning reduction-order noise into full-size steps (test_trainer_sharding).
OPTIM = common.optim_config(lr=1e-2, eps=1e-3, warmup_ratio=0.0)
LAYOUTS = {"one": ("dp", [("data", 1)], 1), "dp": ("dp", [("data", 2)], 2),
           "fsdp": ("fsdp", [("fsdp", 2)], 2)}


def _rows():
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 100, (ROWS, 10)).astype(np.int32)
  return dict(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=np.ones_like(ids),
              subj_pos=rng.integers(1, 3, ROWS).astype(np.int32),
              obj_pos=rng.integers(3, 7, ROWS).astype(np.int32),
              label=np.arange(ROWS, dtype=np.int32) % C)


DATA = _rows()


def _make(idx):
  return {k: v[np.asarray(idx)] for k, v in DATA.items()}


class Losses:
  """A MetricWriter stand-in that keeps the logged losses."""

  def __init__(self):
    self.losses = []

  def write(self, step, metrics, split=None):
    del step, split
    self.losses.append(metrics["loss"])


def fit(mesh, rules, ckpt_dir):
  """(losses, params, logits) of the text teacher fitted for STEPS steps on `mesh`."""
  model = models.build_teacher("text", model_cfg(), C)
  s = engine.build(model, _make([0]), OPTIM, STEPS, mesh, rules=rules, seed=0)
  writer = Losses()
  params = engine.fit(s, lambda rng: rng.choice(ROWS, BATCH), _make, STEPS, 1, ckpt_dir,
                      ckpt_every=2, writer=writer, log_every=1)
  logits = engine.predict(s, params, ROWS - 1, BATCH, _make)   # the last batch is padded
  # Gathered to every process (FSDP params are split across devices).
  params = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(params)
  return writer.losses, jax.tree.map(np.asarray, params), logits


@functools.cache
def layout(name, tmp):
  rules, mesh_config, n = LAYOUTS[name]
  mesh = sharding.make_mesh(mesh_config, devices=jax.devices()[:n])
  return fit(mesh, rules, pathlib.Path(tmp) / name)


@pytest.mark.parametrize("name", ["dp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_sharded_fit_and_predict_match_one_device(name, tmp_path_factory):
  tmp = str(tmp_path_factory.getbasetemp() / "mi2rage_sharding")
  ref_losses, ref_params, ref_logits = layout("one", tmp)
  losses, params, logits = layout(name, tmp)
  assert len(losses) == STEPS and all(np.isfinite(losses)) and len(set(losses)) == STEPS
  np.testing.assert_allclose(losses, ref_losses, **TOL)
  assert jax.tree.structure(params) == jax.tree.structure(ref_params)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, err_msg=jax.tree_util.keystr(path), **TOL)
  assert logits.shape == (ROWS - 1, C)
  np.testing.assert_allclose(logits, ref_logits, **TOL)


def test_fsdp_really_splits_the_student():
  model = models.build_student("no_real_text", model_cfg(), C)
  batch = BATCHES["no_real_text"](np.random.default_rng(0), 1, VIEWS)
  mesh = sharding.make_mesh([("fsdp", 2)], devices=jax.devices()[:2])
  s = engine.build(model, batch, OPTIM, STEPS, mesh, rules="fsdp")
  split = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(s.state.params)
           if not x.sharding.is_fully_replicated]
  assert any("cross" in p for p in split) and any("vision" in p for p in split), split
  with pytest.raises(ValueError, match="multiple of the mesh"):
    engine.predict(s, s.state.params, 3, 3, lambda idx: batch)


def _worker(ckpt_dir):
  """One process of the two-process fit: its own rows of every batch."""
  distributed.maybe_initialize({"distributed": {"initialization_timeout": 60}})
  assert (jax.process_count(), jax.device_count()) == (2, 2)
  losses, params, logits = fit(sharding.make_mesh([("data", -1)]), "dp", ckpt_dir)
  print(json.dumps({"process": jax.process_index(), "losses": [float(x) for x in losses],
                    "params": [float(np.square(x).sum()) for x in jax.tree.leaves(params)],
                    "logits": logits.tolist()}))


@pytest.mark.slow   # two processes start, compile and fit: ~1 min on 2 cores
def test_two_processes_match_one(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE,
             REMOTE_JAX_COORDINATOR=f"localhost:{portpicker.pick_unused_port()}",
             REMOTE_JAX_NUM_PROCESSES="2")
  for k in ("REMOTE_JAX_DISTRIBUTED", "SLURM_NTASKS"):
    env.pop(k, None)
  procs = [subprocess.Popen([sys.executable, "-m", "tests.mi2rage_jax.test_sharding",
                             str(tmp_path / "two")], cwd=REPO,
                            env=dict(env, REMOTE_JAX_PROCESS_ID=str(i)), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  try:   # the one-device reference while the workers start up
    ref_losses, ref_params, ref_logits = layout("one", str(tmp_path))
    outs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"process failed:\n{out}\n{err[-3000:]}"
  results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert sorted(r["process"] for r in results) == [0, 1]
  for r in results:
    np.testing.assert_allclose(r["losses"], ref_losses, **TOL)
    np.testing.assert_allclose(r["params"], [np.square(x).sum() for x in
                                             jax.tree.leaves(ref_params)], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(r["logits"], ref_logits, **TOL)
  assert (tmp_path / "two" / str(STEPS)).is_dir()   # one checkpoint, written together


if __name__ == "__main__":
  _worker(sys.argv[1])
