"""Relation-extraction metrics, model selection and the NaN guard.

The scores follow the released REMOTE/MORE `eval_result` (reference_remote.md
4.4) exactly:
  acc         = #(pred == gold) / N over every (valid) instance, `none` included;
  correct_pos = #(pred == gold and gold != neg);
  pred_pos    = #(pred != neg);  gold_pos = #(gold != neg);
  P = correct_pos / pred_pos, R = correct_pos / gold_pos, F1 = 2PR / (P + R),
  with 0 for a zero denominator. All values are percentages (x100). The
reference also rounds to 4 decimals; we keep full precision (rounding is for
display only).

Everything is derived from per-triplet-type confusion matrices, so the
streaming `MetricsAccumulator` holds O(types x C^2) counts whatever the split
size, and `relation_metrics` is one `add` followed by `compute`.
"""
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Triplet types as in the batch contract (design.md section 1).
TRIPLET_TYPES = ("e-e", "o-o", "e-o")


def _ratio(num, den):
  return num / den if den else 0.0


def _prf(correct, n_pred, n_gold):
  p = _ratio(correct, n_pred)
  r = _ratio(correct, n_gold)
  f = _ratio(2 * p * r, p + r)
  return 100.0 * p, 100.0 * r, 100.0 * f


def scores_from_confusion(conf: np.ndarray, negative_id: int) -> dict:
  """acc and micro P/R/F1 (negative class excluded) from a gold x pred matrix."""
  conf = np.asarray(conf, np.int64)
  n = int(conf.sum())
  diag = np.diag(conf)
  correct_pos = int(diag.sum() - diag[negative_id])
  gold_pos = n - int(conf[negative_id, :].sum())
  pred_pos = n - int(conf[:, negative_id].sum())
  p, r, f = _prf(correct_pos, pred_pos, gold_pos)
  return {
      "acc": 100.0 * _ratio(int(diag.sum()), n), "precision": p, "recall": r, "f1": f,
      "n": n, "correct_pos": correct_pos, "pred_pos": pred_pos, "gold_pos": gold_pos,
  }


