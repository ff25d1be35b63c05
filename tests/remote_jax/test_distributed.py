"""Processes joined by jax.distributed train like one process; maybe_initialize's detection.

The two-process test runs this file as a module (`python -m tests.test_distributed`)
in each process: 2 CPU devices each, 4 global, fsdp across the process boundary.
"""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import portpicker
import pytest

from remote_jax import distributed
from tests.conftest import FAST_COMPILE, REPO


def _param_sq_sum(params):
  return sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(params))


def _worker():
  """One process of the distributed run: its own rows of each global batch."""
  from remote_jax import sharding

  from . import test_sharding as T

  distributed.maybe_initialize({"distributed": {"initialization_timeout": 60}})
  n, i = jax.process_count(), jax.process_index()
  assert (n, jax.device_count(), jax.local_device_count()) == (2, 4, 2)
  mesh = sharding.make_mesh([("fsdp", -1)])  # 4 ways: params split across the two processes
  rows = T.BATCH // n
  local = [jax.tree.map(lambda x: x[i * rows:(i + 1) * rows], b) for b in T.make_batches(T.STEPS)]
  state, losses = T.sharded_run(mesh, "fsdp", local)
  wi = state.params["Dense_0"]["kernel"]
  held = {shard.index[0].start for shard in wi.addressable_shards}
  assert wi.sharding.spec[0] == "fsdp" and len(held) == 2  # this process has half the rows
  # Gather the fsdp-sharded params to every process to compare them.
  params = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(state.params)
  # Eval as the trainer does it: outputs gathered to every process line up
  # with all_rows' labels, and every process's rows count once.
  local = {"label": np.arange(rows) + 100 * i}
  doubled = jax.jit(lambda b: b["label"] * 2, out_shardings=sharding.replicated(mesh))(
      sharding.global_batch(local, mesh))
  labels = sharding.all_rows(local, mesh)["label"]
  assert sorted(labels.tolist()) == sorted([r + 100 * p for p in range(n) for r in range(rows)])
  np.testing.assert_array_equal(np.asarray(doubled), 2 * labels)
  # Each process's share of a batch of 8 follows the mesh, not the process count:
  assert sharding.host_rows(mesh, 8) == (4, i, 2)
  tensor_across = sharding.make_mesh([("tensor", -1)])   # every process holds every row
  assert sharding.host_rows(tensor_across, 8) == (8, 0, 1)
  data_tensor = sharding.make_mesh([("data", 2), ("tensor", 2)])
  assert sharding.host_rows(data_tensor, 8) == (4, i, 2)
  by_process = sorted(jax.devices(), key=lambda d: d.process_index)
  interleaved = sharding.make_mesh([("data", -1)], devices=by_process[0::2] + by_process[1::2])
  with pytest.raises(ValueError, match="not one contiguous shard"):
    sharding.host_rows(interleaved, 8)
  print(json.dumps({"process": i, "losses": losses, "params": _param_sq_sum(params)}))


