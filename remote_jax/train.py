r"""Trains REMOTE: `python -m remote_jax.train --config configs/demo.py --workdir runs/demo`.

Only composes: flags -> config -> distributed init -> trainer. Ablations are
config args (`--config configs/umre.py:mot=xattn,moe=off`) or field overrides
(`--config.optim.lr=2e-5`). Several seeds: `--seeds 0,1,2` runs each in
workdir/seed_N and writes the mean and standard deviation.
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
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, plots).")
_SEEDS = flags.DEFINE_string("seeds", "", "Comma list of seeds: one run per seed + mean/std.")


def main(argv):
  del argv
  import jax

  from remote_jax import distributed, errors, metrics, trainer, writers, xla_cpu
  writers.setup_cli_logging()
  config = _CONFIG.value
  if config is None:
    sys.exit("--config is required, e.g. --config configs/demo.py")
  with errors.user_errors():
    xla_cpu.apply(config.xla_cpu)   # before the backend starts
  workdir = pathlib.Path(_WORKDIR.value or f"runs/{config.data.name}")
  distributed.maybe_initialize(config)
  jax.config.update("jax_threefry_partitionable", True)
  with errors.user_errors():
    if not _SEEDS.value:
      summary = trainer.train_and_evaluate(config, workdir)
      if distributed.is_main():
        print(trainer.format_summary(summary, config))
      return
    results = []
    for seed in [int(s) for s in _SEEDS.value.split(",") if s]:
      with config.unlocked():
        config.seed = seed
      summary = trainer.train_and_evaluate(config, workdir / f"seed_{seed}")
      results.append(summary["best_dev"])
    agg = metrics.seed_summary(results)
    if distributed.is_main():
      (workdir / "seeds_summary.json").write_text(json.dumps(agg, indent=2) + "\n")
      print(trainer.format_seed_summary(agg))


if __name__ == "__main__":
  cli.run(main)
