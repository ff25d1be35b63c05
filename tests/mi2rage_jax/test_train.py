"""MI2RAGE end to end on the demo world, from the CLI: stages, selections, checkpoints, resume."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mi2rage_jax import models
from remote_jax import engine
from tests.conftest import FAST_COMPILE, REPO, C, one_device
from tests.conftest import mi2rage_model_cfg as model_cfg


def _cli(workdir, arg, *extra):
  env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = FAST_COMPILE   # one device is enough here
  proc = subprocess.run(
      [sys.executable, "-m", "mi2rage_jax.train", "--config", f"configs/mi2rage_demo.py:{arg}",
       "--workdir", str(workdir), *extra], cwd=REPO, env=env, capture_output=True, text=True,
      check=False, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads((workdir / "summary.json").read_text()), proc.stderr


def _check_metrics(res):
  """The scores are the counts' (micro F1 over positive classes, `none` excluded), and the
  per-triplet-type and per-family buckets split the examples."""
  p = 100 * res["correct_pos"] / max(res["pred_pos"], 1)
  r = 100 * res["correct_pos"] / max(res["gold_pos"], 1)
  assert res["precision"] == pytest.approx(p) and res["recall"] == pytest.approx(r)
  assert res["f1"] == pytest.approx(2 * p * r / (p + r) if p + r else 0.0)
  assert sum(t["n"] for t in res["per_type"].values()) == res["n"]
  # The knowledge world's families split the test set too.
  if "buckets" in res:
    assert sum(b["n"] for b in res["buckets"].values()) == res["n"]
  assert res["gold_pos"] <= res["n"] and res["correct_pos"] <= min(res["pred_pos"],
                                                                   res["gold_pos"])


def _check_outputs(run_dir, rounds):
  for r in range(rounds + 1):
    for split in ("train", "test"):
      sel = json.loads((run_dir / "selections" / f"{split}_round{r}.json").read_text())
      assert sel["round"] == r and sel["instances"]
      for entry in sel["instances"].values():
        assert set(entry["kept"]) <= set(entry["candidates"])
        assert sorted(entry["ranking"]) == sorted(entry["candidates"])
    assert (run_dir / "ckpt" / f"teacher_round{r}").is_dir()
  assert any((run_dir / "ckpt").glob("student*_n*"))
  assert (run_dir / "views" / "train" / "manifest.json").exists()
  res = json.loads(next((run_dir / "results").glob("test_*.json")).read_text())
  n_test = sum(1 for _ in json.loads((run_dir / "selections" / f"test_round{rounds}.json")
                                     .read_text())["instances"])
  assert res["append_real"] and res["n"] == n_test
  _check_metrics(res)
  div = json.loads((run_dir / "results" / "diversity.json").read_text())
  assert [d["round"] for d in div["rounds"]] == list(range(rounds + 1))


@pytest.mark.slow   # every stage in one process, then in two: ~3 min on 2 cores
def test_two_processes_run_every_stage_like_one(tmp_path):
  """launch/local.sh: two processes joined by jax.distributed run all stages of the CLI;
  only the main process writes (views, selections, results), and the outcome is the
  one-process run's."""
  arg = "fast,size=micro,setting=no_real_image"   # synthetic images: PNG files written
  one = _cli(tmp_path / "one", arg)[0]["no_real_image"]
  env = dict(os.environ, PYTHONPATH=str(REPO), PYTHON=sys.executable, NUM_PROCESSES="2",
             DEVICES_PER_PROCESS="1", MODULE="mi2rage_jax.train", XLA_FLAGS=FAST_COMPILE,
             HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  for k in ("REMOTE_JAX_PROCESS_ID", "REMOTE_JAX_DISTRIBUTED", "SLURM_NTASKS"):
    env.pop(k, None)
  proc = subprocess.run(["bash", "launch/local.sh", "--config",
                         f"configs/mi2rage_demo.py:{arg}", "--workdir", str(tmp_path / "two")],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  two = json.loads((tmp_path / "two" / "summary.json").read_text())["no_real_image"]
  assert set(two["stages"].values()) == {"ran"}
  for key in ("n", "acc", "f1", "correct_pos", "pred_pos", "gold_pos"):
    assert two["test"][key] == pytest.approx(one["test"][key], abs=1e-4), key
  run_one, run_two = tmp_path / "one" / "no_real_image", tmp_path / "two" / "no_real_image"
  _check_outputs(run_two, 1)
  for sel in sorted((run_one / "selections").glob("*.json")):
    a, b = (json.loads(p.read_text())["instances"] for p in (sel, run_two / "selections" /
                                                             sel.name))
    assert {i: e["kept"] for i, e in a.items()} == {i: e["kept"] for i, e in b.items()}, sel
  assert not list(run_two.rglob("*.tmp"))


def _fast_cli_run(tmp_path):
  arg = "fast,size=micro,setting=no_real_text"
  summary, log = _cli(tmp_path, arg, "--config.xla_cpu=fast")
  preset = "--xla_cpu_experimental_ynn_fusion_type= (config.xla_cpu=fast -> fast)"
  assert f"XLA_FLAGS={FAST_COMPILE} {preset}" in log
  first = summary["no_real_text"]
  assert set(first["stages"].values()) == {"ran"}
  assert list(first["stages"]) == ["generate_0", "teacher_0", "select_0", "generate_1",
                                   "teacher_1", "select_1", "student", "test", "diversity"]
  _check_outputs(tmp_path / "no_real_text", 1)
  return arg, first


def test_fast_cli_runs_all_stages(tmp_path):
  _fast_cli_run(tmp_path)


@pytest.mark.slow   # a second CLI run (~40 s); test_both_settings_end_to_end reruns too
def test_fast_cli_rerun_skips_finished_stages(tmp_path):
  arg, first = _fast_cli_run(tmp_path)
  run_dir = tmp_path / "no_real_text"
  selections = (run_dir / "selections" / "train_round1.json").read_text()
  # A rerun skips every finished stage; a removed stage output is recomputed.
  (run_dir / "stages" / "test_ntr3_nte3.done").unlink()
  second = _cli(tmp_path, arg, "--eval_views", "1")[0]["no_real_text"]
  assert second["stages"]["test"] == "ran"
  assert {v for k, v in second["stages"].items() if k != "test"} == {"skipped"}
  assert second["test"]["f1"] == first["test"]["f1"]        # student restored, not retrained
  assert (run_dir / "selections" / "train_round1.json").read_text() == selections
  one = json.loads((run_dir / "results" / "test_ntr3_nte1.json").read_text())
  assert one["n_test_views"] == 1 and second["eval"]["1"]["f1"] == one["f1"]


@pytest.mark.slow
def test_both_settings_end_to_end(tmp_path):
  summary, _ = _cli(tmp_path, "fast,size=micro")
  for setting in ("no_real_text", "no_real_image"):
    assert set(summary[setting]["stages"].values()) == {"ran"}
    _check_outputs(tmp_path / setting, 1)
  again, _ = _cli(tmp_path, "fast,size=micro")
  for setting in ("no_real_text", "no_real_image"):
    assert set(again[setting]["stages"].values()) == {"skipped"}


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["teacher=random", "teacher=none", "teacher=similarity",
                                 "rounds=0", "unimodal", "test_by=maxprob"])
def test_ablations_run(tmp_path, arg):
  summary, _ = _cli(tmp_path, f"fast,size=micro,setting=no_real_image,{arg}")
  test = summary["no_real_image"]["test"]
  key, _, value = arg.partition("=")
  expect = {"teacher": ("teacher", value), "rounds": ("rounds", 0),
            "unimodal": ("unimodal", True), "test_by": ("test_criterion", value)}[key]
  assert test[expect[0]] == expect[1]
  _check_metrics(test)


def test_a_test_criterion_that_reads_labels_is_refused(tmp_path):
  from configs import mi2rage_demo  # pylint: disable=import-outside-toplevel
  from mi2rage_jax import pipeline  # pylint: disable=import-outside-toplevel
  for bad in ("loss", "agreee"):
    config = mi2rage_demo.get_config(f"fast,size=micro,test_by={bad}")
    with pytest.raises(ValueError, match="teacher.test_criterion .*allowed"):
      pipeline.Run(config, tmp_path, "no_real_image", None, None)


def test_fit_resumes_after_an_interruption(tmp_path):
  """fit (remote_jax.trainer's) killed mid-run and called again equals an uninterrupted
  run; a finished run is restored, not retrained."""
  model = models.build_teacher("text", model_cfg(), C)
  rng = np.random.default_rng(0)
  ids = rng.integers(5, 100, (16, 10)).astype(np.int32)
  data = dict(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=np.ones_like(ids),
              subj_pos=rng.integers(1, 3, 16).astype(np.int32),
              obj_pos=rng.integers(3, 7, 16).astype(np.int32),
              label=rng.integers(0, C, 16).astype(np.int32))
  optim = dict(lr=1e-3, warmup_ratio=0.0)   # one_device completes it

  def draw(rng):
    return rng.choice(16, 4)

  def make(idx):
    return {k: v[idx] for k, v in data.items()}

  class Interrupt(Exception):
    pass

  calls = []

  def failing(idx):
    calls.append(1)
    if len(calls) == 4:
      raise Interrupt
    return make(idx)

  def fit(directory, make, ckpt_every=2):
    return engine.fit(one_device(model, data, 5, optim), draw, make, 5, 0, tmp_path / directory,
                      ckpt_every=ckpt_every)

  with pytest.raises(Interrupt):
    fit("a", failing)
  assert (tmp_path / "a" / "2").is_dir() and not (tmp_path / "a" / "4").exists()
  resumed = fit("a", make)
  straight = fit("b", make)
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
  assert not all(np.array_equal(x, y) for x, y in zip(
      jax.tree.leaves(straight), jax.tree.leaves(one_device(model, data).state.params)))
  again = fit("a", None, 0)   # finished: restored
  for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(x, y)


def _eight_step_teacher_setup(tmp_path, arg, setting="no_real_image"):
  """(config, dataset, encoder) of a fast run of `setting` without CCG (`arg`: more config
  args) whose teacher trains 8 steps."""
  from configs import mi2rage_demo  # pylint: disable=import-outside-toplevel
  from mi2rage_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  config = mi2rage_demo.get_config(f"fast,size=micro,setting={setting},rounds=0,{arg}")
  with config.unlocked():
    config.data.cache_dir = str(tmp_path / "data_cache")
    config.teacher.steps = 8
  dataset = data_lib.load(config.data)
  encoder = data_lib.Encoder.from_config(config.data)
  with config.unlocked():
    config.model.text.vocab_size = encoder.vocab_size
  return config, dataset, encoder


@pytest.mark.parametrize("folds", [1, 2])
def test_cross_fitted_teacher_never_scores_what_it_trained_on(tmp_path, folds):
  """teacher.folds=2: a training view is scored by the teacher that did not train on its
  fold, so changing one instance's label leaves the scores of the other instances of its
  fold unchanged; with one teacher (the paper) they move."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from mi2rage_jax import pipeline  # pylint: disable=import-outside-toplevel
  config, dataset, encoder = _eight_step_teacher_setup(
      tmp_path, f"folds={folds},world=shapes")

  def scores(ds, name):
    run = pipeline.Run(config, tmp_path / name, "no_real_image", ds, encoder)
    for stage in ("generate_0", "teacher_0", "select_0"):
      run._stage(stage, lambda s=stage: getattr(run, f"_{s.split('_')[0]}")(0))  # pylint: disable=protected-access
    sel = json.loads((tmp_path / name / "selections" / "train_round0.json").read_text())
    return run, {iid: e["scores"] for iid, e in sel["instances"].items()}

  run, base = scores(dataset, "base")
  train = dataset.splits["train"]
  x = train[0]
  changed = dataclasses.replace(x, label=(x.label + 1) % len(dataset.relations))
  other = dataclasses.replace(dataset, splits=dict(dataset.splits, train=[changed] + train[1:]))
  _, moved = scores(other, "moved")
  assert base[x.id] != moved[x.id]                      # its own loss reads its label
  mates = [i.id for i in train[1:] if run.fold_of(i.id) == run.fold_of(x.id)]
  assert mates
  same = [np.allclose(base[i], moved[i], atol=1e-6) for i in mates]
  if folds == 2:
    assert all(same), same
    assert {run.fold_of(i.id) for i in train} == {0, 1}
    assert all((tmp_path / "base" / "ckpt" / f"teacher_round0_fold{f}").is_dir() for f in (0, 1))
  else:
    assert not all(same)


def test_oracle_selection_keeps_the_faithful_views_first(tmp_path):
  """teacher=oracle (the analysis's upper bound): per instance, no unfaithful view is kept
  while a faithful one is left out."""
  from configs import mi2rage_demo  # pylint: disable=import-outside-toplevel
  from mi2rage_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from mi2rage_jax import pipeline  # pylint: disable=import-outside-toplevel
  config = mi2rage_demo.get_config("fast,size=micro,setting=no_real_image,teacher=oracle,"
                                   "world=shapes,rounds=0,noise=0.5")
  with config.unlocked():
    config.data.cache_dir = str(tmp_path / "data_cache")
  dataset = data_lib.load(config.data)
  encoder = data_lib.Encoder.from_config(config.data)
  run = pipeline.Run(config, tmp_path / "run", "no_real_image", dataset, encoder)
  assert run.stage_names()[:2] == ["generate_0", "select_0"]     # no teacher to train
  run._generate(0)   # pylint: disable=protected-access
  run._select(0)     # pylint: disable=protected-access
  mixed = 0
  for split in ("train", "test"):
    cands = run.candidates(split, 0)
    for iid, entry in run.load_selection(split, 0).items():
      ok = {v.id: v.meta["faithful"] for v in cands[iid]}
      kept = [ok[v] for v in entry["kept"]]
      left = [ok[v] for v in entry["candidates"] if v not in entry["kept"]]
      assert not (any(left) and not all(kept)), (iid, kept, left)
      mixed += len(set(ok.values())) == 2
  assert mixed   # noise 0.5: some instances have both kinds, so the test can fail


@pytest.mark.parametrize("setting", ["no_real_image", "no_real_text"])
@pytest.mark.parametrize("test_by", ["agree", "real"])
def test_test_view_ranking_never_reads_the_test_labels(tmp_path, test_by, setting):
  """teacher.test_criterion agree / real rank a test instance's views without its label:
  other test labels give the same scores. real scores each view against the teacher's
  prediction on the instance's real view: with a candidate standing in for the real view,
  that candidate's score is its maxprob score."""
  import dataclasses  # pylint: disable=import-outside-toplevel

  from mi2rage_jax import pipeline  # pylint: disable=import-outside-toplevel
  config, dataset, encoder = _eight_step_teacher_setup(tmp_path, f"test_by={test_by}", setting)
  run = pipeline.Run(config, tmp_path / "run", setting, dataset, encoder)
  for stage in ("generate_0", "teacher_0"):
    run._stage(stage, lambda s=stage: getattr(run, f"_{s.split('_')[0]}")(0))  # pylint: disable=protected-access
  cands = run.candidates("test", 0)
  base = run._scores(0, "test", cands)   # pylint: disable=protected-access
  n = len(dataset.relations)
  flipped = [dataclasses.replace(i, label=(i.label + 1) % n) for i in dataset.splits["test"]]
  run.ds = dataclasses.replace(dataset, splits=dict(dataset.splits, test=flipped))
  again = run._scores(0, "test", cands)  # pylint: disable=protected-access
  for iid, s in base.items():
    np.testing.assert_allclose(again[iid], s, atol=1e-6)
  if test_by == "real":
    first = {iid: vs[0] for iid, vs in cands.items()}
    run._real_as_view = lambda inst: first[inst.id]   # pylint: disable=protected-access
    stand_in = run._scores(0, "test", cands)           # pylint: disable=protected-access
    with config.unlocked():
      config.teacher.test_criterion = "maxprob"
    maxprob = run._scores(0, "test", cands)            # pylint: disable=protected-access
    for iid in cands:
      np.testing.assert_allclose(stand_in[iid][0], maxprob[iid][0], atol=1e-6)
      assert (stand_in[iid] >= maxprob[iid] - 1e-6).all()   # maxprob: the lowest loss
