r"""Trains REMOTE: `python -m remote_jax.train --config configs/demo.py --workdir runs/demo`.

Only composes: flags -> config -> distributed init -> task (the harness is
remote_jax.cli's, shared with mi2rage_jax.train). Ablations are config args
(`--config configs/umre.py:mot=xattn,moe=off`) or field overrides
(`--config.optim.lr=2e-5`). Several seeds: `--seeds 0,1,2` runs each in
workdir/seed_N and writes the mean and standard deviation.
"""
import os

from remote_jax import cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

cli.define_train_flags("Run directory (checkpoints, logs, plots).")


def _aggregate(summaries):
  from remote_jax import metrics
  return metrics.seed_summary([{**s["best_dev"], "wall_s": s.get("wall_s")} for s in summaries])


def _train(config, workdir):
  from remote_jax import task
  return task.train_and_evaluate(config, workdir)


def _report(summary, config):
  from remote_jax import task
  return task.format_summary(summary, config)


def _report_seeds(agg):
  from remote_jax import task
  return task.format_seed_summary(agg)


main = cli.train_main(_train, _report, _aggregate, _report_seeds,
                      default_workdir=lambda config: f"runs/{config.data.name}")

if __name__ == "__main__":
  cli.run(main)
