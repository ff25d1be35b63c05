r"""The OT study's config (bench/ot_study.py, issue 34): the demo world and model of
configs/demo.py, trained 4 epochs instead of 8 and without the end-of-run plots.

  python -m bench.ot_study --config ot_study.py --variants none,ot_paper,uniform,xattn \
      --seeds 0-4 --out runs/ot_study

Smaller for a study of 8 variants x 5 seeds on the project's 2-core machine: a run's cost
is its steps and its evaluations (dev and test, 1,500 examples each, once per epoch), so
halving the epochs about halves it; fgw runs 3 GW linearisations instead of 5 (its step
is about proportional to them). docs/benchmarks.md ("OT study") gives the cost per variant.
The comparison is made at 748 steps, before the demo's best-dev step (the last of 8
epochs), on the same seeds for every variant.
"""
from configs import demo


def get_config(arg=None):
  config = demo.get_config(arg)
  config.num_epochs = 4
  # The study reads summary.json and metrics.jsonl only; the plots' extra test pass costs.
  config.plots = False
  config.model.mot.outer_iters = 3
  return config
