r"""What does a trained MI2RAGE text student read? (a diagnostic, not a test)

  python -m bench.student_inputs_probe --workdir runs/kn_no_real_image/teacher/seed_0

Loads the trained `no_real_image` student of one run (its `config.json` and
checkpoint; nothing is trained) and scores the test set three ways: with the real
image alone, with no image at all (every view slot masked: the text path alone),
and with the M synthetic test views the run ranked plus the real image (what the
test stage scores). Prints one JSON line per (test family or triplet type, input):
accuracy and the (gold, predicted) relation counts. A student whose image path has
learnt a cue of one family and applies it where the text decides shows it here
(mi2rage_jax/README.md, "What changed: view dropout").
"""
import argparse
import collections
import json
import pathlib

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="one seed's run directory (config.json)")
  ap.add_argument("--n_test", type=int, default=3, help="synthetic test views, M")
  a = ap.parse_args()

  import ml_collections

  from mi2rage_jax import data as data_lib
  from mi2rage_jax import pipeline
  from remote_jax import engine, metrics
  wd = pathlib.Path(a.workdir)
  cfg = ml_collections.ConfigDict(json.loads((wd / "config.json").read_text()))
  ds = data_lib.load(cfg.data)
  enc = data_lib.Encoder.from_config(cfg.data)
  with cfg.unlocked():
    cfg.model.text.vocab_size = enc.vocab_size
    if "view_dropout" not in cfg.model:   # a run from before the field: it had none
      cfg.model.view_dropout = 0.0
  run = pipeline.Run(cfg, wd / "no_real_image", "no_real_image", ds, enc, None)
  if not run.done("student"):
    raise SystemExit(f"{wd}/no_real_image: no trained student (stage student not done)")
  state, params = run._student_params()   # pylint: disable=protected-access
  insts = ds.splits[run.test_split]
  labels = np.asarray([i.label for i in insts])

  def logits(views, slots, real):
    return engine.predict(state, params, len(insts), int(cfg.student.eval_batch_size),
                          lambda idx: run.student_batch([insts[k] for k in idx], views,
                                                        slots, real))

  empty = {i.id: [] for i in insts}
  preds = {"real image alone": logits(empty, 1, True).argmax(-1),
           "no image": logits(empty, 1, False).argmax(-1),
           f"{a.n_test} synthetic + real": logits(run.final_views(run.test_split, a.n_test),
                                                  a.n_test + 1, True).argmax(-1)}
  groups = dict(ds.buckets.get(run.test_split) or {})
  types = np.asarray([i.triplet_type for i in insts])
  for t in sorted(set(types)):
    groups.setdefault(metrics.TRIPLET_TYPES[t], np.flatnonzero(types == t))
  for name, rows in groups.items():
    rows = np.asarray(rows)
    for inp, p in preds.items():
      counts = collections.Counter(f"{ds.relations[g]} -> {ds.relations[q]}"
                                   for g, q in zip(labels[rows], p[rows]))
      print(json.dumps({"group": name, "input": inp, "n": len(rows),
                        "acc": round(100 * float((p[rows] == labels[rows]).mean()), 1),
                        "gold_to_pred": dict(sorted(counts.items()))}), flush=True)


if __name__ == "__main__":
  main()
