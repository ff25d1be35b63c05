"""bench/ot_study.py: paired bootstrap statistics, the table, skip-on-rerun and failure
recording (a fake runner, no training), and one tiny real study (slow)."""
import json
import pathlib

import pytest

from bench import ot_study
from tests.conftest import FAST_COMPILE, REPO


def test_bootstrap_interval_of_known_numbers():
  assert ot_study.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
  # Resamples of two points have mean 0, 0.5 or 1: the 95% interval is [0, 1].
  assert ot_study.bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
  # 1..5: the mean's bootstrap standard error is sqrt(2 / 5) = 0.63, so about 3 ± 1.24.
  lo, hi = ot_study.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0])
  assert 1.6 < lo < 2.0 and 4.0 < hi < 4.4
  assert ot_study.bootstrap_ci([1.0, 2.0, 3.0, 4.0, 5.0]) == (lo, hi)   # seeded


def test_the_difference_is_paired_by_seed(monkeypatch):
  # Seed-to-seed spread of 10 points, yet every seed gains exactly 1: separated.
  d = ot_study.paired_difference({0: 80.0, 1: 90.0, 2: 100.0}, {0: 79.0, 1: 89.0, 2: 99.0})
  assert d["mean"] == pytest.approx(1.0) and d["ci"] == pytest.approx([1.0, 1.0])
  assert d["separated"] is True and d["seeds"] == [0, 1, 2]
  # Only the common seeds count (seed 3 has no baseline, seed 4 no variant run).
  d = ot_study.paired_difference({0: 90.0, 1: 92.0, 2: 94.0, 3: 0.0},
                                 {0: 88.0, 1: 91.0, 2: 90.0, 4: 50.0})
  assert d["n"] == 3 and d["mean"] == pytest.approx(7 / 3)
  assert 1.0 <= d["ci"][0] < d["mean"] < d["ci"][1] <= 4.0 and d["separated"] is True
  # Differences of both signs: the interval holds 0.
  d = ot_study.paired_difference({0: 1.0, 1: 3.0, 2: 2.0}, {0: 2.0, 1: 2.0, 2: 2.0})
  assert d["ci"][0] < 0 < d["ci"][1] and d["separated"] is False
  # Differences of one sign, however small, are always separated (docs/benchmarks.md).
  assert ot_study.paired_difference({0: 0.01, 1: 5.0}, {0: 0.0, 1: 0.0})["separated"] is True
  # An interval whose bound is 0 up to rounding does not exclude 0 (moe=off, 250 examples:
  # -2.5 [-5.6, -2.8e-15] from accuracies on 600 lines).
  diffs = {0: 2 / 3, 1: 2 / 3, 2: -1 / 3, 3: -1 / 3, 4: -2 / 3}
  rounded = sum([2 / 3, 2 / 3, -1 / 3, -1 / 3, -2 / 3])
  assert rounded != 0 and abs(rounded) < 1e-12   # the float sum that made the artefact
  monkeypatch.setattr(ot_study, "bootstrap_ci", lambda d, n: (-5.6, rounded))
  assert ot_study.paired_difference(diffs, dict.fromkeys(diffs, 0.0))["separated"] is False
  monkeypatch.setattr(ot_study, "bootstrap_ci", lambda d, n: (-5.6, -0.01))
  assert ot_study.paired_difference(diffs, dict.fromkeys(diffs, 0.0))["separated"] is True
  monkeypatch.undo()
  # One common seed: a difference but no interval.
  d = ot_study.paired_difference({0: 91.0}, {0: 90.0, 1: 80.0})
  assert d["mean"] == pytest.approx(1.0) and d["ci"] is None and d["separated"] is None


def record(variant, seed, f1, **kw):
  metrics = {"test/f1": f1, "test/e-e/f1": 100.0, "test/o-o/f1": 99.0,
             "test/e-o/f1": f1 - 5, "test/compositional/f1": f1 - 6, "dev/f1": f1 + 1}
  return {"variant": variant, "seed": seed, "status": "ok", "metrics": metrics,
          "ot": kw.pop("ot", {}), "step_ms": 80.0 + seed, "compile_s": 20.0 - seed,
          "peak_mb": 1000.0 + seed, "cpu_s": 100.0, **kw}


