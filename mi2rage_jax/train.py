r"""Runs MI2RAGE: `python -m mi2rage_jax.train --config configs/mi2rage_demo.py --workdir DIR`.

Each setting of `config.settings` runs in DIR/<setting>/ (stages: generate_r /
teacher_r / select_r for r = 0..K, student, test, diversity; see pipeline.py).
A rerun skips finished stages and resumes an interrupted one. Ablations are
config args (`configs/mi2rage_demo.py:teacher=random,rounds=0`). `--seeds 0,1,2`
runs each seed in DIR/seed_N and writes DIR/seeds_summary.json (mean, std).
`--eval_views 1,2,4` also evaluates the trained students with those numbers of
test-time views (results/test_ntr*_nte*.json).
"""
import json
import os
import pathlib
import sys

from absl import flags

from remote_jax import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.")
_SEEDS = flags.DEFINE_string("seeds", "", "Comma list of seeds: one run per seed + mean/std.")
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
  encoder = data_lib.Encoder(config.data.tokenizer_dir, config.data.max_length)
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
  (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
  return summary


def _fmt(summary):
  lines = []
  for setting, s in summary.items():
    t = s["test"] or {}
    for n, e in s.get("eval", {}).items():
      lines.append(f"{setting} n_test={n}: acc {e['acc']:.2f} F1 {e['f1']:.2f}")
    lines.append(f"{setting}: " + " ".join(f"{k}={v}" for k, v in s["stages"].items())
                 + (f" | test acc {t['acc']:.2f} P {t['precision']:.2f} R {t['recall']:.2f} "
                    f"F1 {t['f1']:.2f}" if t else ""))
  return "\n".join(lines)


def main(argv):
  del argv
  from remote_jax import errors, writers, xla_cpu
  writers.setup_cli_logging()
  config = _CONFIG.value
  if config is None:
    sys.exit("--config is required, e.g. --config configs/mi2rage_demo.py")
  with errors.user_errors():   # bad data or config: one line, no traceback
    xla_cpu.apply(config.get("xla_cpu", "xla"))   # before the backend starts
    _run_all(config)


def _run_all(config):
  from remote_jax import metrics
  workdir = pathlib.Path(_WORKDIR.value or "runs/mi2rage")
  eval_views = [int(n) for n in _EVAL_VIEWS.value.split(",") if n]
  if not _SEEDS.value:
    print(_fmt(run(config, workdir, eval_views)))
    return
  per_setting = {}
  for seed in [int(s) for s in _SEEDS.value.split(",") if s]:
    with config.unlocked():
      config.seed = seed
    summary = run(config, workdir / f"seed_{seed}", eval_views)
    print(f"seed {seed}\n{_fmt(summary)}")
    for setting, s in summary.items():
      per_setting.setdefault(setting, []).append(s["test"])
      for n, res in s["eval"].items():
        per_setting.setdefault(f"{setting}/n_test={n}", []).append(res)
  agg = {k: metrics.seed_summary(v) for k, v in per_setting.items()}
  (workdir / "seeds_summary.json").write_text(json.dumps(agg, indent=1) + "\n")
  for setting, a in agg.items():
    print(f"{setting}: F1 {a['f1']['mean']:.2f} +- {a['f1']['std']:.2f} (n={a['f1']['n']}), "
          f"acc {a['acc']['mean']:.2f} +- {a['acc']['std']:.2f}")


if __name__ == "__main__":
  cli.run(main)
