"""Does `ImplicitDiff(precondition_fun=lambda x: x)` remove the NaN gradients that ott-jax
0.6.0's implicit Sinkhorn gives at exact zero (padding) weights? (issue 34)

  python -m bench.ot_implicit_pad            # ~1 min on 2 cores

For each preconditioner (ott's default eps*log(x), the identity) and each pad weight
(0 and sinkhorn.PAD_WEIGHT), over `--trials` random padded problems shaped like the
fusion's (n query tokens, m source tokens, 25% padding, rank-4 features, cosine cost,
epsilon 0.1, 50 iterations): the share of problems whose input gradient has a NaN or
inf, the share whose linear solve fails (lineax raises), and the median and worst relative L2 difference of the finite gradients on the valid points from
the unrolled gradient (the exact gradient of the truncated loop). One JSON line per case.
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from ott.geometry import geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import implicit_differentiation, sinkhorn

from remote_jax.models.fusion import sinkhorn as sk

PRECONDITIONERS = {"default": None, "identity": lambda x: x}


def _problem(seed, n, m, d=32, rank=4):
  rng = np.random.default_rng(seed)
  basis = rng.normal(size=(rank, d))
  x = rng.normal(size=(n, rank)) @ basis + 0.3 * rng.normal(size=(n, d))
  y = rng.normal(size=(m, rank)) @ basis + 0.3 * rng.normal(size=(m, d))
  qm, sm = np.arange(n) < n - n // 4, np.arange(m) < m - m // 4
  x, y = np.where(qm[:, None], x, 1.0), np.where(sm[:, None], y, 1.0)   # ones, as the block
  w = rng.normal(size=(n, m)) * qm[:, None] * sm[None, :]
  f32 = lambda v: jnp.asarray(v, jnp.float32)
  return [f32(x), f32(y), jnp.asarray(qm), jnp.asarray(sm), f32(w)]


def _plan_fn(precondition, pad_weight, implicit, epsilon=0.1, iters=50):
  def plan(x, y, qm, sm):
    a = jnp.where(qm, 1.0, pad_weight)
    b = jnp.where(sm, 1.0, pad_weight)
    geom = geometry.Geometry(cost_matrix=sk.cost_matrix(x, y, "cosine"), epsilon=epsilon)
    if implicit:
      solver = sinkhorn.Sinkhorn(
          min_iterations=iters, max_iterations=iters,
          inner_iterations=sk.inner_iterations(iters),
          implicit_diff=implicit_differentiation.ImplicitDiff(precondition_fun=precondition))
    else:
      solver = sinkhorn.Sinkhorn(min_iterations=iters - 1, max_iterations=iters, threshold=-1.0,
                                 inner_iterations=sk.unrolled_block(iters), implicit_diff=None)
    prob = linear_problem.LinearProblem(geom, a / a.sum(), b / b.sum())
    return solver(prob).matrix
  return plan


def _grad(plan):
  def loss(x, y, qm, sm, w):
    return jnp.sum(plan(x, y, qm, sm) * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--trials", type=int, default=20)
  p.add_argument("--n", type=int, default=12)
  p.add_argument("--m", type=int, default=48)
  args = p.parse_args(argv)
  problems = [_problem(s, args.n, args.m) for s in range(args.trials)]
  exact = _grad(_plan_fn(None, 0.0, implicit=False))
  refs = [exact(*pr) for pr in problems]
  for name, pre in PRECONDITIONERS.items():
    for pad in (0.0, sk.PAD_WEIGHT):
      grad = _grad(_plan_fn(pre, pad, implicit=True))
      bad, failed, errs = 0, 0, []
      for pr, ref in zip(problems, refs):
        try:
          g = jax.block_until_ready(grad(*pr))
        except Exception:   # lineax's "non-finite output" runtime error
          failed += 1
          continue
        finite = all(bool(jnp.all(jnp.isfinite(t))) for t in g)
        bad += not finite
        if finite:
          valid = (g[0][pr[2]], g[1][pr[3]])
          ref_v = (ref[0][pr[2]], ref[1][pr[3]])
          num = sum(float(jnp.sum((u - v) ** 2)) for u, v in zip(valid, ref_v)) ** 0.5
          den = sum(float(jnp.sum(v ** 2)) for v in ref_v) ** 0.5
          errs.append(num / den)
      print(json.dumps({"precondition": name, "pad_weight": pad, "trials": args.trials,
                        "nonfinite_share": bad / args.trials,
                        "solve_failed_share": failed / args.trials,
                        "median_rel_err_vs_unrolled": float(np.median(errs)) if errs else None,
                        "worst_rel_err_vs_unrolled": max(errs, default=None)}), flush=True)


if __name__ == "__main__":
  main()