class MetricsAccumulator:
  """Streams eval batches into confusion counts; `compute()` gives the metrics.

  `add` takes numpy (or jax) arrays of one batch; rows with `mask == False`
  (eval padding) are dropped, so every real example counts once. Either
  `preds` or `logits` (argmax is taken, as the reference does) must be given.
  `loss`, if given per example (B,), is averaged over valid rows; a scalar loss
  is averaged over batches weighted by their valid-row count.

  `buckets` ({name: example indices}, e.g. the demo world's `compositional`
  test examples) adds a bucket of scores per name, like the per-type ones,
  over the rows whose `index` (given to `add`) is in the bucket.
  """

  def __init__(self, num_classes: int, negative_id: int,
               relation_names: Sequence[str] | None = None,
               buckets: Mapping[str, Sequence[int]] | None = None):
    if relation_names is not None and len(relation_names) != num_classes:
      raise ValueError(
          f"relation_names has {len(relation_names)} names for {num_classes} classes")
    if not 0 <= negative_id < num_classes:
      raise ValueError(f"negative_id {negative_id} outside [0, {num_classes})")
    self.num_classes = num_classes
    self.negative_id = negative_id
    self.relation_names = (list(relation_names) if relation_names is not None
                           else [str(i) for i in range(num_classes)])
    # Row t < len(TRIPLET_TYPES) holds typed examples; the last row untyped ones.
    self._conf = np.zeros((len(TRIPLET_TYPES) + 1, num_classes, num_classes), np.int64)
    self._loss_sum = 0.0
    self._loss_n = 0
    self._buckets = {name: np.unique(np.asarray(ix, np.int64))
                     for name, ix in (buckets or {}).items()}
    self._bucket_conf = {name: np.zeros((num_classes, num_classes), np.int64)
                         for name in self._buckets}

  def add(self, labels, preds=None, *, logits=None, mask=None, triplet_type=None,
          loss=None, index=None) -> None:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if (preds is None) == (logits is None):
      raise ValueError("give exactly one of preds or logits")
    if preds is None:
      preds = np.asarray(logits).reshape(labels.shape[0], -1).argmax(-1)
    preds = np.asarray(preds).reshape(-1).astype(np.int64)
    valid = (np.ones(labels.shape, bool) if mask is None
             else np.asarray(mask).reshape(-1).astype(bool))
    if not preds.shape == valid.shape == labels.shape:
      raise ValueError(f"shape mismatch: labels {labels.shape}, preds {preds.shape}, "
                       f"mask {valid.shape}")
    labels, preds = labels[valid], preds[valid]
    for name, x in (("labels", labels), ("preds", preds)):
      bad = x[(x < 0) | (x >= self.num_classes)]
      if bad.size:
        raise ValueError(f"{name} outside [0, {self.num_classes}): {np.unique(bad)[:10]}")
    if triplet_type is None:
      types = np.full(labels.shape, len(TRIPLET_TYPES), np.int64)
    else:
      types = np.asarray(triplet_type).reshape(-1).astype(np.int64)[valid]
      bad = types[(types < 0) | (types >= len(TRIPLET_TYPES))]
      if bad.size:
        raise ValueError(f"triplet_type outside [0, {len(TRIPLET_TYPES)}): {np.unique(bad)}")
    np.add.at(self._conf, (types, labels, preds), 1)
    if self._buckets:
      if index is None:
        raise ValueError("buckets need the examples' index")
      index = np.asarray(index).reshape(-1).astype(np.int64)[valid]
      for name, members in self._buckets.items():
        inside = np.isin(index, members)
        np.add.at(self._bucket_conf[name], (labels[inside], preds[inside]), 1)
    if loss is not None:
      loss = np.asarray(loss, np.float64)
      if loss.ndim == 0:
        self._loss_sum += float(loss) * int(valid.sum())
      else:
        self._loss_sum += float(loss.reshape(-1)[valid].sum())
      self._loss_n += int(valid.sum())

  @property
  def confusion(self) -> np.ndarray:
    """(C, C) counts, rows gold, columns predicted."""
    return self._conf.sum(0)

  def compute(self) -> dict:
    """Overall scores, per-type buckets, per-relation scores and the confusion.

    Keys: acc, precision, recall, f1, n, correct_pos, pred_pos, gold_pos,
    [loss], per_type {"e-e"|"o-o"|"e-o": scores} (only types that occurred),
    [buckets {name: scores} when the accumulator has buckets], per_relation {name: {precision, recall, f1, support}}, confusion (C, C).
    """
    conf = self.confusion
    out = scores_from_confusion(conf, self.negative_id)
    if self._loss_n:
      out["loss"] = self._loss_sum / self._loss_n
    out["per_type"] = {
        name: scores_from_confusion(self._conf[t], self.negative_id)
        for t, name in enumerate(TRIPLET_TYPES) if self._conf[t].sum()}
    if self._buckets:
      out["buckets"] = {name: scores_from_confusion(c, self.negative_id)
                        for name, c in self._bucket_conf.items()}
    diag = np.diag(conf)
    per_rel = {}
    for c, name in enumerate(self.relation_names):
      p, r, f = _prf(int(diag[c]), int(conf[:, c].sum()), int(conf[c, :].sum()))
      per_rel[name] = {"precision": p, "recall": r, "f1": f, "support": int(conf[c, :].sum())}
    out["per_relation"] = per_rel
    out["confusion"] = conf
    return out


def relation_metrics(preds, labels, negative_id: int, mask=None, triplet_type=None,
                     relation_names: Sequence[str] | None = None,
                     num_classes: int | None = None,
                     buckets: Mapping[str, Sequence[int]] | None = None) -> dict:
  """Metrics of one set of predictions; see `MetricsAccumulator.compute` for keys.

  The class count comes from `relation_names`, else `num_classes`, else the
  largest id seen (+1). `buckets` name rows by their position in `labels`.
  """
  if num_classes is None:
    if relation_names is not None:
      num_classes = len(relation_names)
    else:
      num_classes = int(max(np.max(preds, initial=0), np.max(labels, initial=0),
                            negative_id)) + 1
  acc = MetricsAccumulator(num_classes, negative_id, relation_names, buckets=buckets)
  acc.add(labels, preds, mask=mask, triplet_type=triplet_type,
          index=np.arange(np.size(labels)) if buckets else None)
  return acc.compute()


