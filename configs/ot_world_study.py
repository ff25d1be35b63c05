r"""Issue 35's study config: configs/ot_world.py trained for a fixed budget of STEPS steps at
every train size, evaluated every 100 steps (the best dev step kept), without the end-of-run
plots.

  for n in 1000 250 3000; do for path in moe=off ""; do
    python -m bench.ot_study --config ot_world_study.py --extra "$path" \
        --variants none,ot_paper,uniform,skip,detached,xattn,ot_reference --seeds 0-4 \
        --baselines none,uniform,skip --metric test/colour/f1 \
        --xla_cache runs/ot_world_study/xla_cache \
        --config.data.attribute_world.n_train=$n --out runs/ot_world_study/n$n${path:+_moe_off}
  done; done

The same steps at every size: a size then differs in how many distinct examples those steps
see, not in how long the model trains. 400 steps: a pilot before the study (`ot_paper`,
`moe=off`, seed 99, outside the study's seeds, 1,000 examples) reached dev F1 82 at 300 and
99 at 600 steps of a 600-step schedule; the grid (3 sizes x 7 variants x 2 paths x 5 seeds)
must fit the issue's 3 hours on the project's 2-core machine. `fgw` and `sdiv` are left out:
with the image-wide vision OT they took 2.5 and 3.3 s a step here, 34x and 46x `none`
(docs/ot_world.md).
"""
from configs import ot_world

STEPS = 400


def get_config(arg=None):
  config = ot_world.get_config(arg)
  # max_steps ends the schedule at STEPS; the epochs only have to reach it at the smallest size.
  config.num_epochs = 100
  config.max_steps = STEPS
  config.eval_every_steps = 100
  config.plots = False
  return config
