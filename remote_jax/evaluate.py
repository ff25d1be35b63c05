r"""Scores a checkpoint on a split.

  python -m remote_jax.evaluate --config configs/demo.py --workdir runs/demo --split test

`--checkpoint` may name another workdir, checkpoint root or step directory;
by default the workdir's latest checkpoint is used. Prints JSON.
"""
import json
import sys

from absl import flags

from remote_jax import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding ckpt/.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Checkpoint path (default: workdir).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to score (train, dev, test).")


def main(argv):
  del argv
  from remote_jax import distributed, metrics, task
  with task.restored(_CONFIG.value, _CHECKPOINT.value, _WORKDIR.value) as (s, state, step, path):
    res = task.evaluate(s, state.eval_params, _SPLIT.value)
    out = {"checkpoint": str(path), "step": step, "split": _SPLIT.value,
           **metrics.scalar_metrics(task.loggable(res), prefix=_SPLIT.value)}
    if distributed.is_main():
      json.dump(out, sys.stdout, indent=2)
      print()


if __name__ == "__main__":
  cli.run(main)
