"""Diagnostic figures. Each function writes one PNG and returns its path.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never
pyplot, so no global backend or state is touched (safe in trainers and tests).
Sizes are fixed (no tight bbox): a figure of `figsize` inches at `dpi` is
exactly figsize*dpi pixels.
"""
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# A plan counts as degenerate-uniform when every entry is within this relative
# distance of 1/(n m) (reference_remote.md 3.4: the released OT gives exactly that).
UNIFORM_TOL = 1e-2


def _figure(figsize, dpi):
  # Constrained layout fits labels inside the fixed canvas (no clipping).
  fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path, dpi) -> str:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=dpi, format="png")
  return str(path)


def training_curves(records: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                    x: str = "step", metric: str = "f1", splits=("dev", "test"),
                    figsize=(10, 4), dpi=100) -> str:
  """Train loss (left) and `metric` per eval split (right) against `x`.

  `records` are metrics.jsonl lines (`writers.read_metrics`): train records
  have split "train" and "loss"; eval records split in `splits` and `metric`.
  x="epoch" uses each record's "epoch" field.
  """
  def series(split, key):
    pts = [(r[x], r[key]) for r in records
           if r.get("split") == split and r.get(key) is not None and x in r]
    return tuple(zip(*sorted(pts))) if pts else ((), ())

  fig = _figure(figsize, dpi)
  ax_loss, ax_metric = fig.subplots(1, 2)
  xs, ys = series("train", "loss")
  ax_loss.plot(xs, ys, lw=1)
  ax_loss.set(title="train loss", xlabel=x, ylabel="loss")
  for split in splits:
    xs, ys = series(split, metric)
    if xs:
      ax_metric.plot(xs, ys, marker="o", ms=3, label=split)
      best = int(np.argmax(ys))
      ax_metric.annotate(f"{ys[best]:.2f}", (xs[best], ys[best]), xytext=(0, 4),
                         textcoords="offset points", ha="center", fontsize=8)
  ax_metric.set(title=metric, xlabel=x, ylabel=metric)
  if ax_metric.lines:
    ax_metric.legend()
  for ax in (ax_loss, ax_metric):
    ax.grid(alpha=0.3)
  return _save(fig, path, dpi)


def confusion_matrix(confusion, relation_names: Sequence[str], path: str | os.PathLike,
                     normalize: bool = True, figsize=None, dpi=100) -> str:
  """Gold (rows) x predicted (columns) heat map; rows normalised to sum to 1.

  Counts are written in cells for up to 30 classes. figsize defaults to
  grow with the number of classes.
  """
  conf = np.asarray(confusion, np.float64)
  c = conf.shape[0]
  if conf.shape != (c, c) or len(relation_names) != c:
    raise ValueError(f"confusion {conf.shape} vs {len(relation_names)} relation names")
  shown = conf / np.maximum(conf.sum(1, keepdims=True), 1) if normalize else conf
  side = max(4.0, 0.35 * c + 2.5)
  fig = _figure(figsize or (side, side), dpi)
  ax = fig.subplots()
  im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  ax.set_xticks(range(c), relation_names, rotation=90, fontsize=7)
  ax.set_yticks(range(c), relation_names, fontsize=7)
  ax.set(xlabel="predicted", ylabel="gold",
         title="confusion (row-normalised)" if normalize else "confusion")
  if c <= 30:
    for i, j in zip(*np.nonzero(conf)):
      ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=6,
              color="white" if shown[i, j] > 0.5 * shown.max() else "black")
  return _save(fig, path, dpi)


def mean_by_row(router, rows, n_rows: int, mask=None):
  """(N, E) or (N, ..., E) router weights -> ((n_rows, E) mean per row id, counts (n_rows,));
  NaN where a row id has no example. `mask` (N,) drops padding rows."""
  w = np.asarray(router, np.float64)
  w = w.reshape(w.shape[0], -1, w.shape[-1]).mean(1)
  rows = np.asarray(rows).reshape(-1)
  if mask is not None:
    keep = np.asarray(mask, bool).reshape(-1)
    w, rows = w[keep], rows[keep]
  sums = np.zeros((n_rows, w.shape[-1]))
  np.add.at(sums, rows, w)
  counts = np.bincount(rows, minlength=n_rows)
  return np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], np.nan), counts


