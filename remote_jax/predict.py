r"""Writes JSONL predictions with class probabilities and MMoE router weights.

  python -m remote_jax.predict --config configs/demo.py --workdir runs/demo \
      --split test --out runs/demo/predictions_test.jsonl
"""
import json

from absl import flags

from remote_jax import cli

_CONFIG = cli.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding ckpt/.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Checkpoint path (default: workdir).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to predict.")
_OUT = flags.DEFINE_string("out", "", "Output JSONL (default: workdir/predictions_<split>.jsonl).")


def write_predictions(s, params, split, out_path):
  """Every process scores its shard; process 0 writes all rows. Returns the count."""
  from remote_jax import distributed, task
  res = task.evaluate(s, params, split, collect=True)
  col = res["collected"]
  names = s.meta["relations"]
  if not distributed.is_main():
    return len(col["label"])
  with open(out_path, "w", encoding="utf-8") as f:
    for i in range(len(col["label"])):
      probs = col["probs"][i]
      rec = {"index": int(col["index"][i]), "label": names[int(col["label"][i])],
             "pred": names[int(probs.argmax())],
             "triplet_type": ("e-e", "o-o", "e-o")[int(col["triplet_type"][i])],
             "probs": {n: round(float(p), 6) for n, p in zip(names, probs)}}
      if "router" in col:
        rec["router"] = [round(float(x), 6) for x in col["router"][i].reshape(-1)]
      f.write(json.dumps(rec) + "\n")
  return len(col["label"])


def main(argv):
  del argv
  import pathlib

  from remote_jax import distributed, task
  with task.restored(_CONFIG.value, _CHECKPOINT.value, _WORKDIR.value) as (s, state, _, _):
    out = _OUT.value or str(pathlib.Path(_WORKDIR.value or ".") /
                            f"predictions_{_SPLIT.value}.jsonl")
    n = write_predictions(s, state.eval_params, _SPLIT.value, out)
    if distributed.is_main():
      print(f"wrote {n} predictions to {out}")


if __name__ == "__main__":
  cli.run(main)
