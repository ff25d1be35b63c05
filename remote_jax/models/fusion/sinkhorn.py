"""Sinkhorn solvers for the fusion blocks, one problem at a time (vmap to batch).

- `ott_plan`: ott-jax Sinkhorn with a fixed iteration count on the cost matrix
  of two point clouds (the paper variant). Unrolled or implicit differentiation.
- `log_sinkhorn`: the same updates hand-written in plain JAX (log domain, same
  order as ott: g then f), for `solver="jax"` and as the bench baseline.
- `kernel_sinkhorn`: the same iterates in the scaling domain with a
  hand-written unrolled gradient; `solver="jax"` uses it where
  `kernel_domain_ok` (cosine cost, epsilon >= 0.08, no schedule): 2.4x faster
  forward+backward than `log_sinkhorn` at the vision6 bench shape.
- `released_plan`: the released code's plain-domain loop with its kernel floor
  and clamp (reference_remote.md 3.4), which ott cannot express.
- `plan_stats`: per-example diagnostics of a plan.

Plans are (n, m): rows are query tokens (weights a), columns source tokens
(weights b). Zero weight marks padding.
"""
import functools

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


# Kernel-domain Sinkhorn is used where exp(-C/eps) stays far from float32's
# underflow: costs bounded by COST_BOUND (cosine: 1 - cos <= 2) and
# bound / eps <= KERNEL_MAX_EXPONENT (K >= exp(-25) ~ 1e-11, so u, v and their
# cotangents stay well inside float32's range).
COST_BOUND = {"cosine": 2.0}
KERNEL_MAX_EXPONENT = 25.0


def kernel_domain_ok(cost, epsilon, eps_init=1.0, eps_decay=1.0):
  """Whether `kernel_sinkhorn` may replace `log_sinkhorn` (static config check):
  a bounded cost, no epsilon schedule (K would change every iteration) and
  bound / epsilon small enough."""
  bound = COST_BOUND.get(cost)
  return (bound is not None and eps_init == 1.0 and eps_decay == 1.0
          and bound / epsilon <= KERNEL_MAX_EXPONENT)


def kernel_sinkhorn(cost, a, b, *, epsilon, iters, tau_a=1.0, tau_b=1.0):
  """`log_sinkhorn`'s iterations in the scaling domain: u = exp(f/eps),
  v = exp(g/eps), K = exp(-C/eps) computed once; per iteration
  v = (b / K^T u)^tau_b then u = (a / K v)^tau_a, plan diag(u) K diag(v).

  Same fixed point and iterates in exact arithmetic, but two matrix-vector
  products per iteration instead of two exp + logsumexp passes. The gradient
  is the exact gradient of the unrolled loop, written by hand (custom VJP):
  a reverse pass of matrix-vector products over the stored iterates (vectors
  only) and one (n, 2T) x (2T, m) matmul for dC, instead of an n x m outer
  product per iteration. Only valid where `kernel_domain_ok`.
  """
  return _kernel_sinkhorn(float(epsilon), int(iters), float(tau_a), float(tau_b), cost, a, b)


def _scale(w, denom, tau):
  ratio = w / denom
  return ratio if tau == 1.0 else ratio ** tau


