r"""Does the head still see where each object is? A linear probe (a diagnostic, not a test).

  python -m bench.geometry_probe --config configs/demo.py --workdir runs/demo

Restores the run's newest checkpoint, takes the object features the relation head
reads (`object_features`, sown by remote.py: one row per object slot) for every
valid object of the train and test splits, fits a ridge regression from them to
the object's box centre (x, y) and to its mean depth on train, and prints one
JSON line with R^2 on test, for the trained parameters and for the same model at
initialisation. Issue 19's goal: R^2 of the box centre >= 0.9 after training.
"""
import argparse
import json

import numpy as np


def features(s, params, split, limit):
  """(object features (N, D), targets (N, 3): centre x, centre y, mean crop depth)."""
  import jax

  from remote_jax import task
  from remote_jax.data import pipeline

  @jax.jit
  def objects(p, batch):
    _, state = s.model.apply({"params": p}, batch, mutable=["intermediates"])
    return state["intermediates"]["object_features"][0]

  ds = pipeline.build_dataset(s.config.data, task.SPLITS[split],
                              batch_size=s.config.eval_batch_size, shuffle=False, seed=0,
                              drop_remainder=False)
  xs, ys, n = [], [], 0
  for batch in ds:
    feats = np.asarray(objects(params, task.model_batch(batch)))
    keep = np.asarray(batch["obj_mask"]) & np.asarray(batch["mask"])[:, None]
    boxes = np.asarray(batch["obj_boxes"])
    depth = np.asarray(batch["obj_depth"]).mean(axis=(2, 3, 4))
    centre = np.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2,
                       depth], -1)
    xs.append(feats[keep])
    ys.append(centre[keep])
    n += int(np.asarray(batch["mask"]).sum())
    if n >= limit:
      break
  return np.concatenate(xs).astype(np.float64), np.concatenate(ys)


def ridge_r2(x_train, y_train, x_test, y_test, alpha=1e-3):
  """R^2 per target column of a ridge fit (features standardised on train)."""
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-8
  a = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
  b = np.c_[(x_test - mu) / sd, np.ones(len(x_test))]
  w = np.linalg.solve(a.T @ a + alpha * len(a) * np.eye(a.shape[1]), a.T @ y_train)
  resid = ((b @ w - y_test) ** 2).sum(0)
  total = ((y_test - y_test.mean(0)) ** 2).sum(0)
  return 1.0 - resid / np.maximum(total, 1e-12)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/demo.py")
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--examples", type=int, default=1500, help="examples per split at most")
  a = ap.parse_args()
  from bench import load_config
  from remote_jax import task
  config = load_config(a.config)
  s, state, step = task.restore(config, a.workdir)
  out = {"workdir": a.workdir, "step": int(step)}
  for name, params in (("trained", state.eval_params), ("init", s.state.params)):
    x_tr, y_tr = features(s, params, "train", a.examples)
    x_te, y_te = features(s, params, "test", a.examples)
    r2 = ridge_r2(x_tr, y_tr, x_te, y_te)
    out[name] = {"r2_centre_x": round(float(r2[0]), 4), "r2_centre_y": round(float(r2[1]), 4),
                 "r2_centre": round(float(r2[:2].mean()), 4),
                 "r2_depth": round(float(r2[2]), 4),
                 "objects_train": len(x_tr), "objects_test": len(x_te)}
  print(json.dumps(out))


if __name__ == "__main__":
  main()
