r"""Can a configuration learn one triplet type on its own? (a diagnostic, not a test)

  python -m bench.triplet_probe --type o-o --args "" "moe=off" "mot=none" \
      --set model.moe.residual=false

Trains the demo model (configs/demo.py:ARGS) on the training examples of one
triplet type only (batches of 16 drawn with a fixed seed) and prints one JSON
line per configuration with train and test accuracy on that type every 100
steps. It separates "the model cannot generalise this relation" from "mixed
training has not reached it yet". Each configuration runs in this process, one
after the other.
"""
import argparse
import json
import time

import numpy as np

TYPES = {"e-e": 0, "o-o": 1, "e-o": 2}


def load(cfg, split, n, type_id):
  from remote_jax.data import pipeline
  ds = pipeline.build_dataset(cfg.data, split, batch_size=n, num_epochs=1, drop_remainder=False)
  b = next(iter(ds))
  keep = np.flatnonzero((b["triplet_type"] == type_id) & b["mask"])
  return {k: v[keep] for k, v in b.items()}


def probe(arg, overrides, type_id, steps, batch_size, seed):
  import jax

  from configs import demo
  from remote_jax import task
  cfg = demo.get_config(arg or None)
  for item in overrides:   # field=value, value parsed as JSON when it is JSON (true, 3, 0.5)
    key, value = item.split("=", 1)
    *path, leaf = key.split(".")
    node = cfg
    for p in path:
      node = node[p]
    try:
      node[leaf] = json.loads(value)
    except json.JSONDecodeError:
      node[leaf] = value
  s = task.setup(cfg, total_steps=steps)
  train = load(cfg, "train", cfg.data.demo.n_train, type_id)
  test = load(cfg, "test", cfg.data.demo.n_test, type_id)
  state, rng = s.state, jax.random.key(seed + 1)
  draw = np.random.default_rng(seed)
  eval_n = min(len(train["label"]), len(test["label"]), cfg.eval_batch_size)

  def accuracy(b):
    out, _ = s.eval_step(state.eval_params, task.model_batch({k: v[:eval_n] for k, v in b.items()}))
    return float((np.asarray(out["logits"]).argmax(-1) == b["label"][:eval_n]).mean())

  curve, t0 = [], time.perf_counter()
  for i in range(steps):
    idx = draw.choice(len(train["label"]), batch_size, replace=False)
    state, m = s.train_step(state, task.model_batch({k: v[idx] for k, v in train.items()}),
                            rng)
    if (i + 1) % 100 == 0 or i + 1 == steps:
      curve.append(dict(step=i + 1, loss=round(float(m["loss"]), 4),
                        train_acc=round(accuracy(train), 3), test_acc=round(accuracy(test), 3)))
  return dict(args=arg, set=list(overrides), n_train=len(train["label"]),
              n_test=eval_n, seconds=round(time.perf_counter() - t0, 1), curve=curve)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--type", default="o-o", choices=sorted(TYPES))
  ap.add_argument("--args", nargs="+", default=[""], help="configs/demo.py args, one per run")
  ap.add_argument("--set", nargs="*", default=[], help="field=value overrides for every run")
  ap.add_argument("--steps", type=int, default=600)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seed", type=int, default=0)
  a = ap.parse_args()
  for arg in a.args:
    print(json.dumps(probe(arg, a.set, TYPES[a.type], a.steps, a.batch, a.seed)), flush=True)


if __name__ == "__main__":
  main()
