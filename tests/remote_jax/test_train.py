"""End to end on the embedded demo world, through the CLIs: train, checkpoint,
stop as if killed, resume to identical metrics, evaluate and predict.

The CLIs run in subprocesses on one CPU device and share a persistent XLA
cache, so the model compiles once for the whole file.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import FAST_COMPILE, REPO

from .test_checkpoint import scramble

SMALL_DEMO = dict(seed=3, n_train=48, n_val=16, n_test=16)
CONFIG = "--config=configs/demo.py:runlocal"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("xla_cache")
  data = tmp_path_factory.mktemp("data_cache")
  environ = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE,
                 JAX_COMPILATION_CACHE_DIR=str(cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return environ, data


def overrides(data):
  return [f"--config.data.cache_dir={data}", "--config.max_steps=6",
          "--config.eval_every_steps=3", "--config.log_every_steps=3",
          "--config.model.mot.iters=5", "--config.batch_size=4",
          "--config.eval_batch_size=8",
          *(f"--config.data.demo.{k}={v}" for k, v in SMALL_DEMO.items())]


def run_cli(env, module, *args):
  environ, _ = env
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=environ,
                        capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def full_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("full")
  environ, data = env
  out = run_cli((dict(environ, JAX_LOG_COMPILES="1"), data), "remote_jax.train", CONFIG,
                f"--workdir={workdir}", *overrides(data))
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out


def test_train_writes_checkpoints_logs_plots_and_table(full_run):
  workdir, out = full_run
  assert "model selected on dev" in out.stdout
  assert {p.name for p in (workdir / "ckpt").iterdir()} >= {"3", "6"}
  for name in ("training_curves.png", "ot_diagnostics.png", "router_weights.png",
               "confusion_test.png"):
    assert (workdir / "plots" / name).stat().st_size > 1000, name
  assert list((workdir / "tb").iterdir())
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in records} >= {"train", "dev", "test", "summary"}
  assert json.loads((workdir / "config.json").read_text())["data"]["name"] == "demo"


def test_train_step_compiles_once_before_the_state_exists(full_run):
  """setup compiles from abstract shapes, then allocates the state; the loop
  reuses that executable (a second "Compiling" would mean a mismatch)."""
  _, out = full_run
  compiles = [l for l in out.stderr.splitlines() if "Compiling jit(train_step)" in l]
  assert len(compiles) == 1, compiles
  assert out.stderr.index("compiled the train step in") < out.stderr.index("parameter groups")


# "stopped": the killed run is a real run stopped by config.stop_after_step (one more CLI
# run, slow-marked); "copied": it is the full run's step-3 checkpoint, which is what
# such a run leaves (the state and the data iterator).
@pytest.mark.parametrize("killed", ["copied", pytest.param("stopped", marks=pytest.mark.slow)])
def test_killed_run_resumes_to_identical_metrics(env, full_run, tmp_path, killed):
  """A run killed after step 3 while writing step 6 (an unreadable newest checkpoint):
  the rerun skips step 6, says why, resumes from step 3 and ends where the full run did."""
  full = json.loads((full_run[0] / "summary.json").read_text())
  if killed == "stopped":
    first = run_cli(env, "remote_jax.train", CONFIG, f"--workdir={tmp_path}",
                    *overrides(env[1]), "--config.stop_after_step=3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (tmp_path / "summary.json").exists()
  else:
    shutil.copytree(full_run[0] / "ckpt" / "3", tmp_path / "ckpt" / "3")
  shutil.copytree(full_run[0] / "ckpt" / "6", tmp_path / "ckpt" / "6")
  scramble(tmp_path / "ckpt" / "6")
  second = run_cli(env, "remote_jax.train", CONFIG, f"--workdir={tmp_path}",
                   *overrides(env[1]))
  assert second.returncode == 0, second.stderr[-3000:]
  assert "skipping checkpoint step 6: cannot restore checkpoint step 6" in second.stderr
  assert "resumed from" in second.stderr and "step 3" in second.stderr
  resumed = json.loads((tmp_path / "summary.json").read_text())
  assert resumed["last"]["step"] == full["last"]["step"] == 6
  for key, value in full["last"].items():
    assert resumed["last"][key] == pytest.approx(value, abs=1e-6), key


def test_evaluate_from_checkpoint(env, full_run):
  workdir, _ = full_run
  summary = json.loads((workdir / "summary.json").read_text())
  ev = run_cli(env, "remote_jax.evaluate", CONFIG, f"--workdir={workdir}", "--split=test",
               *overrides(env[1]))
  assert ev.returncode == 0, ev.stderr[-3000:]
  scores = json.loads(ev.stdout)
  shared = [k for k in scores if k in summary["last"]]
  assert {"test/f1", "test/acc", "test/precision"} <= set(shared)
  assert 0 < summary["wall_s"] < 600   # the run's own time, for the results tables
  # The train step's compile apart from the steps' time (bench/ot_study.py's columns).
  assert 0 < summary["compile_s"] < summary["wall_s"]
  assert 0 < summary["step_ms"] * 6 < 1e3 * summary["wall_s"]
  for key in shared:
    assert scores[key] == pytest.approx(summary["last"][key], abs=1e-6), key


def test_parameter_average_is_what_training_and_evaluate_score(env, full_run, tmp_path):
  """optim.ema: the scores logged in training and evaluate.py's are the average's (the same
  numbers), not the raw parameters' (the full run's: the average never feeds back into
  training, so its raw trajectory is this run's)."""
  args = (CONFIG, f"--workdir={tmp_path}", *overrides(env[1]), "--config.optim.ema=0.9")
  out = run_cli(env, "remote_jax.train", *args)
  assert out.returncode == 0, out.stderr[-3000:]
  last = json.loads((tmp_path / "summary.json").read_text())["last"]
  raw = json.loads((full_run[0] / "summary.json").read_text())["last"]
  assert last["test/loss"] != pytest.approx(raw["test/loss"], abs=1e-4)
  ev = run_cli(env, "remote_jax.evaluate", *args, "--split=test")
  assert ev.returncode == 0, ev.stderr[-3000:]
  assert json.loads(ev.stdout)["test/loss"] == pytest.approx(last["test/loss"], abs=1e-6)