def _kernel_forward(eps, iters, tau_a, tau_b, cost, a, b):
  kernel = jnp.exp(-cost / eps)

  def step(u, _):
    s = u @ kernel                     # K^T u, (m,)
    v = _scale(b, s, tau_b)
    r = kernel @ v                     # K v, (n,)
    u_new = _scale(a, r, tau_a)
    return u_new, (u, v, s, r, u_new)

  u, (u_prev, v, s, r, u_new) = jax.lax.scan(step, jnp.ones_like(a), None, length=iters)
  plan = u[:, None] * kernel * v[-1][None, :]
  return plan, (kernel, plan, u_prev, v, s, r, u_new, a, b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _kernel_sinkhorn(eps, iters, tau_a, tau_b, cost, a, b):
  return _kernel_forward(eps, iters, tau_a, tau_b, cost, a, b)[0]


def _kernel_bwd(eps, iters, tau_a, tau_b, res, plan_bar):
  kernel, plan, u_prev, v, s, r, u_new, a, b = res
  weighted = plan_bar * kernel
  u_bar = weighted @ v[-1]             # plan = u K v: cotangents of u_T, v_T
  v_bar_last = u_new[-1] @ weighted
  safe_a, safe_b = jnp.where(a > 0, a, 1.0), jnp.where(b > 0, b, 1.0)

  def back(carry, xs):
    u_bar, v_extra, a_bar, b_bar = carry
    v_t, s_t, r_t, u_t = xs
    du = u_bar * u_t                   # d/dr of (a/r)^tau = -tau u / r
    r_bar = -tau_a * du / r_t
    a_bar = a_bar + jnp.where(a > 0, tau_a * du / safe_a, 0.0)
    v_bar = v_extra + r_bar @ kernel    # K^T r_bar
    dv = v_bar * v_t
    s_bar = -tau_b * dv / s_t
    b_bar = b_bar + jnp.where(b > 0, tau_b * dv / safe_b, 0.0)
    u_bar_prev = kernel @ s_bar
    return (u_bar_prev, jnp.zeros_like(v_extra), a_bar, b_bar), (r_bar, s_bar)

  init = (u_bar, v_bar_last, jnp.zeros_like(a), jnp.zeros_like(b))
  (_, _, a_bar, b_bar), (r_bar, s_bar) = jax.lax.scan(
      back, init, (v, s, r, u_new), reverse=True)
  # dK = u_T v_T^T * plan_bar + sum_t r_bar_t v_t^T + u_{t-1} s_bar_t^T; dC = -K dK / eps.
  outer = (jnp.concatenate([r_bar, u_prev], 0).T
           @ jnp.concatenate([v, s_bar], 0))
  cost_bar = -(plan_bar * plan + outer * kernel) / eps
  return cost_bar, a_bar, b_bar


_kernel_sinkhorn.defvjp(_kernel_forward, _kernel_bwd)


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
  row_entropy: mean over valid rows of H(row / row sum) / log(m_valid); 1 means each
    query token spreads evenly over the valid source tokens.
  uniform_deviation: max over valid entries of |P * n_valid * m_valid - 1|.
  uniform_tv: total variation between P / sum(P) and the uniform plan on the valid
    block, in [0, 1]; 0 means uniform.
  same_position_mass (only where m % n == 0, i.e. the source is whole levels of the
    query's length): mean over valid rows of the row-normalised mass on source tokens at
    the query token's position (j % n == i); a uniform plan gives 1/n_valid.
  ok: the example has a valid query and a valid source point.
  The plan is used as is (not renormalised: an fp32 sum would add ~1e-6 noise),
  so for unbalanced plans uniform_deviation and plan_entropy also reflect the total mass.
  """
  plan = jax.lax.stop_gradient(plan)
  n, m = plan.shape
  n_v = jnp.sum(row_valid).astype(plan.dtype)
  m_v = jnp.sum(col_valid).astype(plan.dtype)
  marginal = (jnp.sum(jnp.where(row_valid, jnp.abs(plan.sum(1) - a), 0.0))
              + jnp.sum(jnp.where(col_valid, jnp.abs(plan.sum(0) - b), 0.0)))
  entropy = _entropy(plan, None)
  nm = n_v * m_v
  entropy = jnp.where(nm > 1, entropy / jnp.log(jnp.maximum(nm, 2.0)), 1.0)
  valid = row_valid[:, None] & col_valid[None, :]
  deviation = jnp.max(jnp.where(valid, jnp.abs(plan * nm - 1.0), 0.0))
  total = jnp.sum(plan)
  tv = 0.5 * jnp.sum(jnp.where(valid, jnp.abs(plan / jnp.where(total > 0, total, 1.0)
                                              - 1.0 / jnp.maximum(nm, 1.0)), 0.0))
  row_sum = jnp.sum(plan, 1, keepdims=True)
  rows = plan / jnp.where(row_sum > 0, row_sum, 1.0)
  fused = row_valid & (row_sum[:, 0] > 0)
  count = jnp.maximum(jnp.sum(fused), 1).astype(plan.dtype)
  row_entropy = jnp.where(m_v > 1, _entropy(rows, 1) / jnp.log(jnp.maximum(m_v, 2.0)), 1.0)
  stats = {"marginal_error": marginal, "plan_entropy": entropy,
           "row_entropy": jnp.sum(jnp.where(fused, row_entropy, 0.0)) / count,
           "uniform_deviation": deviation, "uniform_tv": tv,
           "ok": (n_v > 0) & (m_v > 0)}
  if m % n == 0:
    same = jnp.sum(rows * (jnp.arange(m)[None, :] % n == jnp.arange(n)[:, None]), 1)
    stats["same_position_mass"] = jnp.sum(jnp.where(fused, same, 0.0)) / count
  return stats


def _entropy(p, axis):
  pos = p > 0
  return -jnp.sum(jnp.where(pos, p * jnp.log(jnp.where(pos, p, 1.0)), 0.0), axis)
