"""Sinkhorn solvers for the fusion blocks, one problem at a time (vmap to batch).

- `ott_plan`: ott-jax Sinkhorn with a fixed iteration count on the cost matrix
  of two point clouds (the paper variant). Unrolled or implicit differentiation.
- `log_sinkhorn`: the same updates hand-written in plain JAX (log domain, same
  order as ott: g then f), for `solver="jax"` and as the bench baseline.
- `released_plan`: the released code's plain-domain loop with its kernel floor
  and clamp (reference_remote.md 3.4), which ott cannot express.
- `plan_stats`: per-example diagnostics of a plan.

Plans are (n, m): rows are query tokens (weights a), columns source tokens
(weights b). Zero weight marks padding.
"""
import jax
import jax.numpy as jnp
from ott.geometry import costs, epsilon_scheduler, geometry
from ott.problems.linear import linear_problem
from ott.solvers.linear import implicit_differentiation, sinkhorn

# ott cost functions by config name (`model.mot.cost`).
COSTS = {
    "cosine": costs.Cosine,            # 1 - cos, in [0, 2]: the paper's eq. 7
    "sqeuclidean": costs.SqEuclidean,  # scale grows with |x|^2: retune epsilon
    "euclidean": costs.Euclidean,      # ott's norm has a NaN-free gradient at 0
}

# Relative weight of padded points where ott 0.6.0 cannot take exact zeros:
# implicit mode (its eps * log(marginal) preconditioner) and unbalanced sides
# (tau < 1) both give NaN gradients at zero weight. Their plan entries are
# zeroed afterwards; valid marginals move by ~1e-6 relative.
PAD_WEIGHT = 1e-6


def inner_iterations(iters: int) -> int:
  """ott runs (iters // inner) * inner steps: take a divisor of iters <= 10."""
  return max(d for d in range(1, min(iters, 10) + 1) if iters % d == 0)


def unrolled_block(iters: int) -> int:
  """Block length for the unrolled while loop: the smallest divisor >= 2.

  ott tests convergence at block ends >= min_iterations and reads an error it
  did not compute (inf) as divergence, so no block end may fall in
  [iters - 1, iters): blocks of >= 2 that divide iters. Short blocks compile
  fastest; the loop checkpoints only the potentials (n+m floats) per block.
  """
  return 1 if iters == 1 else min(d for d in range(2, iters + 1) if iters % d == 0)


def _epsilon(epsilon, eps_init, eps_decay):
  if eps_init == 1.0 and eps_decay == 1.0:
    return epsilon
  # eps_t = max(init * decay^t, 1) * epsilon; the plan uses eps_T = epsilon.
  return epsilon_scheduler.Epsilon(epsilon, init=eps_init, decay=eps_decay)


def ott_plan(x, y, a, b, *, cost, epsilon, iters, tau_a=1.0, tau_b=1.0,
             eps_init=1.0, eps_decay=1.0, implicit=False):
  """Entropic OT plan between x (n,d) and y (m,d) with weights a (n,), b (m,).

  Exactly `iters` iterations (see below for how). `tau_*` < 1 makes
  the problem unbalanced. Static: cost, iters, tau_*, eps_init/decay, implicit.

  implicit=True uses ott's ImplicitDiff (lineax CG at the fixed point): memory
  independent of `iters`, but it assumes convergence (0.8% off finite
  differences at 50 iterations on rank-2 features, exact at 1000), and with
  padding its solve often fails with lineax's runtime error ("non-finite
  output": bench/ot_block.py inputs at text1 and vision6), which no
  sanitising here can catch. Experimental; unrolled is the default.
  """
  # The cost is materialised once: with a PointCloud, ott's unrolled backward
  # re-differentiates the pairwise cost (n*m*d) in every loop block, which
  # made forward+backward 11-19x slower (bench shapes) than on a Geometry.
  geom = geometry.Geometry(cost_matrix=cost_matrix(x, y, cost),
                           epsilon=_epsilon(epsilon, eps_init, eps_decay))
  if implicit:
    solver = sinkhorn.Sinkhorn(
        min_iterations=iters, max_iterations=iters,
        inner_iterations=inner_iterations(iters),
        implicit_diff=implicit_differentiation.ImplicitDiff())
  else:
    # Not min == max: ott 0.6.0's unrolled backward for that case (the scan
    # branch of fixpoint_iter_bwd) starts at block 0 instead of the last block
    # and pulls back through the wrong states: gradients 57% off finite
    # differences on rank-2 features, at 50 and at 1000 iterations. min = iters-1
    # takes the while-loop branch, whose backward is right; threshold -1 never
    # stops it early, so it still runs exactly `iters` iterations (with the
    # block length of `unrolled_block`).
    solver = sinkhorn.Sinkhorn(
        min_iterations=iters - 1, max_iterations=iters, threshold=-1.0,
        inner_iterations=unrolled_block(iters), implicit_diff=None)
  prob = linear_problem.LinearProblem(geom, a, b, tau_a=tau_a, tau_b=tau_b)
  return solver(prob).matrix