RECORDS = [
    *(record("none", s, 90.0 + s) for s in range(3)),
    *(record("uniform", s, 90.5 + s, ot={"text_1/plan_entropy": 1.0,
                                         "text_1/marginal_error": 1e-4}) for s in range(3)),
    *(record("ot_paper", s, 92.0 + s, ot={"text_1/plan_entropy": 0.7 + 0.1 * s,
                                          "vision_1/plan_entropy": 0.5,
                                          "text_1/marginal_error": 3e-4}) for s in range(3)),
    {"variant": "ot_paper", "seed": 3, "status": "failed", "error": "RuntimeError: exit 1: nan"},
]


def test_summary_rows_and_table():
  rows = ot_study.summarise(RECORDS, ["none", "uniform", "ot_paper"])
  ot = rows[2]
  assert ot["seeds"] == [0, 1, 2] and ot["failed"] == {3: "RuntimeError: exit 1: nan"}
  assert ot["test/f1"]["mean"] == pytest.approx(93.0)
  assert ot["vs"]["none"]["test/f1"]["mean"] == pytest.approx(2.0)
  assert ot["vs"]["none"]["test/f1"]["separated"] is True
  assert ot["vs"]["uniform"]["test/f1"]["ci"] == pytest.approx([1.5, 1.5])
  assert "none" not in rows[0]["vs"] and rows[0]["vs"]["uniform"]["test/f1"]["mean"] == -0.5
  # Timing: mean step, max compile (the cold one) and max peak over the seeds.
  assert (ot["step_ms"], ot["compile_s"], ot["peak_mb"]) == (81.0, 20.0, 1002.0)
  assert ot["ot"]["text_1"]["plan_entropy"]["mean"] == pytest.approx(0.8)
  assert set(ot["ot"]) == {"text_1", "vision_1"}

  table = ot_study.format_table(rows)
  lines = table.splitlines()
  assert lines[0].startswith("| variant | seeds | F1 all | e-e | o-o | e-o | compositional |")
  assert "Δ all vs none [95% CI] | separated | Δ all vs uniform [95% CI] | separated" in lines[0]
  assert lines[2].startswith("| `none` | 3 | 91.00 ± 0.82 | 100.00 ± 0.00 |")
  assert "| n/a | n/a | -0.50 [-0.50, -0.50] | yes | 81.0 | 20.0 | 1002 | 100 |" in lines[2]
  assert lines[4].startswith("| `ot_paper` | 3 | 93.00 ± 0.82 |")
  assert "| +2.00 [+2.00, +2.00] | yes | +1.50 [+1.50, +1.50] | yes |" in lines[4]
  assert "| variant | level | marginal_error | plan_entropy |" in table
  assert "| `ot_paper` | text_1 | 0.0003 ± 0 | 0.8 ± 0.0816 |" in table
  assert "| `ot_paper` | vision_1 |  | 0.5 ± 0 |" in table
  assert "- `ot_paper` seed 3: RuntimeError: exit 1: nan" in table
  # The summary is JSON as printed (seed keys become strings).
  json.dumps(rows)


def test_a_variant_without_baselines_or_a_second_seed_says_na():
  nan_diag = record("xattn", 1, 95.0, ot={"text_1/gate_mean": None})
  nan_diag["metrics"]["test/f1"] = None
  rows = ot_study.summarise([record("xattn", 0, 90.0), nan_diag], ["xattn"])
  assert rows[0]["vs"] == {} and rows[0]["ot"] == {}
  assert rows[0]["test/f1"]["n"] == 1 and rows[0]["test/e-o/f1"]["n"] == 2
  assert "| `xattn` | 2 | 90.00 | 100.00 ± 0.00 |" in ot_study.format_table(rows)
  rows = ot_study.summarise([record("none", 0, 90.0), record("xattn", 0, 91.0)],
                            ["none", "xattn"])
  assert "| +1.00 (n=1) | n/a |" in ot_study.format_table(rows)


