"""Selecting synthetic views per instance from teacher scores.

Every selector keeps, per instance, the views with the LOWEST score; ties are
broken by the view's index within the instance (its position in the
candidate list, earlier first), so selection is deterministic.

Scores per criterion (`SCORES`, lower is better):
  loss     cross-entropy of the teacher against the true label (training only)
  maxprob  -log max_y p(y|v): the loss against the teacher's own prediction;
           label-free, used at test time (highest max-probability first)
  entropy  predictive entropy of the teacher; label-free alternative
  agree    the loss against the instance's consensus: the argmax of the teacher's
           probabilities averaged over all of the instance's candidates; label-free.
           A confident view that contradicts the other views of its instance (a
           generator's wrong knowledge) ranks last, where maxprob ranks it first.
`score(criterion, logits, labels, groups)` computes any of them (`groups`: the
instance index of each row, needed by agree).
"""
from __future__ import annotations

import math

import numpy as np


def num_kept(n: int, fraction: float) -> int:
  """round(fraction * n), halves rounded up, at least 1 (30 -> 18, 90 -> 54 at 0.6)."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"keep fraction {fraction} not in (0, 1]")
  return max(1, min(n, math.floor(fraction * n + 0.5 + 1e-9)))


def lowest(scores, k: int) -> np.ndarray:
  """Indices of the k lowest scores, in ascending score, ties by index."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1:
    raise ValueError(f"scores must be 1-D, got {scores.shape}")
  if np.isnan(scores).any():
    raise ValueError("NaN teacher score; refusing to select")
  order = np.lexsort((np.arange(len(scores)), scores))
  return order[:k]


def select_fraction(scores_per_instance: dict, fraction: float) -> dict:
  """{instance: scores (n,)} -> {instance: kept indices sorted by index}."""
  return {i: np.sort(lowest(s, num_kept(len(s), fraction)))
          for i, s in scores_per_instance.items()}


def select_top(scores_per_instance: dict, n: int) -> dict:
  """The n lowest-score views per instance (all if fewer), in ascending score."""
  return {i: lowest(s, min(n, len(s))) for i, s in scores_per_instance.items()}


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  m = logits.max(-1, keepdims=True)
  return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def loss_score(logits, labels):
  logp = _log_softmax(logits)
  return -np.take_along_axis(logp, np.asarray(labels)[:, None], -1)[:, 0]


def maxprob_score(logits, labels=None):
  del labels
  return -_log_softmax(logits).max(-1)


def entropy_score(logits, labels=None):
  del labels
  logp = _log_softmax(logits)
  return -(np.exp(logp) * logp).sum(-1)


def consensus_labels(logits, groups):
  """Per row, the argmax of the mean probabilities over the rows of its group."""
  probs = np.exp(_log_softmax(logits))
  groups = np.asarray(groups)
  _, inverse = np.unique(groups, return_inverse=True)
  sums = np.zeros((inverse.max() + 1, probs.shape[-1]))
  np.add.at(sums, inverse, probs)
  return sums.argmax(-1)[inverse]


def agree_score(logits, labels=None, groups=None):
  del labels
  if groups is None:
    raise ValueError("criterion 'agree' needs the instance index of each row (groups)")
  return loss_score(logits, consensus_labels(logits, groups))


SCORES = {"loss": loss_score, "maxprob": maxprob_score, "entropy": entropy_score,
          "agree": agree_score}


def score(criterion, logits, labels=None, groups=None):
  """Scores (lower = keep first) of `criterion` (one of SCORES)."""
  if criterion == "agree":
    return agree_score(logits, groups=groups)
  return SCORES[criterion](logits, labels)
