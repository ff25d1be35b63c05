"""Metrics against hand-computed values (reference_remote.md 4.4)."""
import numpy as np
import pytest

from remote_jax import metrics

# Negative class 0, four classes. The last row is eval padding (mask False).
LABELS = np.array([0, 1, 2, 3, 1, 0, 2, 0])
PREDS = np.array([0, 1, 0, 3, 2, 0, 2, 3])
MASK = np.array([1, 1, 1, 1, 1, 1, 1, 0], bool)
TYPES = np.array([0, 0, 1, 1, 2, 2, 2, 0])
NAMES = ["none", "r1", "r2", "r3"]


def test_overall_with_mask_hand_computed():
  m = metrics.relation_metrics(PREDS, LABELS, negative_id=0, mask=MASK, relation_names=NAMES)
  # Valid (gold, pred): (0,0)+ (1,1)+ (2,0) (3,3)+ (1,2) (0,0)+ (2,2)+ -> 5 of 7 equal.
  assert m["n"] == 7
  assert m["acc"] == pytest.approx(100 * 5 / 7)
  # correct_pos: (1,1) (3,3) (2,2) = 3; pred != 0: 1,3,2,2 = 4; gold != 0: 1,2,3,1,2 = 5.
  assert (m["correct_pos"], m["pred_pos"], m["gold_pos"]) == (3, 4, 5)
  assert m["precision"] == pytest.approx(75.0)  # 3/4
  assert m["recall"] == pytest.approx(60.0)  # 3/5
  assert m["f1"] == pytest.approx(100 * 2 * 0.75 * 0.6 / 1.35)  # 66.67
  np.testing.assert_array_equal(m["confusion"], [[2, 0, 0, 0],
                                                 [0, 1, 1, 0],
                                                 [1, 0, 1, 0],
                                                 [0, 0, 0, 1]])


def test_padding_row_would_change_the_scores():
  m = metrics.relation_metrics(PREDS, LABELS, negative_id=0, relation_names=NAMES)
  # With row 7 (gold 0, pred 3): acc 5/8, pred_pos 5 -> P = R = F1 = 3/5.
  assert m["acc"] == pytest.approx(62.5)
  assert [m["precision"], m["recall"], m["f1"]] == pytest.approx([60.0] * 3)


def test_nonzero_negative_id():
  m = metrics.relation_metrics(PREDS, LABELS, negative_id=2, mask=MASK, num_classes=4)
  # gold != 2 and equal: (0,0) (1,1) (3,3) (0,0) = 4; pred != 2: 0,1,0,3,0 = 5; gold != 2: 5.
  assert (m["correct_pos"], m["pred_pos"], m["gold_pos"]) == (4, 5, 5)
  assert [m["precision"], m["recall"], m["f1"]] == pytest.approx([80.0] * 3)
  assert m["acc"] == pytest.approx(100 * 5 / 7)


def test_zero_denominators_give_zero():
  m = metrics.relation_metrics([0, 0, 0], [0, 0, 0], negative_id=0, num_classes=3)
  assert m["acc"] == 100.0
  assert m["precision"] == m["recall"] == m["f1"] == 0.0
  m = metrics.relation_metrics([1, 2], [2, 1], negative_id=0, num_classes=3)
  assert m["precision"] == m["recall"] == m["f1"] == 0.0  # P = R = 0 -> F1 0, no 0/0


