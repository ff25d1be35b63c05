"""Optimizer: AdamW with parameter groups, a frozen group and the HF schedule.

Config (`config.optim`, a ConfigDict or dict with every key below; the values live in
configs/common.py:optim_config):
  name           "adamw" (the only optimizer; kept so configs can say so)
  lr             peak learning rate
  schedule       "linear": warmup then linear decay to 0 (HF
                 get_linear_schedule_with_warmup); "constant" (warmup, then
                 flat); "cosine" (warmup, then cosine to 0)
  warmup_ratio   warmup = ratio * total_steps (a float, as in HF)
  warmup_steps   overrides warmup_ratio unless None
  b1, b2, eps    Adam's
  weight_decay   decoupled (torch AdamW: p -= lr * wd * p)
  decay_mask     "all": the released code decays every parameter incl.
                 LayerNorm and biases; "no_bias_norm" skips biases, norms
                 and every parameter with fewer than 2 dims
  clip_norm      global-norm clipping of the trained gradients (None or <= 0: off)
  grad_accum     > 1 wraps the optimizer in optax.MultiSteps (mean)
  groups         {name: {"pattern": regex, "lr_mult": 1.0,
                 "weight_decay": <override>}}; patterns are `re.search`ed on
                 the "/"-joined parameter path ("text/layers_0/attention/...").
                 ConfigDict sorts keys, so in a mapping the patterns must be
                 disjoint (overlap is an error); give a sequence of
                 (name, spec) pairs when "first match wins" is wanted.
                 Unmatched parameters fall in the group "default" (lr_mult 1).
  layer_decay    layer-wise learning-rate decay (1.0: off). A parameter whose path
                 matches `layer_decay_pattern` with a layer index i (its first
                 group) gets its group's lr times layer_decay^(L-1-i), L the number
                 of layers found; one that matches with no index (the embeddings)
                 gets layer_decay^L. The top layer keeps the group's lr.
  layer_decay_pattern  regex with one optional group, the layer index
  ema            decay of a moving average of the parameters kept beside them (0: off;
                 e.g. 0.99 averages about the last 100 steps). Evaluation, best-dev
                 selection, predictions and plots then use the average (engine.TrainState
                 .eval_params); training goes on from the parameters. Not an optax
                 transform: the train step keeps it (engine.make_train_step). The decay
                 is warmed up, min(ema, (1+t)/(10+t)), so it reaches `ema` only after
                 about 9/(1-ema) steps (0.995: 1,790); it counts micro-batches, not
                 updates, under grad_accum.
  frozen_patterns regexes of parameters never updated (optax.set_to_zero;
                 they get no Adam state). The released protocol, where the
                 classifier and mm_linear stay at init (reference_remote.md
                 4.2), is frozen_patterns=("head/mm_linear", "head/classifier")
                 with the real parameter paths.
Each group pattern and each frozen pattern must match at least one parameter.

`total_steps` counts optimizer updates: with grad_accum = k it is the number
of micro-batches divided by k, and the schedule is indexed by update count.
"""
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from remote_jax import config as config_lib

GROUP_KEYS = ("pattern", "lr_mult", "weight_decay")
FROZEN, DEFAULT = "frozen", "default"
_NORM_RE = re.compile(r"norm|(^|/)ln[^/]*/|(^|/)(bias|scale)$", re.IGNORECASE)