def scalar_metrics(metrics: Mapping[str, Any], prefix: str = "",
                   per_relation: bool = False) -> dict[str, float]:
  """Flattens `compute()` output to {"prefix/f1": x, "prefix/e-e/f1": y, ...} for logging;
  buckets flatten like the per-type scores ("prefix/compositional/f1").

  The confusion matrix is dropped; per-relation scores only on request (they
  are C x 4 scalars).
  """
  pre = f"{prefix}/" if prefix else ""
  out = {}
  for k, v in metrics.items():
    if k in ("per_type", "buckets"):
      for t, sub in v.items():
        out.update({f"{pre}{t}/{sk}": float(sv) for sk, sv in sub.items()})
    elif k == "per_relation":
      if per_relation:
        for rel, sub in v.items():
          out.update({f"{pre}rel/{rel}/{sk}": float(sv) for sk, sv in sub.items()})
    elif np.ndim(v) == 0:
      out[pre + k] = float(v)
  return out


# ----------------------------------------------------------------------------
# Model selection over an eval history: a list of records such as
# {"epoch": 3, "step": 900, "dev/f1": 61.2, "test/f1": 59.8, ...}.

def _argbest(history: Sequence[Mapping[str, Any]], key: str, tie: str) -> dict:
  if tie not in ("latest", "earliest"):
    raise ValueError(f"tie must be 'latest' or 'earliest', got {tie!r}")
  best, best_v = None, -math.inf
  for rec in history:
    v = rec.get(key)
    if v is None or not math.isfinite(float(v)):
      continue
    v = float(v)
    if v > best_v or (v == best_v and tie == "latest"):
      best, best_v = rec, v
  if best is None:
    raise ValueError(f"no record in the history has a finite {key!r}")
  return dict(best)


def select_best(history: Sequence[Mapping[str, Any]], key: str = "dev/f1",
                tie: str = "latest") -> dict:
  """The record with the best `key` (our protocol: select on dev, report its test).

  The returned record carries every metric logged at that point, so
  `select_best(h)["test/f1"]` is test F1 at the best dev epoch. Ties go to the
  latest record by default, as the reference's `>=` does; `tie="earliest"`
  keeps the first. Records without a finite `key` are skipped.
  """
  out = _argbest(history, key, tie)
  out["selected_by"] = key
  return out


def max_over_epochs(history: Sequence[Mapping[str, Any]], key: str = "test/f1") -> dict:
  """REFERENCE PROTOCOL (optimistic): the record with the highest *test* score.

  The released trainer reports the best test F1 over epochs (`>=`, latest on
  ties) and never uses dev for it (reference_remote.md 4.3). Use only to
  compare with the paper's numbers; `select_best` is the honest estimate.
  """
  out = _argbest(history, key, "latest")
  out["selected_by"] = f"max_over_epochs({key}) [reference protocol, test-set selection]"
  return out


def seed_summary(results: Sequence[Mapping[str, Any]], ddof: int = 1) -> dict:
  """{key: {"mean", "std", "n"}} over the numeric scalars of several runs.

  Keys missing from a run are averaged over the runs that have them (n says
  how many). Nested mappings are flattened with "/" ({"per_type": {"e-e":
  {"f1": ..}}} -> "per_type/e-e/f1"). `std` uses `ddof` (1: sample std, the
  usual "mean ± std over seeds"); with a single run it is 0.
  """
  def flat(res, prefix=""):
    for k, v in res.items():
      if isinstance(v, Mapping):
        yield from flat(v, f"{prefix}{k}/")
      else:
        yield f"{prefix}{k}", v

  values: dict[str, list[float]] = {}
  for res in results:
    for k, v in flat(res):
      if isinstance(v, (bool, str)) or np.ndim(v) != 0:
        continue
      try:
        x = float(v)
      except (TypeError, ValueError):
        continue
      values.setdefault(k, []).append(x)
  out = {}
  for k, vs in values.items():
    a = np.asarray(vs)
    std = float(a.std(ddof=ddof)) if a.size > ddof else 0.0
    out[k] = {"mean": float(a.mean()), "std": std, "n": int(a.size)}
  return out


def check_finite(step: int, **values) -> None:
  """Raises FloatingPointError if any value (loss, grad_norm, ...) is NaN/inf.

  Call it on host-fetched scalars at log steps; the message names the step and
  every offending quantity so a diverged run is found at once.
  """
  bad = {k: np.asarray(v, np.float64) for k, v in values.items()
         if not np.all(np.isfinite(np.asarray(v, np.float64)))}
  if bad:
    desc = ", ".join(f"{k}={v.tolist()}" for k, v in bad.items())
    raise FloatingPointError(f"non-finite {desc} at step {step}")
