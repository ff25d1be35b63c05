"""Optimal-transport fusion blocks: the paper's (eqs. 5-8) and the released code's.

`ot_paper`: cost between the raw query tokens (target nu, rows) and source
tokens (mu, columns), entropic Sinkhorn through ott-jax with a fixed iteration
count, F' = barycentric map of the plan, out = alpha*query + (1-alpha)*F' with
alpha = sigmoid(alpha_logit) in R^D (a logit keeps alpha in (0,1) with a
gradient everywhere, which clipping would not).

`ot_reference`: the released arithmetic (reference_remote.md 3.4): Euclidean
cost between LN(Linear) projections, K = exp(-C/0.5) + 1e-12, 50 plain-domain
iterations, out = query + w * (Pi @ source) with a scalar w. On LayerNorm'd
768-d projections K is the floor everywhere and the plan is uniform: the block
adds w/n times the mean of the source (`uniform_deviation` ~ 0 shows it).

Both compute in float32 at "highest" matmul precision and cast back.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from remote_jax import config as config_lib
from remote_jax.models.fusion import sinkhorn
from remote_jax.models.fusion.none import FIELD, batch_mean, prepare
from remote_jax.models.layers import TorchDense, layer_norm

SOLVERS = ("ott", "jax")
# Every plan block's diagnostics (sinkhorn.plan_stats and the gate); same_position_mass
# only where the source is whole levels of the query's length (m % n == 0).
DIAG_KEYS = ("gate_mean", "marginal_error", "plan_entropy", "row_entropy", "uniform_deviation",
             "uniform_tv", "transport_norm_ratio")
DIFFS = ("unrolled", "implicit")


def _finite_grads(fn):
  """fn, with non-finite input cotangents set to 0 (implicit mode's last guard:
  one NaN row would otherwise poison every parameter's gradient)."""
  @jax.custom_vjp
  def wrapped(*args):
    return fn(*args)

  def fwd(*args):
    return jax.vjp(fn, *args)

  def bwd(vjp, g):
    return tuple(jax.tree.map(lambda t: jnp.where(jnp.isfinite(t), t, 0.0), vjp(g)))

  wrapped.defvjp(fwd, bwd)
  return wrapped


def weights(mask, pad_weight=0.0):
  """Uniform weights on valid points, `pad_weight` (relative) on padding. A side
  with no valid point gets a dummy uniform problem whose result is discarded."""
  w = jnp.where(mask, 1.0, pad_weight)
  w = jnp.where(jnp.any(mask, -1, keepdims=True), w, 1.0)
  return w / jnp.sum(w, -1, keepdims=True)


def masked_plan(fn, x, y, query_mask, source_mask, pad_a=0.0, pad_b=0.0):
  """`fn(x, y, a, b) -> (n, m)` vmapped over the batch, with padded points replaced by a
  constant vector (NaN-free costs) and weighted `pad_a` / `pad_b` (relative); the plan is
  zero off the valid block."""
  plan = jax.vmap(fn)(masked(x, query_mask, 1.0), masked(y, source_mask, 1.0),
                      weights(query_mask, pad_a), weights(source_mask, pad_b))
  return jnp.where(query_mask[:, :, None] & source_mask[:, None, :], plan, 0.0)


def marginals(mask):
  """Uniform weights on the valid points, exactly 0 on padding (all 0 where none is)."""
  return weights(mask) * mask


def masked(x, mask, fill):
  """Padded points replaced by `fill` (a constant vector keeps costs NaN-free)."""
  return jnp.where(mask[..., None], x, fill)


def _sow_and_diag(module, plan, a, b, query_mask, source_mask, gate):
  module.sow("intermediates", "plan", plan)
  stats = jax.vmap(sinkhorn.plan_stats)(plan, a, b, query_mask, source_mask)
  ok = stats.pop("ok")
  diag = batch_mean(stats, ok)
  diag["gate_mean"] = jnp.mean(gate).astype(jnp.float32)
  return diag


class OTPaper(nn.Module):
  """Paper eqs. 5-8. See the module docstring and `build_paper` for fields.

  Padded points get zero weight and are replaced by a constant vector (ones,
  like ott's Cosine padder) before the cost, so nothing NaN leaks into the
  gradient; masked query rows (and rows with no valid source) return the query.
  During `init` the block returns the query and zero diagnostics without
  solving (tracing ott's Sinkhorn at init costs seconds per block).
  """
  dim: int
  epsilon: float
  iters: int
  cost: str
  diff: str
  solver: str
  tau_a: float
  tau_b: float
  eps_init: float
  eps_decay: float
  alpha_init: float
  mask: bool
  param_dtype: jnp.dtype = jnp.float32

  def _solver(self):
    """fn(x (n,d), y (m,d), a (n,), b (m,)) -> the (n, m) plan of one example."""
    kw = {"epsilon": self.epsilon, "iters": self.iters, "tau_a": self.tau_a, "tau_b": self.tau_b,
              "eps_init": self.eps_init, "eps_decay": self.eps_decay}
    if self.solver == "jax":
      if sinkhorn.kernel_domain_ok(self.cost, self.epsilon, self.eps_init, self.eps_decay):
        solve = functools.partial(sinkhorn.kernel_sinkhorn, epsilon=self.epsilon,
                                  iters=self.iters, tau_a=self.tau_a, tau_b=self.tau_b)
      else:
        solve = functools.partial(sinkhorn.log_sinkhorn, **kw)
      fn = lambda x, y, a, b: solve(sinkhorn.cost_matrix(x, y, self.cost), a, b)
    else:
      fn = functools.partial(sinkhorn.ott_plan, cost=self.cost,
                             implicit=self.diff == "implicit", **kw)
      if self.diff == "implicit":
        fn = _finite_grads(fn)
    return fn

  def plan(self, x, y, query_mask, source_mask):
    """(B,n,m) plan, zero off the valid block. The variants (uniform, skip, detached,
    fgw) replace this method and keep everything else, parameters included."""
    # Where ott NaNs on exact zero weights, padding gets a tiny one (see
    # sinkhorn.PAD_WEIGHT); masked_plan zeroes its plan entries either way.
    ott, implicit = self.solver == "ott", self.diff == "implicit"
    pad_a, pad_b = (sinkhorn.PAD_WEIGHT if ott and (implicit or tau < 1.0) else 0.0
                    for tau in (self.tau_a, self.tau_b))
    return masked_plan(self._solver(), x, y, query_mask, source_mask, pad_a, pad_b)

  @nn.compact
  def __call__(self, query, query_mask, source, source_mask, deterministic=True):
    x, query_mask, y, source_mask = prepare(self, query, query_mask, source, source_mask)
    logit = math.log(self.alpha_init / (1.0 - self.alpha_init))
    alpha_logit = self.param(
        "alpha_logit", nn.with_logical_partitioning(nn.initializers.constant(logit), ("embed",)),
        (self.dim,), self.param_dtype)
    if self.is_initializing():   # init needs only the parameter: skip tracing Sinkhorn
      return query, dict.fromkeys(DIAG_KEYS, jnp.zeros((), jnp.float32))
    with jax.default_matmul_precision("highest"):
      plan = self.plan(x, y, query_mask, source_mask)
      mass = jnp.sum(plan, -1, keepdims=True)
      moved = jnp.einsum("bnm,bmd->bnd", plan, y)
      moved = moved / jnp.where(mass > 0, mass, 1.0)   # barycentre: rows sum to 1
    alpha = jax.nn.sigmoid(alpha_logit.astype(jnp.float32))
    kept, moved = alpha * x, (1.0 - alpha) * moved
    row_ok = query_mask & (mass[..., 0] > 0)
    out = jnp.where(row_ok[..., None], (kept + moved).astype(query.dtype), query)
    diag = _sow_and_diag(self, plan, marginals(query_mask),
                         marginals(source_mask), query_mask, source_mask, alpha)
    diag["transport_norm_ratio"] = norm_ratio(moved, kept, row_ok)
    return out, diag


def norm_ratio(moved, kept, row_ok):
  """Mean over the rows that fuse of |moved| / |kept| (the transported term's norm
  against the kept term's), no gradient."""
  moved, kept = jax.lax.stop_gradient(moved), jax.lax.stop_gradient(kept)
  ratio = jnp.linalg.norm(moved, axis=-1) / jnp.maximum(jnp.linalg.norm(kept, axis=-1), 1e-12)
  rows = row_ok.astype(jnp.float32)
  return (jnp.sum(ratio * rows) / jnp.maximum(jnp.sum(rows), 1.0)).astype(jnp.float32)


class OTReference(nn.Module):
  """The released `OptimalTransportCrossAttention` + scalar residual.

  q = LN(Linear(query)), k = LN(Linear(source)) (torch default init, LN eps
  1e-5), C = cdist(q, k), K = exp(-C/eps) + 1e-12, u = v = 1 then `iters` x
  (u = a / max(Kv, 1e-8), v = b / max(K^T u, 1e-8)), a = 1/n, b = 1/m,
  out = query + w * (diag(u) K diag(v)) @ source. No value projection, no
  renormalisation (rows of the plan sum to 1/n). `mask=True` (not in the
  release) restricts a, b and K to valid points and leaves masked rows as is.
  """
  dim: int
  epsilon: float
  iters: int
  mask: bool
  residual_init: float
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, query_mask, source, source_mask, deterministic=True):
    x, query_mask, y, source_mask = prepare(self, query, query_mask, source, source_mask)
    f32, pd = jnp.float32, self.param_dtype

    def project(h, side):
      dense = TorchDense(self.dim, kernel_axes=("embed", "joined_kv"), dtype=f32,
                         param_dtype=pd, name=f"{side}_proj")
      return layer_norm(1e-5, f32, pd, f"{side}_norm")(dense(h))

    w = self.param("w", nn.with_logical_partitioning(
        nn.initializers.constant(self.residual_init), ()), (), pd)
    with jax.default_matmul_precision("highest"):
      q, k = project(x, "q"), project(y, "k")
    if self.is_initializing():   # parameters exist now; skip the solve
      return query, dict.fromkeys(DIAG_KEYS, jnp.zeros((), jnp.float32))
    a, b = marginals(query_mask), marginals(source_mask)
    with jax.default_matmul_precision("highest"):
      cost = jax.vmap(sinkhorn.safe_cdist)(q, k)
      solve = functools.partial(sinkhorn.released_plan, epsilon=self.epsilon, iters=self.iters)
      if self.mask:
        valid = query_mask[:, :, None] & source_mask[:, None, :]
        plan = jax.vmap(lambda c, a, b, v: solve(c, a, b, valid=v))(cost, a, b, valid)
      else:
        plan = jax.vmap(solve)(cost, a, b)
      moved = jnp.einsum("bnm,bmd->bnd", plan, y)
    out = jnp.where(query_mask[..., None], (x + w.astype(f32) * moved).astype(query.dtype),
                    query)
    return out, _sow_and_diag(self, plan, a, b, query_mask, source_mask, w)


