r"""Runs MI2RAGE: `python -m mi2rage_jax.train --config configs/mi2rage_demo.py --workdir DIR`.

Each setting of `config.settings` runs in DIR/<setting>/ (stages: generate_r /
teacher_r / select_r for r = 0..K, student, test, diversity; see pipeline.py).
A rerun skips finished stages and resumes an interrupted one. Ablations are
config args (`configs/mi2rage_demo.py:teacher=random,rounds=0`). `--seeds 0,1,2`
runs each seed in DIR/seed_N and writes DIR/seeds_summary.json (mean, std); the
harness (flags, XLA preset, jax.distributed, one-line errors) is remote_jax.cli's,
and teachers and students train on remote_jax.engine (config.mesh).
`--eval_views 1,2,4` also evaluates the trained students with those numbers of
test-time views (results/test_ntr*_nte*.json).
"""
import json
import os
import pathlib

from absl import flags

from remote_jax import cli, distributed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

cli.define_train_flags()
_EVAL_VIEWS = flags.DEFINE_string(
    "eval_views", "", "Comma list of test-time view counts to evaluate the trained student "
    "with besides student.n_test_views (paper fig. 5, bottom row).")


def run(config, workdir, eval_views=()):
  """All settings of `config` in `workdir`; returns {setting: {"stages", "test", "eval"}}."""
  from mi2rage_jax import data as data_lib
  from mi2rage_jax import pipeline
  from remote_jax.writers import MetricWriter

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with config.unlocked():
    if config.data.name == "demo" and not config.data.root and not config.data.cache_dir:
      config.data.cache_dir = str(workdir / "data_cache")
  dataset = data_lib.load(config.data)
  encoder = data_lib.Encoder.from_config(config.data)
  with config.unlocked():
    config.model.text.vocab_size = encoder.vocab_size
  summary = {}
  with MetricWriter(workdir) as writer:
    writer.write_config(config)
    for setting in config.settings:
      r = pipeline.Run(config, workdir / setting, setting, dataset, encoder, writer)
      stages = r.run()
      ntr, nte = r.n_views(r.train_split), r.n_views(r.test_split)
      res = workdir / setting / "results" / f"test_ntr{ntr}_nte{nte}.json"
      summary[setting] = {"stages": stages,
                          "test": json.loads(res.read_text()) if res.exists() else None,
                          "eval": {int(n): r.write_test(int(n)) for n in eval_views}}
  if distributed.is_main():
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  return summary


def _report(summary, config):
  del config   # the harness passes it; the summary names its settings
  lines = []
  for setting, s in summary.items():
    t = s["test"] or {}
    for n, e in s.get("eval", {}).items():
      lines.append(f"{setting} n_test={n}: acc {e['acc']:.2f} F1 {e['f1']:.2f}")
    lines.append(f"{setting}: " + " ".join(f"{k}={v}" for k, v in s["stages"].items())
                 + (f" | test acc {t['acc']:.2f} P {t['precision']:.2f} R {t['recall']:.2f} "
                    f"F1 {t['f1']:.2f}" if t else ""))
  return "\n".join(lines)


def _train(config, workdir):
  return run(config, workdir, [int(n) for n in _EVAL_VIEWS.value.split(",") if n.strip()])


def _aggregate(summaries):
  """{setting (or setting/n_test=N): mean, std of each test metric over the seeds}."""
  from remote_jax import metrics
  per_setting = {}
  for summary in summaries:
    for setting, s in summary.items():
      per_setting.setdefault(setting, []).append(s["test"])
      for n, res in s["eval"].items():
        per_setting.setdefault(f"{setting}/n_test={n}", []).append(res)
  return {k: metrics.seed_summary(v) for k, v in per_setting.items()}


def _report_seeds(agg):
  return "\n".join(f"{setting}: F1 {a['f1']['mean']:.2f} +- {a['f1']['std']:.2f} "
                   f"(n={a['f1']['n']}), acc {a['acc']['mean']:.2f} +- {a['acc']['std']:.2f}"
                   for setting, a in agg.items())


main = cli.train_main(_train, _report, _aggregate, _report_seeds,
                      default_workdir=lambda config: "runs/mi2rage")

if __name__ == "__main__":
  cli.run(main)