def path_str(path) -> str:
  """jax key path -> "a/b/0/c". Attribute keys (flax boxes' `.value`) are skipped."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
  return "/".join(parts)


def _groups(spec) -> tuple[list[tuple[str, dict]], bool]:
  """[(name, spec)] and whether order decides (a sequence) or overlap is an error."""
  if not spec:
    return [], False
  ordered = not isinstance(spec, Mapping) and not hasattr(spec, "items")
  items = list(spec) if ordered else list(config_lib.as_dict(spec).items())
  out = []
  for item in items:
    name, g = item
    g = config_lib.as_dict(g)
    if name in (FROZEN, DEFAULT):
      raise ValueError(f"optim group name {name!r} is reserved")
    unknown = sorted(set(g) - set(GROUP_KEYS))
    if unknown:
      raise ValueError(f"optim group {name!r}: unknown key(s) {unknown}; allowed: {GROUP_KEYS}")
    if "pattern" not in g:
      raise ValueError(f"optim group {name!r} has no 'pattern'")
    out.append((name, g))
  return out, ordered


def param_labels(config, params) -> Any:
  """The group name of every leaf of `params` (arrays or ShapeDtypeStructs).

  Frozen patterns win over groups. Raises if a pattern matches nothing or, for
  a mapping of groups, if a parameter matches two groups.
  """
  cfg = config_lib.optim_settings(config)
  groups, ordered = _groups(cfg["groups"])
  frozen = [re.compile(p) for p in (cfg["frozen_patterns"] or ())]
  compiled = [(name, re.compile(g["pattern"])) for name, g in groups]
  hits = {p.pattern: 0 for p in frozen} | {name: 0 for name, _ in groups}

  def label(path, _):
    s = path_str(path)
    frozen_hit = [p.pattern for p in frozen if p.search(s)]
    for p in frozen_hit:
      hits[p] += 1
    matched = [name for name, rx in compiled if rx.search(s)]
    for name in matched:
      hits[name] += 1
    if len(matched) > 1 and not ordered:
      raise ValueError(f"parameter {s!r} matches optim groups {matched}: make the "
                       "patterns disjoint or give groups as an ordered sequence")
    if frozen_hit:
      return FROZEN
    return matched[0] if matched else DEFAULT

  labels = jax.tree_util.tree_map_with_path(label, params)
  missing = [k for k, n in hits.items() if n == 0]
  if missing:
    raise ValueError(f"optim pattern(s)/group(s) match no parameter: {missing}")
  return labels


def layer_depths(cfg, params) -> Any:
  """Each leaf's depth below the top layer for layer_decay (0 outside the pattern)."""
  cfg = config_lib.optim_settings(cfg)
  rx = re.compile(cfg["layer_decay_pattern"])

  def index(path, _):
    m = rx.search(path_str(path))
    if m is None:
      return None
    i = m.group(1) if m.groups() else None
    return -1 if i is None else int(i)

  indices = jax.tree_util.tree_map_with_path(index, params)
  layers = [i for i in jax.tree_util.tree_leaves(indices) if i >= 0]
  if not layers:
    raise ValueError(f"optim.layer_decay_pattern={cfg['layer_decay_pattern']!r} matches no "
                     "numbered layer (its group 1 is the layer index)")
  top = max(layers)
  # None leaves vanish from tree_leaves: map them to depth 0 through the params tree.
  return jax.tree_util.tree_map(lambda i, _: 0 if i is None else top - i, indices, params,
                                is_leaf=lambda x: x is None)


def labels_with_depth(cfg, params) -> Any:
  """param_labels, with "@depth" appended where layer_decay applies."""
  labels = param_labels(cfg, params)
  if float(config_lib.optim_settings(cfg)["layer_decay"]) == 1.0:
    return labels
  return jax.tree_util.tree_map(
      lambda label, depth: label if label == FROZEN or depth == 0 else f"{label}@{depth}",
      labels, layer_depths(cfg, params))


def decay_mask(params, mode: str = "all") -> Any:
  """Leaves that get weight decay: every one ("all", the released code) or all
  but biases, norms and < 2-dim tensors ("no_bias_norm")."""
  if mode == "all":
    return jax.tree_util.tree_map(lambda _: True, params)
  if mode != "no_bias_norm":
    raise ValueError(f"decay_mask must be 'all' or 'no_bias_norm', got {mode!r}")
  return jax.tree_util.tree_map_with_path(
      lambda p, x: len(x.shape) >= 2 and not _NORM_RE.search(path_str(p)), params)


