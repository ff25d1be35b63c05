r"""Scores the average of several runs' class probabilities (a probability ensemble).

  python -m remote_jax.predict --config configs/mnre_text.py --split dev \
      --config.data.root=../shared/data/mnre --workdir RUN_A --checkpoint RUN_A/ckpt/STEP \
      [the run's own --config options, e.g. --config.optim.ema]
  ...                                   # once per run: RUN/predictions_dev.jsonl
  python -m bench.ensemble RUN_A/predictions_dev.jsonl RUN_B/predictions_dev.jsonl

Prints one JSON line: each member's scores and the ensemble's (micro P/R/F1 over the
relations other than the negative one ("None", "NA", ...), accuracy). Every file must hold the same examples (by
`index`) with the same gold labels; a mismatch is an error that names the file.
"""
import argparse
import json
import pathlib
import sys

import numpy as np


def read(path):
  """(indices, gold labels, relation names, probabilities (n, C)) sorted by index."""
  rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
  if not rows:
    raise ValueError(f"{path}: no predictions")
  names = list(rows[0]["probs"])
  for i, r in enumerate(rows):
    if list(r["probs"]) != names:
      raise ValueError(f"{path}:{i + 1}: relations {list(r['probs'])} differ from line 1's")
  rows.sort(key=lambda r: r["index"])
  return (np.array([r["index"] for r in rows]), [r["label"] for r in rows], names,
          np.array([[r["probs"][n] for n in names] for r in rows], np.float64))


def scores(probs, labels, names):
  from remote_jax import metrics
  from remote_jax.data.records import negative_id
  ids = {n: i for i, n in enumerate(names)}
  res = metrics.relation_metrics(probs.argmax(-1), np.array([ids[l] for l in labels]),
                                 negative_id(names), relation_names=names)
  return {k: round(float(res[k]), 2) for k in ("acc", "precision", "recall", "f1")}


def ensemble(paths):
  members = [read(p) for p in paths]
  index, labels, names, _ = members[0]
  for path, (idx, lab, nam, _) in zip(paths[1:], members[1:]):
    if not (np.array_equal(idx, index) and lab == labels and nam == names):
      raise ValueError(f"{path} does not hold {paths[0]}'s examples, gold labels and "
                       "relations: predict both on the same split and dataset")
  out = {"members": {str(p): scores(m[3], labels, names) for p, m in zip(paths, members)}}
  out["ensemble"] = scores(np.mean([m[3] for m in members], 0), labels, names)
  out["n"] = len(labels)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("predictions", nargs="+", help="predictions JSONL files (remote_jax.predict)")
  args = parser.parse_args(argv)
  try:
    print(json.dumps(ensemble(args.predictions)))
  except (OSError, ValueError, KeyError) as e:
    sys.exit(f"bench.ensemble: {e}")


if __name__ == "__main__":
  main()
