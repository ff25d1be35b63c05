r"""Probe a trained checkpoint's MOT with inference-time switches (issue 34). Prints JSON.

  python -m bench.ot_probe --config configs/demo.py --workdir runs/demo [--split test]

The checkpoint must come from a plan variant that shares ot_paper's parameters (ot_paper,
uniform, skip, detached, fgw). On the same parameters it reports, for `--split`:
- "scores": test F1 overall and per triplet type for
  "trained" (as trained), "alpha_one" (every alpha_logit at +inf: the transported term
  zeroed, out = query) and "uniform_plan" (the same parameters under mot=uniform);
- "ot": per level ("text_3", "vision_3", ...) the eval plan diagnostics of the trained
  model (the blocks' diag keys: gate_mean (alpha), plan_entropy, row_entropy,
  uniform_deviation, uniform_tv, same_position_mass, marginal_error,
  transport_norm_ratio);
- "grad_through_plan": per encoder (and per encoder child module), |g_full - g_detached| /
  |g_full| of the training loss's gradient over `--grad_batches` train batches, where
  g_detached is the gradient of the same parameters under mot=detached (the plan under
  stop_gradient): the share of the encoder gradient that flows through the plan (ot_paper
  checkpoints only; null otherwise).
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from remote_jax import cli

PLAN_VARIANTS = ("ot_paper", "uniform", "skip", "detached", "fgw")
ENCODERS = ("text", "vision")


def alpha_one(params):
  """`params` with every fusion gate at alpha = 1 (alpha_logit = +inf): the blocks return
  their query, so the transported term is zeroed and nothing else changes."""
  def gate(path, x):
    last = path[-1]
    return jnp.full_like(x, jnp.inf) if getattr(last, "key", None) == "alpha_logit" else x
  return jax.tree_util.tree_map_with_path(gate, params)


def grad_share(full, detached):
  """{encoder: |full - detached| / |full|, "encoder/child": ...} over two gradient trees
  (L2 over all leaves); 0 where |full| is 0."""
  def share(a, b):
    diff = sum(float(jnp.sum((x - y) ** 2)) for x, y in zip(jax.tree.leaves(a),
                                                               jax.tree.leaves(b)))
    norm = sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(a))
    return float(np.sqrt(diff / norm)) if norm > 0 else 0.0

  out = {}
  for enc in ENCODERS:
    if enc not in full:
      continue
    out[enc] = share(full[enc], detached[enc])
    for child in sorted(full[enc]):
      out[f"{enc}/{child}"] = share(full[enc][child], detached[enc][child])
  return out


def per_level(ot):
  """task.evaluate's flat {"text_3/plan_entropy": x} -> {"text_3": {"plan_entropy": x}}."""
  out = {}
  for key, value in ot.items():
    level, _, name = key.partition("/")
    out.setdefault(level, {})[name] = value
  return out


def with_variant(config, variant):
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.mot.variant = variant
  return config


def scores(res, split):
  from remote_jax import metrics, task
  return metrics.scalar_metrics(task.loggable(res), prefix=split)


def probe(config, s, params, split, grad_batches):
  from remote_jax import task
  variant = config.model.mot.variant
  if variant not in PLAN_VARIANTS:
    raise ValueError(f"model.mot.variant={variant!r}: the probe needs a plan variant "
                     f"{list(PLAN_VARIANTS)} (their parameters are ot_paper's)")
  trained = task.evaluate(s, params, split)
  out = {"variant": variant, "split": split,
         "scores": {"trained": scores(trained, split),
                    "alpha_one": scores(task.evaluate(s, alpha_one(params), split), split)},
         "ot": per_level(trained["ot"])}
  s_uni = task.setup(with_variant(config, "uniform"))
  out["scores"]["uniform_plan"] = scores(task.evaluate(s_uni, params, split), split)

  # Only ot_paper's plan has a detached twin (detached = ot_paper's plan under stop_gradient);
  # uniform, skip and detached send nothing through the plan by construction.
  out["grad_through_plan"] = (grad_through_plan(config, s, params, grad_batches)
                              if variant == "ot_paper" else None)
  return out


def grad_through_plan(config, s, params, grad_batches):
  from remote_jax import sharding, task
  from remote_jax.data import pipeline
  s_det = task.setup(with_variant(config, "detached"))
  rng = jax.random.key(0)

  def grads_of(model):
    fn = lambda p, b: jax.grad(lambda p: task.remote_loss(model, p, b, rng, False)[0])(p)
    return s.jit_eval(fn)

  g_full_fn, g_det_fn = grads_of(s.model), grads_of(s_det.model)
  ds = pipeline.build_dataset(config.data, task.SPLITS["train"], batch_size=config.batch_size,
                              shuffle=False, seed=0, drop_remainder=True)
  shares = []
  for i, batch in enumerate(ds):
    if i == grad_batches:
      break
    batch = sharding.global_batch(task.model_batch(batch), s.mesh)
    shares.append(grad_share(jax.device_get(g_full_fn(params, batch)),
                             jax.device_get(g_det_fn(params, batch))))
  return {k: float(np.mean([d[k] for d in shares])) for k in shares[0]}


def main(argv):
  del argv
  from remote_jax import distributed, task
  with task.restored(_CONFIG.value, _CHECKPOINT.value, _WORKDIR.value) as (s, state, step, path):
    out = {"checkpoint": str(path), "step": step,
           **probe(_CONFIG.value, s, state.eval_params, _SPLIT.value, _GRAD_BATCHES.value)}
    if distributed.is_main():
      json.dump(out, sys.stdout, indent=2)
      print()


if __name__ == "__main__":
  # Flags only when run: the tests import this module beside other CLIs' flags.
  _CONFIG = cli.define_config_flag()
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory holding ckpt/.")
  _CHECKPOINT = flags.DEFINE_string("checkpoint", "", "Checkpoint path (default: workdir).")
  _SPLIT = flags.DEFINE_string("split", "test", "Split to score (dev, test).")
  _GRAD_BATCHES = flags.DEFINE_integer("grad_batches", 4, "Train batches for grad_through_plan.")
  cli.run(main)