def test_per_type_and_per_relation():
  m = metrics.relation_metrics(PREDS, LABELS, 0, mask=MASK, triplet_type=TYPES,
                               relation_names=NAMES)
  t = m["per_type"]
  # e-e rows 0,1 (row 7 masked): (0,0) (1,1): all right, one positive.
  assert (t["e-e"]["n"], t["e-e"]["acc"], t["e-e"]["f1"]) == (2, 100.0, 100.0)
  # o-o rows 2,3: (2,0) (3,3): P = 1/1, R = 1/2, F1 = 2*.5/1.5.
  assert t["o-o"]["precision"] == 100.0 and t["o-o"]["recall"] == 50.0
  assert t["o-o"]["f1"] == pytest.approx(100 * 2 * 0.5 / 1.5)
  # e-o rows 4,5,6: (1,2) (0,0) (2,2): acc 2/3, correct 1, pred_pos 2, gold_pos 2.
  assert t["e-o"]["acc"] == pytest.approx(200 / 3)
  assert [t["e-o"][k] for k in ("precision", "recall", "f1")] == pytest.approx([50.0] * 3)
  r = m["per_relation"]
  # r1: tp 1 (row 1), predicted once, gold twice (rows 1, 4).
  assert r["r1"] == pytest.approx({"precision": 100.0, "recall": 50.0,
                                   "f1": 100 * 2 * 0.5 / 1.5, "support": 2})
  # r2: tp 1 (row 6), predicted rows 4,6, gold rows 2,6.
  assert r["r2"]["f1"] == pytest.approx(50.0) and r["r2"]["support"] == 2
  # none: predicted rows 0,2,5 (3), gold rows 0,5 (2), tp 2.
  assert r["none"]["precision"] == pytest.approx(200 / 3) and r["none"]["recall"] == 100.0
  flat = metrics.scalar_metrics(m, prefix="dev")
  assert flat["dev/f1"] == m["f1"] and flat["dev/o-o/recall"] == 50.0
  assert not any(k.startswith("dev/rel/") for k in flat) and "dev/confusion" not in flat


def test_accumulator_streams_batches_with_logits_and_loss():
  acc = metrics.MetricsAccumulator(4, negative_id=0, relation_names=NAMES)
  logits = np.eye(4)[PREDS] * 5.0  # argmax == PREDS
  loss = np.arange(8, dtype=np.float32)
  for lo, hi in ((0, 3), (3, 8)):
    acc.add(LABELS[lo:hi], logits=logits[lo:hi], mask=MASK[lo:hi],
            triplet_type=TYPES[lo:hi], loss=loss[lo:hi])
  m = acc.compute()
  one_shot = metrics.relation_metrics(PREDS, LABELS, 0, mask=MASK, triplet_type=TYPES,
                                      relation_names=NAMES)
  for k in ("acc", "precision", "recall", "f1", "n"):
    assert m[k] == one_shot[k]
  assert m["loss"] == pytest.approx(sum(range(7)) / 7)  # row 7 (loss 7) is padding


def test_accumulator_rejects_bad_ids():
  acc = metrics.MetricsAccumulator(3, negative_id=0)
  with pytest.raises(ValueError, match="labels outside"):
    acc.add([0, 5], [0, 1])
  with pytest.raises(ValueError, match="triplet_type"):
    acc.add([0, 1], [0, 1], triplet_type=[0, 3])
  with pytest.raises(ValueError, match="exactly one"):
    acc.add([0, 1])


HISTORY = [
    {"epoch": 1, "dev/f1": 50.0, "test/f1": 40.0},
    {"epoch": 2, "dev/f1": 60.0, "test/f1": 45.0},
    {"epoch": 3, "dev/f1": 60.0, "test/f1": 47.0},
    {"epoch": 4, "dev/f1": 55.0, "test/f1": 70.0},
    {"epoch": 5, "test/f1": 10.0},  # no dev score: skipped by select_best
]


def test_select_best_ties_and_reference_protocol():
  best = metrics.select_best(HISTORY)
  assert (best["epoch"], best["test/f1"], best["selected_by"]) == (3, 47.0, "dev/f1")
  assert metrics.select_best(HISTORY, tie="earliest")["epoch"] == 2
  ref = metrics.max_over_epochs(HISTORY)
  assert (ref["epoch"], ref["test/f1"]) == (4, 70.0)
  assert "reference protocol" in ref["selected_by"]
  with pytest.raises(ValueError, match="dev/acc"):
    metrics.select_best(HISTORY, key="dev/acc")


