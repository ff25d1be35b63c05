r"""Input pipeline throughput against the train step's consumption (JSON lines).

  python -m bench.pipeline                          # configs/demo.py
  python -m bench.pipeline --config configs/mnre_text.py --root ../shared/data/mnre --steps 5

For the config's train split: examples/s of the grain pipeline alone (shuffled
training batches, the trainer's settings, after one warm-up batch), and
examples/s of the compiled train step on one fixed batch (median of `--steps`
after the compile). `ratio` = pipeline / step: the pipeline keeps up when it is
well above 1 (issue goal: >= 3). The data cache is built first if missing and
not timed.
"""
import argparse
import json
import time

import numpy as np

from bench import load_config


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/demo.py")
  ap.add_argument("--batches", type=int, default=40)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--root", default="", help="config.data.root (configs/mnre_text.py needs it)")
  a = ap.parse_args()

  import jax

  from remote_jax import sharding, task
  from remote_jax.data import pipeline
  config = load_config(a.config)
  if a.root:
    config.data.root = a.root
  meta = pipeline.dataset_meta(config.data)   # builds the cache if needed (untimed)
  bs = config.batch_size

  it = iter(pipeline.build_dataset(config.data, "train", batch_size=bs, shuffle=True,
                                   seed=0, num_epochs=None))
  first = next(it)
  t0 = time.perf_counter()
  for _ in range(a.batches):
    next(it)
  pipe_s = time.perf_counter() - t0

  s = task.setup(config, total_steps=a.steps + 1)
  batch = sharding.global_batch(task.model_batch(first), s.mesh)
  state, rng = s.state, jax.random.key(0)
  t0 = time.perf_counter()
  state, m = s.train_step(state, batch, rng)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(a.steps):
    t0 = time.perf_counter()
    state, m = s.train_step(state, batch, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  pipe_eps, step_eps = a.batches * bs / pipe_s, bs / step_s
  print(json.dumps(dict(
      config=a.config, dataset=config.data.name, batch=bs, train_examples=meta["splits"]["train"],
      pipeline_examples_per_s=round(pipe_eps, 1), train_step_s=round(step_s, 4),
      step_examples_per_s=round(step_eps, 1), step_compile_s=round(compile_s, 1),
      ratio=round(pipe_eps / step_eps, 1), devices=jax.device_count(),
      backend=jax.default_backend())), flush=True)


if __name__ == "__main__":
  main()