def test_bucket_f1s_become_columns_and_the_table_compares_the_chosen_metric():
  def run(variant, seed, colour):
    metrics = {"test/f1": 90.0, "test/e-o/f1": 90.0, "test/colour/f1": colour,
               "test/shape/f1": 99.0, "dev/f1": 91.0, "test/loss": 0.3, "dev/colour/f1": 1.0,
               "test/colour/acc": colour - 10, "test/colour/precision": 1.0}
    return {"variant": variant, "seed": seed, "status": "ok", "metrics": metrics}
  records = [run(v, s, c + s) for v, c in (("none", 60.0), ("skip", 95.0), ("ot_paper", 80.0))
             for s in range(3)]
  # A run's summary keeps test F1s (types and buckets) and dev F1, nothing else.
  kept = ot_study.record_from_summary({"best_dev": {**records[0]["metrics"], "step": 4}})
  assert set(kept["metrics"]) == {"test/f1", "test/e-o/f1", "test/colour/f1",
                                  "test/shape/f1", "dev/f1", "test/colour/acc"}
  rows = ot_study.summarise(records, ["none", "skip", "ot_paper"], ("none", "skip"))
  assert ot_study.score_keys(rows) == ["test/f1", "test/e-o/f1", "test/colour/f1",
                                    "test/shape/f1", "test/colour/acc"]
  assert rows[2]["vs"]["skip"]["test/colour/f1"]["mean"] == pytest.approx(-15.0)
  table = ot_study.format_table(rows, ("none", "skip"), "test/colour/f1")
  head, _, _, _, ot_row = table.splitlines()[:5]
  assert head.startswith("| variant | seeds | F1 all | e-o | colour | shape | colour acc | "
                         "Δ colour vs none")
  assert "| +20.00 [+20.00, +20.00] | yes | -15.00 [-15.00, -15.00] | yes |" in ot_row
  table = ot_study.format_table(rows, ("none",), "test/colour/acc")
  assert "| Δ colour acc vs none [95% CI] |" in table.splitlines()[0]


def test_rescore_rebuilds_records_from_the_runs_summaries(tmp_path):
  jobs = jobs_for(tmp_path, ["none"], [0, 1])
  old = {"variant": "none", "seed": 0, "config": "demo.py:mot=none", "overrides": [],
         "status": "ok", "metrics": {"test/f1": 1.0}, "cpu_s": 7.0}
  (tmp_path / "results.jsonl").write_text(json.dumps(old) + "\n")
  jobs[0].workdir.mkdir(parents=True)
  (jobs[0].workdir / "summary.json").write_text(json.dumps(
      {"best_dev": {"step": 3, "test/f1": 2.0, "test/colour/acc": 55.0}}))
  assert ot_study.rescore(jobs, tmp_path) == 1   # seed 1 has no record: left to train
  record, = ot_study.load_results(tmp_path / "results.jsonl").values()
  assert record["metrics"] == {"test/f1": 2.0, "test/colour/acc": 55.0}
  assert record["cpu_s"] == 7.0 and record["best_step"] == 3


def jobs_for(tmp_path, variants, seeds):
  return [ot_study.Job(v, s, f"demo.py:mot={v}", (), tmp_path / "runs" / v / f"seed_{s}")
          for v in variants for s in seeds]


def test_failures_are_recorded_and_finished_runs_skipped(tmp_path):
  calls = []

  def runner(job):
    calls.append((job.variant, job.seed))
    if (job.variant, job.seed) == ("xattn", 1):
      raise RuntimeError("exit 1: error: out of memory")
    return record(job.variant, job.seed, 90.0)

  jobs = jobs_for(tmp_path, ["none", "xattn"], [0, 1])
  out = tmp_path / "out"
  records = ot_study.run_study(jobs, out, runner, parallel=1, log=lambda m: None)
  # Seed by seed, so that every variant has its first seeds early.
  assert calls == [("none", 0), ("xattn", 0), ("none", 1), ("xattn", 1)]
  assert [r["status"] for r in records] == ["ok", "ok", "ok", "failed"]
  assert records[3]["error"] == "RuntimeError: exit 1: error: out of memory"
  lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
  assert len(lines) == 4 and {r["config"] for r in lines} == {"demo.py:mot=none",
                                                              "demo.py:mot=xattn"}

  # A rerun trains only the failed run, plus a new seed, and reads a run whose
  # summary.json exists (an interrupted study) instead of training it.
  calls.clear()
  done = tmp_path / "runs" / "none" / "seed_2"
  done.mkdir(parents=True)
  (done / "summary.json").write_text(json.dumps(
      {"best_dev": {"step": 7, "test/f1": 88.0, "test/ot/text_1/gate_mean": 0.5},
       "step_ms": 70.0, "compile_s": 9.0, "wall_s": 50.0}))
  records = ot_study.run_study(jobs_for(tmp_path, ["none", "xattn"], [0, 1, 2]), out, runner,
                               parallel=2, log=lambda m: None)
  assert sorted(calls) == [("xattn", 1), ("xattn", 2)]
  assert records[2]["metrics"] == {"test/f1": 88.0} and records[2]["best_step"] == 7
  assert records[2]["ot"] == {"text_1/gate_mean": 0.5} and records[2]["step_ms"] == 70.0
  lines = (out / "results.jsonl").read_text().splitlines()
  assert len(lines) == 6   # one line per run after the rewrite