def make_schedule(lr: float, total_steps: int, warmup_ratio: float = 0.0,
                  warmup_steps: float | None = None, kind: str = "linear") -> Callable:
  """lr(step): linear warmup from 0, then `kind` decay to 0 at total_steps.

  "linear" equals HF get_linear_schedule_with_warmup with a float warmup:
  step / max(1, w) while step < w, then max(0, (T - step) / max(1, T - w)).
  torch's LambdaLR applies lambda(k) to the k-th update (0-based), as optax
  does with its update count, so the first update has lr 0 in both.
  """
  if total_steps <= 0:
    raise ValueError(f"total_steps must be positive, got {total_steps}")
  total = float(total_steps)
  warm = float(warmup_steps) if warmup_steps is not None else warmup_ratio * total
  if kind not in ("linear", "constant", "cosine"):
    raise ValueError(f"unknown schedule {kind!r}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    up = step / max(1.0, warm)
    frac = jnp.clip((step - warm) / max(1.0, total - warm), 0.0, 1.0)
    if kind == "linear":
      down = jnp.maximum(0.0, (total - step) / max(1.0, total - warm))
    elif kind == "cosine":
      down = 0.5 * (1.0 + jnp.cos(math.pi * frac))
    else:
      down = jnp.ones_like(step)
    return lr * jnp.where(step < warm, up, down)

  return schedule


def make_optimizer(config, params, total_steps: int):
  """(optax GradientTransformation, schedule) for `params` (arrays or shapes).

  Returns the base schedule (lr_mult 1) for logging; group g uses
  lr_mult_g * schedule. See the module docstring for the config.
  """
  cfg = config_lib.optim_settings(config)
  rate = float(cfg["layer_decay"])
  if not 0.0 < rate <= 1.0:
    raise ValueError(f"optim.layer_decay={rate}: in (0, 1]; 1.0 turns it off")
  labels = labels_with_depth(cfg, params)
  used = set(jax.tree_util.tree_leaves(labels))
  schedule = make_schedule(cfg["lr"], total_steps, cfg["warmup_ratio"],
                           cfg["warmup_steps"], cfg["schedule"])
  mode = cfg["decay_mask"]
  decay_mask(params, mode)  # validates the mode now rather than at init

  def adamw(lr_mult, wd):
    return optax.adamw(
        (lambda s: lr_mult * schedule(s)) if lr_mult != 1.0 else schedule,
        b1=cfg["b1"], b2=cfg["b2"], eps=cfg["eps"], weight_decay=wd,
        mask=lambda p: decay_mask(p, mode))

  transforms = {FROZEN: optax.set_to_zero()}
  if DEFAULT in used:
    transforms[DEFAULT] = adamw(1.0, cfg["weight_decay"])
  for name, g in _groups(cfg["groups"])[0]:
    transforms[name] = adamw(float(g.get("lr_mult", 1.0)),
                             float(g.get("weight_decay", cfg["weight_decay"])))
  for label in sorted(used):
    if "@" in label:   # layer_decay: the group's lr scaled by rate^depth
      group, depth = label.split("@")
      spec = dict(_groups(cfg["groups"])[0]).get(group, {})
      transforms[label] = adamw(float(spec.get("lr_mult", 1.0)) * rate ** int(depth),
                                float(spec.get("weight_decay", cfg["weight_decay"])))
  transforms = {k: v for k, v in transforms.items() if k in used}
  # Recomputed at init so the labels follow whatever tree tx.init receives.
  tx = optax.partition(transforms, lambda p: labels_with_depth(cfg, p))

  if cfg["clip_norm"] and cfg["clip_norm"] > 0:
    steps = [optax.clip_by_global_norm(cfg["clip_norm"]), tx]
    if FROZEN in used:
      # Zero frozen grads first so the norm counts trained parameters only, as
      # torch's clip over the optimizer's parameters would.
      steps.insert(0, optax.masked(optax.set_to_zero(),
                                   lambda p: jax.tree_util.tree_map(
                                       lambda l: l == FROZEN, param_labels(cfg, p))))
    tx = optax.chain(*steps)
  if int(cfg["grad_accum"]) > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(cfg["grad_accum"])).gradient_transformation()
  return tx, schedule


def group_summary(config, params) -> dict[str, dict[str, int]]:
  """{group: {"tensors": n, "params": count}}, for logging at start-up."""
  labels = labels_with_depth(config, params)
  out: dict[str, dict[str, int]] = {}
  for lab, x in zip(jax.tree_util.tree_leaves(labels), jax.tree_util.tree_leaves(params)):
    d = out.setdefault(lab, {"tensors": 0, "params": 0})
    d["tensors"] += 1
    d["params"] += int(math.prod(x.shape))
  return out