def test_seed_summary():
  s = metrics.seed_summary([{"f1": 60.0, "acc": 90, "name": "a"},
                            {"f1": 62.0, "acc": 91},
                            {"f1": 64.0}])
  assert s["f1"] == {"mean": 62.0, "std": pytest.approx(2.0), "n": 3}  # sqrt((4+0+4)/2)
  assert s["acc"]["n"] == 2 and s["acc"]["mean"] == 90.5 and "name" not in s
  # Nested results (MI2RAGE's per_type) are flattened; a value that is no number leaves
  # no key behind (it used to leave an empty list, and a NaN mean with a warning).
  s = metrics.seed_summary([{"per_type": {"e-e": {"f1": 50.0}}, "x": None},
                            {"per_type": {"e-e": {"f1": 54.0}, "o-o": {"f1": 1.0}}}])
  assert s["per_type/e-e/f1"]["mean"] == 52.0 and s["per_type/o-o/f1"]["n"] == 1
  assert set(s) == {"per_type/e-e/f1", "per_type/o-o/f1"}


def test_check_finite():
  metrics.check_finite(7, loss=1.0, grad_norm=np.float32(3.0))
  with pytest.raises(FloatingPointError, match=r"grad_norm=inf at step 12"):
    metrics.check_finite(12, loss=0.5, grad_norm=float("inf"))
  with pytest.raises(FloatingPointError, match="loss=nan"):
    metrics.check_finite(3, loss=np.nan)


def test_bucket_scores_equal_the_subset_scored_by_hand():
  rng = np.random.default_rng(0)
  n, c = 50, 5
  labels, preds = rng.integers(0, c, n), rng.integers(0, c, n)
  types, index = rng.integers(0, 3, n), np.arange(n)
  bucket = [3, 7, 8, 20, 21, 22, 40, 49, 49]
  acc = metrics.MetricsAccumulator(c, 0, buckets={"compositional": bucket})
  for lo in range(0, n, 16):  # batches padded to 16 rows: padding repeats row 0, index -1
    sl = slice(lo, lo + 16)
    pad = 16 - len(labels[sl])
    acc.add(np.pad(labels[sl], (0, pad)), np.pad(preds[sl], (0, pad)),
            mask=np.arange(16) < 16 - pad, triplet_type=np.pad(types[sl], (0, pad)),
            index=np.pad(index[sl], (0, pad), constant_values=-1))
  out = acc.compute()
  keep = np.isin(index, bucket)
  by_hand = metrics.relation_metrics(preds[keep], labels[keep], 0, num_classes=c)
  got = out["buckets"]["compositional"]
  assert got["n"] == 8
  for k in ("acc", "precision", "recall", "f1", "n", "correct_pos", "pred_pos", "gold_pos"):
    assert got[k] == by_hand[k]
  # The one-shot form gives the same buckets (rows named by position).
  one_shot = metrics.relation_metrics(preds, labels, 0, triplet_type=types, num_classes=c,
                                      buckets={"compositional": bucket})
  assert one_shot["buckets"]["compositional"] == got
  flat = metrics.scalar_metrics(out, prefix="test")
  assert flat["test/compositional/f1"] == got["f1"] and flat["test/e-o/f1"]
  with pytest.raises(ValueError, match="index"):
    acc.add(labels, preds)


def test_summaries_print_the_buckets():
  from remote_jax import task  # pylint: disable=import-outside-toplevel
  scores = dict(acc=50.0, precision=40.0, recall=30.0, f1=34.0, n=8, gold_pos=3)
  res = {**scores, "per_type": {"e-o": scores}, "buckets": {"compositional": scores}}
  best = {"step": 10, "epoch": 1.0, **metrics.scalar_metrics(res, prefix="test")}
  config = type("C", (), {"data": type("D", (), {"name": "demo"})})
  rows = task.format_summary({"best_dev": best}, config).splitlines()
  assert rows[-2].split()[:2] == ["test", "e-o"]
  assert rows[-1].split() == ["test", "compositional", "50.00", "40.00", "30.00", "34.00"]
  agg = metrics.seed_summary([best, best])
  last = task.format_seed_summary(agg).splitlines()[-1]
  assert last.split() == ["test/compositional/f1", "34.00", "+-", "0.00", "(n=2)"]