def test_seeds_variants_and_configs(tmp_path):
  assert ot_study.parse_seeds("0-4") == [0, 1, 2, 3, 4]
  assert ot_study.parse_seeds("0-2,5,1") == [0, 1, 2, 5]
  with pytest.raises(ValueError, match="'a' is not N or N-M"):
    ot_study.parse_seeds("0,a")
  fusions = {"none": None, "ot_paper": None, "xattn": None}
  jobs = ot_study.make_jobs("ot_study.py", ["xattn", "mot=none", "box=pre_norm", "none"], [0, 3],
                            "moe=off", ("--config.num_epochs=1",), tmp_path, fusions)
  assert [(j.variant, j.seed) for j in jobs] == [("xattn", 0), ("xattn", 3), ("none", 0),
                                                 ("none", 3), ("box=pre_norm", 0),
                                                 ("box=pre_norm", 3)]
  assert jobs[0].config == "ot_study.py:mot=xattn,moe=off"
  assert jobs[1].workdir.parent.parent == tmp_path / "runs" and jobs[1].workdir.name == "seed_3"
  assert jobs[1].workdir.parent.name.startswith("xattn__moe-off__")
  assert jobs[4].config == "ot_study.py:moe=off"
  assert jobs[4].overrides == ("--config.model.box_position=pre_norm", "--config.num_epochs=1")
  assert jobs[4].workdir.parent.name.startswith("box-pre_norm__moe-off__")
  # Another config or override: other directories, so a rerun never reuses these runs.
  other = ot_study.make_jobs("ot_study.py", ["xattn"], [0], "moe=off",
                             ("--config.num_epochs=2",), tmp_path, fusions)
  again = ot_study.make_jobs("ot_study.py", ["xattn"], [0], "moe=off",
                             ("--config.num_epochs=1",), tmp_path, fusions)
  assert other[0].workdir != jobs[0].workdir == again[0].workdir
  assert "--config.seed=3" in ot_study.train_command(jobs[1])


def test_an_unknown_variant_stops_the_study_before_training(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    ot_study.main(["--variants", "none,nonesuch", "--out", str(tmp_path)])
  assert e.value.code == 2
  err = capsys.readouterr().err.splitlines()[0]
  assert err.startswith("error: --variants: unknown mot variant 'nonesuch'; known: ot_paper,")
  assert not (tmp_path / "results.jsonl").exists()


def test_the_study_config_is_the_demo_with_fewer_epochs_and_a_cheaper_fgw():
  from remote_jax import cli
  demo, study = cli.load_config("demo.py").to_dict(), cli.load_config("ot_study.py").to_dict()
  assert {k for k in demo if demo[k] != study[k]} == {"num_epochs", "plots", "model"}
  assert (study["num_epochs"], study["plots"]) == (demo["num_epochs"] // 2, False)
  # ... and fgw's GW linearisations (its step is about proportional to them).
  demo["model"]["mot"]["outer_iters"] = 3
  assert demo["model"] == study["model"]


@pytest.mark.slow
def test_a_tiny_study_end_to_end(tmp_path, monkeypatch, capsys):
  # Two variants, one seed, demo.py:runlocal on a 48-example world: every output exists
  # and the OT variant's plan diagnostics come through.
  monkeypatch.chdir(REPO)
  monkeypatch.setenv("PYTHONPATH", str(REPO))
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
  small = dict(seed=3, n_train=48, n_val=16, n_test=16)
  ot_study.main(["--config", "demo.py:runlocal", "--variants", "none,ot_paper", "--seeds", "0",
                 "--out", str(tmp_path), f"--config.data.cache_dir={tmp_path / 'data'}",
                 "--config.max_steps=4", "--config.eval_every_steps=2",
                 "--config.model.mot.iters=5", "--config.plots=False",
                 *(f"--config.data.demo.{k}={v}" for k, v in small.items())])
  summary = json.loads(capsys.readouterr().out)
  assert summary["runs"] == 2 and summary["failed"] == 0, summary
  lines = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
  for r in lines:
    assert r["status"] == "ok" and r["peak_mb"] > 100 and r["compile_s"] > 0
    assert r["step_ms"] > 0 and set(ot_study.F1_KEYS) <= set(r["metrics"])
  ot = next(r for r in lines if r["variant"] == "ot_paper")["ot"]
  assert any(k.endswith("/plan_entropy") for k in ot), ot
  assert pathlib.Path(summary["plot"]).stat().st_size > 0
  assert "| `ot_paper` | 1 |" in (tmp_path / "table.md").read_text()
  assert len(list((tmp_path / "runs").glob("none__*/seed_0/summary.json"))) == 1