@pytest.mark.slow   # one more CLI run (~30 s); evaluate.py restores the same way
def test_predict_from_checkpoint(env, full_run):
  workdir, _ = full_run
  summary = json.loads((workdir / "summary.json").read_text())
  pred = run_cli(env, "remote_jax.predict", CONFIG, f"--workdir={workdir}", "--split=test",
                 *overrides(env[1]))
  assert pred.returncode == 0, pred.stderr[-3000:]
  lines = (workdir / "predictions_test.jsonl").read_text().splitlines()
  assert len(lines) == SMALL_DEMO["n_test"]
  rec = json.loads(lines[0])
  assert set(rec) >= {"index", "label", "pred", "probs", "router", "triplet_type"}
  assert sum(rec["probs"].values()) == pytest.approx(1.0, abs=1e-4)
  assert sorted(json.loads(l)["index"] for l in lines) == list(range(SMALL_DEMO["n_test"]))
  correct = sum(json.loads(l)["label"] == json.loads(l)["pred"] for l in lines)
  assert 100.0 * correct / len(lines) == pytest.approx(summary["last"]["test/acc"], abs=1e-6)


def test_evaluate_on_an_unreadable_checkpoint_is_one_line(env, full_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(full_run[0] / "ckpt", workdir / "ckpt")
  scramble(workdir / "ckpt" / "6")
  ev = run_cli(env, "remote_jax.evaluate", CONFIG, f"--workdir={workdir}", *overrides(env[1]))
  assert ev.returncode == 2, ev.stderr[-3000:]
  assert "error: cannot restore checkpoint step 6" in ev.stderr
  assert "Traceback" not in ev.stderr, ev.stderr[-3000:]


def test_bad_config_arg_is_one_clear_line(env, tmp_path):
  out = run_cli(env, "remote_jax.train", "--config=configs/demo.py:mot=sinkhornish",
                f"--workdir={tmp_path}", f"--config.data.cache_dir={env[1]}",
                *(f"--config.data.demo.{k}={v}" for k, v in SMALL_DEMO.items()))
  assert out.returncode == 2, out.stderr[-2000:]
  assert "model.mot.variant" in out.stderr and "Traceback" not in out.stderr


def test_bad_marker_init_fails_before_compiling(env, tmp_path):
  out = run_cli(env, "remote_jax.train", CONFIG, f"--workdir={tmp_path}",
                *overrides(env[1]), "--config.model.text.marker_init=puntc")
  assert out.returncode == 2, out.stderr[-2000:]
  assert "model.text.marker_init='puntc': allowed 'normal'" in out.stderr
  assert "Traceback" not in out.stderr and "compiled the train step" not in out.stderr


@pytest.mark.slow
def test_demo_learns_well_above_chance(env, tmp_path):
  """The default demo (make run) trains to an F1 far above chance on every triplet type."""
  out = run_cli(env, "remote_jax.train", "--config=configs/demo.py", f"--workdir={tmp_path}",
                f"--config.data.cache_dir={env[1]}")
  assert out.returncode == 0, out.stderr[-3000:]
  best = json.loads((tmp_path / "summary.json").read_text())["best_dev"]
  # Seeds 0 and 1 of the demo ablation (bench/ot_study.py): test F1 90.0 / 93.9, o-o 82.5 / 84.9, e-o
  # 87.8 / 97.1, compositional 88.5 / 96.7 (docs/benchmarks.md); chance is 0 (all `none`).
  assert best["test/f1"] > 85.0, best
  for bucket in ("e-e", "o-o", "e-o", "compositional"):
    assert best[f"test/{bucket}/f1"] > 75.0, (bucket, best)
  # The per-triplet router does not collapse: triplet types get different expert mixes.
  router = json.loads((tmp_path / "plots" / "router_by_type.json").read_text())
  mix = {t: np.array([w for k, w in v.items() if k != "n"]) for t, v in router.items()}
  assert max(np.abs(mix["e-e"] - mix[t]).sum() for t in ("o-o", "e-o")) > 0.5, router