def router_weights(router, labels, relation_names: Sequence[str],
                   expert_names: Sequence[str], path: str | os.PathLike,
                   mask=None, figsize=None, dpi=100, row_kind="relation") -> str:
  """Mean MMoE router weight per relation (rows) and expert/level (columns).

  The paper's figure 5. `router` is (N, E) or (N, ..., E) (e.g. per token:
  the middle axes are averaged); `labels` (N,) relation ids; `mask` (N,)
  drops padding rows. Relations with no example are left blank. Any other row
  grouping works too (triplet types: `row_kind="triplet type"`).
  """
  n_rel, n_exp = len(relation_names), np.shape(router)[-1]
  if len(expert_names) != n_exp:
    raise ValueError(f"{len(expert_names)} expert names for {n_exp} router columns")
  mean, counts = mean_by_row(router, labels, n_rel, mask)
  fig = _figure(figsize or (max(5.0, 0.4 * n_exp + 3), max(4.0, 0.3 * n_rel + 2)), dpi)
  ax = fig.subplots()
  im = ax.imshow(mean, cmap="viridis", aspect="auto")
  fig.colorbar(im, ax=ax, label="mean router weight")
  ax.set_xticks(range(n_exp), expert_names, rotation=90, fontsize=7)
  ax.set_yticks(range(n_rel), [f"{r} ({int(k)})" for r, k in zip(relation_names, counts)],
                fontsize=7)
  ax.set(xlabel="expert / level", ylabel=f"{row_kind} (support)", title="MMoE routing")
  return _save(fig, path, dpi)


def _nest_ot(diags: Mapping[str, Any]) -> dict[str, Mapping[str, float]]:
  """Accepts {"text_3": {"plan_entropy": x}} or the flat {"text_3/plan_entropy": x}."""
  out: dict[str, dict[str, float]] = {}
  for key, v in diags.items():
    if isinstance(v, Mapping):
      out.setdefault(key, {}).update(v)
    else:
      block, sep, name = key.rpartition("/")
      if not sep:
        raise ValueError(f"OT diagnostic {key!r} is neither a dict nor '<block>/<name>'")
      out.setdefault(block, {})[name] = v
  return out


def ot_diagnostics(diags: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
                   uniform_tol: float = UNIFORM_TOL, figsize=(12, 3.5), dpi=100) -> str:
  """uniform_deviation, plan_entropy and marginal_error against level, one line
  per modality.

  `diags` is `aux["ot"]`: {"<modality>_<level>": {name: scalar}} (averaged
  over eval batches by the caller), or flat {"<modality>_<level>/<name>": scalar}.
  Levels whose uniform_deviation is below `uniform_tol` (the plan is uniform:
  "transport" is a plain mean, see reference_remote.md 3.4) are marked with
  red crosses and counted in the title.
  """
  per_mod: dict[str, dict[int, Mapping[str, float]]] = {}
  for key, d in _nest_ot(diags).items():
    modality, _, level = key.rpartition("_")
    if not modality or not level.isdigit():
      raise ValueError(f"OT diagnostic key {key!r} is not '<modality>_<level>'")
    per_mod.setdefault(modality, {})[int(level)] = d
  names = ("uniform_deviation", "plan_entropy", "marginal_error")
  fig = _figure(figsize, dpi)
  axes = fig.subplots(1, 3)
  n_uniform = 0
  for modality, by_level in sorted(per_mod.items()):
    levels = sorted(by_level)
    dev = np.array([float(by_level[l].get("uniform_deviation", np.nan)) for l in levels])
    degenerate = dev < uniform_tol
    n_uniform += int(degenerate.sum())
    for ax, name in zip(axes, names):
      ys = np.array([float(by_level[l].get(name, np.nan)) for l in levels])
      ax.plot(levels, ys, marker="o", ms=4, label=modality)
      if degenerate.any():
        ax.scatter(np.asarray(levels)[degenerate], ys[degenerate], marker="x", s=60,
                   color="red", zorder=3)
  for ax, name in zip(axes, names):
    ax.set(title=name, xlabel="level")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # levels are layer indices
    ax.grid(alpha=0.3)
  axes[0].axhline(uniform_tol, color="red", ls="--", lw=0.8)
  axes[0].legend(fontsize=7)
  total = sum(len(v) for v in per_mod.values())
  fig.suptitle(f"OT diagnostics: {n_uniform}/{total} plans uniform "
               f"(uniform_deviation < {uniform_tol:g}, red x)", fontsize=10,
               color="red" if n_uniform else "black")
  return _save(fig, path, dpi)