def paper_fields(cfg, dim, name):
  """OTPaper's fields from config.model.mot: what ot_paper and the variants that share its
  parameters (uniform, skip, detached, fgw) read."""
  solver = config_lib.choice(cfg, "solver", SOLVERS)
  diff = config_lib.choice(cfg, "diff", DIFFS)
  if solver == "jax" and diff == "implicit":
    raise ValueError(f"{FIELD}.diff='implicit' needs {FIELD}.solver='ott' "
                     f"(the plain-JAX solver is differentiated by unrolling)")
  return dict(
      dim=dim,
      epsilon=config_lib.number(cfg, "epsilon", lo=0.0, lo_open=True),
      iters=config_lib.number(cfg, "iters", lo=1, integer=True),
      cost=config_lib.choice(cfg, "cost", sinkhorn.COSTS),
      diff=diff,
      solver=solver,
      tau_a=config_lib.number(cfg, "tau_a", lo=0.0, hi=1.0, lo_open=True),
      tau_b=config_lib.number(cfg, "tau_b", lo=0.0, hi=1.0, lo_open=True),
      eps_init=config_lib.number(cfg, "eps_init", lo=1.0),
      eps_decay=config_lib.number(cfg, "eps_decay", lo=0.0, hi=1.0, lo_open=True),
      alpha_init=config_lib.number(cfg, "alpha_init", lo=0.0, hi=1.0, lo_open=True, hi_open=True),
      mask=config_lib.flag(cfg, "mask"),
      name=name)


def build_paper(cfg, dim, name):
  """ot_paper. The values (and why: epsilon 0.1, unrolled differentiation, ...) are in
  configs/common.py:model_config."""
  return OTPaper(**paper_fields(cfg, dim, name))


def build_reference(cfg, dim, name):
  """ot_reference. With semantics="reference" the config holds the released constants
  (epsilon 0.5, iters 50, residual_init 1.0, no masks)."""
  return OTReference(
      dim=dim,
      epsilon=config_lib.number(cfg, "epsilon", lo=0.0, lo_open=True),
      iters=config_lib.number(cfg, "iters", lo=1, integer=True),
      mask=config_lib.flag(cfg, "mask"),
      residual_init=config_lib.number(cfg, "residual_init"),
      name=name)