def _log(w):
  return jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), -jnp.inf)


def log_sinkhorn(cost, a, b, *, epsilon, iters, tau_a=1.0, tau_b=1.0,
                 eps_init=1.0, eps_decay=1.0):
  """Plain-JAX log-domain Sinkhorn on a cost matrix (n,m); ott's arithmetic.

  Potentials start at 0; each iteration updates g (columns) then f (rows) at
  eps_t; the plan is exp((f + g - C) / epsilon). Differentiated by unrolling;
  each step is rematerialised, so like ott's loop the backward keeps only the
  potentials per iteration, not iters (n,m) softmax matrices.
  """
  log_a, log_b = _log(a), _log(b)

  def step(fg, t):
    f, g = fg
    eps = epsilon * jnp.maximum(eps_init * eps_decay ** t, 1.0)
    lse = eps * jax.nn.logsumexp((f[:, None] - cost) / eps, axis=0)
    g = tau_b * (eps * log_b - jnp.where(jnp.isfinite(lse), lse, 0.0))
    lse = eps * jax.nn.logsumexp((g[None, :] - cost) / eps, axis=1)
    f = tau_a * (eps * log_a - jnp.where(jnp.isfinite(lse), lse, 0.0))
    return (f, g), None

  init = (jnp.zeros_like(a), jnp.zeros_like(b))
  (f, g), _ = jax.lax.scan(jax.checkpoint(step), init, jnp.arange(iters, dtype=a.dtype))
  return jnp.exp((f[:, None] + g[None, :] - cost) / epsilon)


def cost_matrix(x, y, cost):
  """(n,d), (m,d) -> (n,m) with ott's cost functions (what a PointCloud uses)."""
  return COSTS[cost]().all_pairs(x, y)


def safe_cdist(x, y):
  """Euclidean distances (n,m) like torch.cdist's matmul path, NaN-free at 0."""
  d2 = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :]
        - 2.0 * x @ y.T)
  pos = d2 > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)


def released_plan(cost, a, b, *, epsilon, iters, valid=None, floor=1e-12,
                  clamp=1e-8):
  """The released loop: K = exp(-C/eps) + floor; u = v = 1; `iters` times
  u = a / max(K v, clamp), v = b / max(K^T u, clamp); plan = diag(u) K diag(v).

  `valid` (n,m) bool zeroes K outside the valid block (the optional mask).
  """
  kernel = jnp.exp(-cost / epsilon) + floor
  if valid is not None:
    kernel = jnp.where(valid, kernel, 0.0)

  def step(_, uv):
    u, v = uv
    u = a / jnp.maximum(kernel @ v, clamp)
    v = b / jnp.maximum(kernel.T @ u, clamp)
    return u, v

  u, v = jax.lax.fori_loop(0, iters, step, (jnp.ones_like(a), jnp.ones_like(b)))
  return u[:, None] * kernel * v[None, :]


def plan_stats(plan, a, b, row_valid, col_valid):
  """Per-example diagnostics (no gradient) of a plan with zeros off the valid block.

  marginal_error: L1 of row + column marginal violations on valid points.
  plan_entropy: H(P) / log(n_valid * m_valid); 1 means uniform.
  uniform_deviation: max over valid entries of |P * n_valid * m_valid - 1|.
  ok: the example has a valid query and a valid source point.
  The plan is used as is (not renormalised: an fp32 sum would add ~1e-6 noise),
  so for unbalanced plans the last two also reflect the total mass.
  """
  plan = jax.lax.stop_gradient(plan)
  n_v = jnp.sum(row_valid).astype(plan.dtype)
  m_v = jnp.sum(col_valid).astype(plan.dtype)
  marginal = (jnp.sum(jnp.where(row_valid, jnp.abs(plan.sum(1) - a), 0.0))
              + jnp.sum(jnp.where(col_valid, jnp.abs(plan.sum(0) - b), 0.0)))
  pos = plan > 0
  entropy = -jnp.sum(jnp.where(pos, plan * jnp.log(jnp.where(pos, plan, 1.0)), 0.0))
  nm = n_v * m_v
  entropy = jnp.where(nm > 1, entropy / jnp.log(jnp.maximum(nm, 2.0)), 1.0)
  valid = row_valid[:, None] & col_valid[None, :]
  deviation = jnp.max(jnp.where(valid, jnp.abs(plan * nm - 1.0), 0.0))
  return {"marginal_error": marginal, "plan_entropy": entropy,
              "uniform_deviation": deviation, "ok": (n_v > 0) & (m_v > 0)}