def _env(**extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
  env.update(extra)
  for k in ("REMOTE_JAX_PROCESS_ID", "REMOTE_JAX_DISTRIBUTED", "SLURM_NTASKS"):
    env.pop(k, None)
  return env


def _run_all(procs, timeout=150):
  try:
    outs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, f"process failed:\n{out}\n{err[-3000:]}"
  return [out for out, _ in outs]


def test_two_processes_match_one():
  from . import test_sharding as T

  env = _env(REMOTE_JAX_COORDINATOR=f"localhost:{portpicker.pick_unused_port()}",
             REMOTE_JAX_NUM_PROCESSES="2")
  procs = [subprocess.Popen([sys.executable, "-m", __name__], cwd=REPO,
                            env=dict(env, REMOTE_JAX_PROCESS_ID=str(i)), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
  ref_state, ref_losses = T.reference_run()  # while the workers start up
  outs = _run_all(procs)
  results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
  assert sorted(r["process"] for r in results) == [0, 1]
  for r in results:
    np.testing.assert_allclose(r["losses"], ref_losses, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(r["params"], _param_sq_sum(ref_state.params), rtol=1e-5)


def test_local_launcher(tmp_path):
  """launch/local.sh starts N processes that join, each with the arguments."""
  # One file per process: their stdout shares a pipe and may interleave.
  probe = ("import sys, jax; from remote_jax import distributed; distributed.maybe_initialize(); "
           f"i = jax.process_index(); open(f'{tmp_path}/out{{i}}', 'w').write("
           "' '.join(map(str, [i, jax.process_count(), jax.device_count(), *sys.argv[1:]])))")
  fake_python = tmp_path / "python"  # stands in for `python -m remote_jax.train ARGS`
  fake_python.write_text(
      f'#!/bin/bash\nif [ "$1" = -m ]; then shift 2; exec {sys.executable} -c "{probe}" "$@"; fi\n'
      f'exec {sys.executable} "$@"\n')
  fake_python.chmod(0o755)
  env = _env(NUM_PROCESSES="2", DEVICES_PER_PROCESS="3", PYTHON=str(fake_python), XLA_FLAGS="")
  _run_all([subprocess.Popen(["bash", "launch/local.sh", "--workdir", "/tmp/w x"], cwd=REPO,
                             env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)])
  outs = [(tmp_path / f"out{i}").read_text() for i in range(2)]
  assert outs == ["0 2 6 --workdir /tmp/w x", "1 2 6 --workdir /tmp/w x"]


@pytest.fixture
def calls(monkeypatch):
  """Records jax.distributed.initialize calls instead of joining anything."""
  recorded = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: recorded.append((a, k)))
  for k in list(os.environ):
    if k.startswith(("REMOTE_JAX_", "SLURM_", "OMPI_", "TPU_")):
      monkeypatch.delenv(k)
  return recorded


def test_single_process_does_nothing(calls):
  distributed.maybe_initialize(None)
  distributed.maybe_initialize({"distributed": {}})
  assert calls == [] and distributed.is_main()


def test_explicit_coordinator(calls, monkeypatch):
  monkeypatch.setenv("REMOTE_JAX_COORDINATOR", "host0:1234")
  monkeypatch.setenv("REMOTE_JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("REMOTE_JAX_PROCESS_ID", "0")
  distributed.maybe_initialize({"distributed": {"initialization_timeout": 30}})
  assert calls == [(("host0:1234", 4, 0), {"initialization_timeout": 30})]
  # Config fields win over env.
  cfg = {"distributed": {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}}
  distributed.maybe_initialize(cfg)
  assert calls[-1] == (("h:1", 2, 1), {})


def test_config_sentinels_mean_unset(calls, monkeypatch):
  """configs/common.py's defaults ("", 0, -1) defer to the env."""
  cfg = ml_collections.ConfigDict(
      {"distributed": {"coordinator_address": "", "num_processes": 0, "process_id": -1}})
  cfg.lock()
  distributed.maybe_initialize(cfg)
  assert calls == []
  monkeypatch.setenv("REMOTE_JAX_COORDINATOR", "host0:1234")
  monkeypatch.setenv("REMOTE_JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("REMOTE_JAX_PROCESS_ID", "1")
  distributed.maybe_initialize(cfg)
  assert calls == [(("host0:1234", 2, 1), {})]


def test_explicit_coordinator_needs_count_and_id(calls, monkeypatch):
  monkeypatch.setenv("REMOTE_JAX_COORDINATOR", "host0:1234")
  with pytest.raises(ValueError, match="REMOTE_JAX_NUM_PROCESSES"):
    distributed.maybe_initialize()


@pytest.mark.parametrize("env", [
    {"SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]"},
    {"OMPI_COMM_WORLD_SIZE": "8"},
    {"TPU_WORKER_HOSTNAMES": "w0,w1"},
    {"REMOTE_JAX_DISTRIBUTED": "1"},
])
def test_cluster_launch_uses_jax_autodetection(calls, monkeypatch, env):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  distributed.maybe_initialize()
  assert calls == [((), {})]


def test_single_task_cluster_and_off_switch(calls, monkeypatch):
  monkeypatch.setenv("SLURM_NTASKS", "1")
  monkeypatch.setenv("SLURM_STEP_NODELIST", "n1")
  distributed.maybe_initialize()
  monkeypatch.setenv("SLURM_NTASKS", "4")
  monkeypatch.setenv("REMOTE_JAX_DISTRIBUTED", "0")
  distributed.maybe_initialize()
  assert calls == []


@pytest.mark.slow   # two CLI trainings: about 2 minutes on 2 cores
def test_demo_cli_on_two_processes_evaluates_like_one(tmp_path):
  """launch/local.sh (2 processes x 1 CPU device) against one process on 2
  devices, through remote_jax.train. With lr=0 the parameters stay at their
  init (the same on any layout), so dev and test metrics must agree although
  each process reads its own half of the data: outputs are gathered with
  every process's rows, and the 9-example test split pads one host's shard."""
  data = tmp_path / "data"
  args = ["--config", "configs/demo.py:runlocal", f"--config.data.cache_dir={data}",
          "--config.optim.lr=0", "--config.max_steps=1", "--config.model.mot.iters=5",
          "--config.data.demo.n_train=16", "--config.data.demo.n_val=8",
          "--config.data.demo.n_test=9"]
  env = _env(XLA_FLAGS=f"--xla_force_host_platform_device_count=2 {FAST_COMPILE}")
  one = subprocess.run([sys.executable, "-m", "remote_jax.train", *args,
                        f"--workdir={tmp_path / 'one'}"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]   # also builds the data for the two below
  two = subprocess.run(["bash", "launch/local.sh", *args, f"--workdir={tmp_path / 'two'}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       env=_env(PYTHON=sys.executable, NUM_PROCESSES="2",
                                DEVICES_PER_PROCESS="1", XLA_FLAGS=FAST_COMPILE))
  assert two.returncode == 0, two.stderr[-3000:]
  assert two.stdout.count("model selected on dev") == 1   # only process 0 prints

  def evals(run):
    records = [json.loads(l) for l in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    return {r["split"]: r for r in records if r["split"] in ("dev", "test")}

  ref, got = evals("one"), evals("two")
  assert ref["test"]["n"] == got["test"]["n"] == 9 and got["dev"]["n"] == 8
  for split in ("dev", "test"):
    for key in ("acc", "f1", "correct_pos", "gold_pos", "pred_pos", "n"):
      assert got[split][key] == ref[split][key], (split, key)
    np.testing.assert_allclose(got[split]["loss"], ref[split]["loss"], rtol=1e-5)
  assert (tmp_path / "two" / "plots" / "confusion_test.png").stat().st_size > 1000

  # evaluate.py and predict.py on 2 processes restore the 1-process checkpoint
  # and score the test split like one process; only process 0 prints and writes.
  def cli(module, n, *extra):
    cmd = ["bash", "launch/local.sh"] if n > 1 else [sys.executable, "-m", module]
    run = subprocess.run([*cmd, *args, f"--workdir={tmp_path / 'one'}", "--split=test", *extra],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=_env(PYTHON=sys.executable, NUM_PROCESSES=str(n), MODULE=module,
                                  DEVICES_PER_PROCESS="1", XLA_FLAGS=FAST_COMPILE))
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout

  def report(stdout):   # Gloo's connection lines may precede the JSON
    assert stdout.count('"checkpoint"') == 1   # one report: the processes joined
    return json.JSONDecoder().raw_decode(stdout, stdout.index("{"))[0]

  ref, got = (report(cli("remote_jax.evaluate", n)) for n in (1, 2))
  assert got["step"] == ref["step"] and got["test/n"] == ref["test/n"] == 9
  for key in ("test/acc", "test/f1"):
    assert got[key] == ref[key], key
  np.testing.assert_allclose(got["test/loss"], ref["test/loss"], rtol=1e-5)
  out = tmp_path / "pred.jsonl"
  assert cli("remote_jax.predict", 2, f"--out={out}").count("wrote 9 predictions") == 1
  assert sorted(json.loads(l)["index"] for l in out.read_text().splitlines()) == list(range(9))


if __name__ == "__main__":
  _worker()
