"""bench/ensemble.py: the average of the members' probabilities is what is scored."""
import json

import pytest

from bench import ensemble

NAMES = ("None", "/per/per/peer", "/loc/loc/contain")


def write(path, rows):
  path.write_text("".join(json.dumps({"index": i, "label": label,
                                      "probs": dict(zip(NAMES, probs))}) + "\n"
                          for i, label, probs in rows))
  return str(path)


def test_the_averaged_probabilities_are_scored_not_a_vote(tmp_path):
  # Example 0: A is sure of the wrong relation at 0.5, B of the right one at 0.9: the
  # average picks the right one. Example 1: both right. Rows written out of order.
  a = write(tmp_path / "a.jsonl", [(1, "None", (0.8, 0.1, 0.1)),
                                   (0, "/per/per/peer", (0.1, 0.4, 0.5))])
  b = write(tmp_path / "b.jsonl", [(0, "/per/per/peer", (0.05, 0.9, 0.05)),
                                   (1, "None", (0.6, 0.2, 0.2))])
  out = ensemble.ensemble([a, b])
  assert out["members"][a]["f1"] == 0.0 and out["members"][b]["f1"] == 100.0
  assert out["ensemble"] == {"acc": 100.0, "precision": 100.0, "recall": 100.0, "f1": 100.0}


def test_members_of_other_examples_are_refused(tmp_path):
  a = write(tmp_path / "a.jsonl", [(0, "None", (0.8, 0.1, 0.1))])
  b = write(tmp_path / "b.jsonl", [(0, "/per/per/peer", (0.8, 0.1, 0.1))])
  with pytest.raises(ValueError, match="b.jsonl does not hold .*a.jsonl's examples"):
    ensemble.ensemble([a, b])
  with pytest.raises(SystemExit, match="bench.ensemble: .* does not hold"):
    ensemble.main([a, b])
