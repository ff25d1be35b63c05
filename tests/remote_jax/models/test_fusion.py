"""Fusion blocks (remote_jax/models/fusion): parity with independent NumPy
transcriptions, masking, batching, gradients, the released plan's degeneracy,
the registry and config errors.

Compiles are the cost here (an ott Sinkhorn gradient takes ~10 s to compile on
2 cores), so every test shares one shape (B=2, n=12, m=96, D=768) and the
jitted functions are cached per block config.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from remote_jax.models.fusion import FUSIONS, make_fusion

B, N, M, D = 2, 12, 96, 768
N_VALID, M_VALID = (9, N), (70, M)     # example 0 padded, example 1 full


# ----------------------------------------------------------------- inputs


def _features(seed, rank=8, noise=0.3, shape=(B, N, M, D)):
  """Query (B,n,D), source (B,m,D) on a shared rank-`rank` subspace + noise:
  a wide spread of cosines, unlike isotropic 768-d noise."""
  rng = np.random.default_rng(seed)
  b, n, m, d = shape
  basis = rng.normal(size=(rank, d))
  q = rng.normal(size=(b, n, rank)) @ basis + noise * np.sqrt(rank) * rng.normal(size=(b, n, d))
  s = rng.normal(size=(b, m, rank)) @ basis + noise * np.sqrt(rank) * rng.normal(size=(b, m, d))
  return q.astype(np.float32), s.astype(np.float32)


def _masks(n_valid=N_VALID, m_valid=M_VALID):
  qm = np.arange(N)[None] < np.asarray(n_valid)[:, None]
  sm = np.arange(M)[None] < np.asarray(m_valid)[:, None]
  return qm, sm


def mot_config(variant, **overrides):
  """config.model.mot (BERT-base size) of the semantics `variant` belongs to."""
  semantics = "reference" if variant == "ot_reference" else "paper"
  return dict(common.model_config("base", semantics).mot, variant=variant, **overrides)


@functools.cache
def _block(variant, dim=D, **cfg):
  """(module, params, jitted forward, jitted grad) for one config."""
  blk = make_fusion(mot_config(variant, **cfg), dim, "blk")
  args = (jnp.zeros((B, N, dim)), jnp.ones((B, N), bool), jnp.zeros((B, M, dim)),
          jnp.ones((B, M), bool))
  params = nn.meta.unbox(jax.jit(blk.init)(jax.random.key(0), *args))

  def fwd(p, q, qm, s, sm):
    (out, diag), inter = blk.apply(p, q, qm, s, sm, mutable=["intermediates"])
    plan = inter.get("intermediates", {}).get("plan", (None,))[0]
    return out, diag, plan

  def loss(p, q, s, qm, sm, w):
    return jnp.sum(blk.apply(p, q, qm, s, sm)[0] * w)

  return blk, params, jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def _grad_weights(dim=D):
  return np.random.default_rng(99).normal(size=(B, N, dim)).astype(np.float32)


def _with_alpha(params, seed=5):
  """Random alpha logits, so the gate is tested away from 0.5."""
  logit = np.random.default_rng(seed).normal(size=params["params"]["alpha_logit"].shape)
  return {"params": {"alpha_logit": jnp.asarray(logit, jnp.float32)}}


# ------------------------------------------------------- NumPy references


def _np_cost(x, y, cost):
  if cost == "cosine":   # ott's Cosine: ridge 1e-8 in the denominator
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    return 1.0 - (x @ y.T) / (nx[:, None] * ny[None, :] + 1e-8)
  sq = np.sum((x[:, None, :] - y[None, :, :]) ** 2, -1)
  return sq if cost == "sqeuclidean" else np.sqrt(sq)


def _np_lse(z, axis):
  top = np.max(z, axis=axis, keepdims=True)
  return np.log(np.sum(np.exp(z - top), axis=axis)) + np.squeeze(top, axis)


def np_log_sinkhorn(x, y, eps, iters, cost="cosine", tau_a=1.0, tau_b=1.0,
                    eps_init=1.0, eps_decay=1.0):
  """Entropic OT between the valid points x (n,d), y (m,d), uniform weights,
  float64. Potentials from 0; each iteration t updates g then f at
  eps_t = eps * max(eps_init * eps_decay**t, 1); plan exp((f+g-C)/eps)."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  c = _np_cost(x, y, cost)
  n, m = c.shape
  f, g = np.zeros(n), np.zeros(m)
  for t in range(iters):
    e = eps * max(eps_init * eps_decay ** t, 1.0)
    g = tau_b * (e * np.log(1.0 / m) - e * _np_lse((f[:, None] - c) / e, 0))
    f = tau_a * (e * np.log(1.0 / n) - e * _np_lse((g[None, :] - c) / e, 1))
  return np.exp((f[:, None] + g[None, :] - c) / eps)


def np_paper_block(q, s, qm, sm, alpha_logit, **kw):
  """ot_paper on each example's valid points: (out, plans padded to (n,m))."""
  alpha = 1.0 / (1.0 + np.exp(-alpha_logit.astype(np.float64)))
  out, plans = q.astype(np.float64).copy(), []
  for i in range(q.shape[0]):
    x, y = q[i][qm[i]], s[i][sm[i]]
    p = np_log_sinkhorn(x, y, **kw)
    moved = (p @ y) / p.sum(1, keepdims=True)
    out[i][qm[i]] = alpha * x + (1 - alpha) * moved
    full = np.zeros(qm.shape[1:] + sm.shape[1:])
    full[np.ix_(qm[i], sm[i])] = p
    plans.append(full)
  return out, np.stack(plans)


def _np_layer_norm(h, scale, bias, eps=1e-5):
  mu = h.mean(-1, keepdims=True)
  var = ((h - mu) ** 2).mean(-1, keepdims=True)
  return (h - mu) / np.sqrt(var + eps) * scale + bias


def np_released_block(q, s, p, eps=0.5, iters=50):
  """Transcription of the released OptimalTransportCrossAttention + residual
  (no masks), float64, per example."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p["params"])
  proj = lambda h, side: _np_layer_norm(
      h @ p[f"{side}_proj"]["kernel"] + p[f"{side}_proj"]["bias"],
      p[f"{side}_norm"]["scale"], p[f"{side}_norm"]["bias"])
  outs, plans = [], []
  for x, y in zip(q.astype(np.float64), s.astype(np.float64)):
    qq, kk = proj(x, "q"), proj(y, "k")
    c = np.linalg.norm(qq[:, None, :] - kk[None, :, :], axis=-1)   # torch.cdist
    k = np.exp(-c / eps) + 1e-12
    n, m = c.shape
    u, v = np.ones(n), np.ones(m)
    for _ in range(iters):
      u = (1.0 / n) / np.maximum(k @ v, 1e-8)
      v = (1.0 / m) / np.maximum(k.T @ u, 1e-8)
    plan = u[:, None] * k * v[None, :]
    plans.append(plan)
    outs.append(x + p["w"] * (plan @ y))
  return np.stack(outs), np.stack(plans)


def _rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


# ------------------------------------------------------------- ot_paper


# jax at epsilon 0.1 runs the kernel-domain solver, at 0.05 the log-domain one.
@pytest.mark.parametrize("solver,epsilon", [("ott", 0.1), ("jax", 0.1), ("jax", 0.05)])
def test_ot_paper_matches_numpy_with_masks(solver, epsilon):
  _, params, fwd, _ = _block("ot_paper", solver=solver, epsilon=epsilon)
  params = _with_alpha(params)
  q, s = _features(0)
  qm, sm = _masks()
  out, diag, plan = fwd(params, q, qm, s, sm)
  want_out, want_plan = np_paper_block(q, s, qm, sm, np.asarray(params["params"]["alpha_logit"]),
                                       eps=epsilon, iters=50)
  nm = np.asarray([n * m for n, m in zip(N_VALID, M_VALID)])[:, None, None]
  tol = 1e-5 * 0.1 / epsilon   # float32 rounding grows with cost / epsilon
  # Relative to the largest entry of the scaled plan (about 12 here): the last
  # bits after 50 iterations differ between CPUs' kernels (AVX2 vs AVX-512).
  scaled = want_plan * nm
  assert float(np.max(np.abs(np.asarray(plan) * nm - scaled)) / np.max(scaled)) < tol
  assert _rel(out, want_out) < tol
  # masked rows come back untouched; padding has exactly zero mass
  assert np.array_equal(np.asarray(out)[~qm], q[~qm])
  plan = np.asarray(plan, np.float64)
  assert np.all(plan[~qm] == 0) and np.all(plan.transpose(0, 2, 1)[~sm] == 0)
  for i in range(B):   # marginals on valid points
    np.testing.assert_allclose(plan[i].sum(1)[qm[i]], 1.0 / N_VALID[i], rtol=1e-5)
    np.testing.assert_allclose(plan[i].sum(0)[sm[i]], 1.0 / M_VALID[i], rtol=1e-4)
  assert float(diag["marginal_error"]) < 1e-5
  assert 0.0 < float(diag["plan_entropy"]) < 1.0
  assert float(diag["gate_mean"]) == pytest.approx(
      float(jax.nn.sigmoid(params["params"]["alpha_logit"]).mean()), rel=1e-6)


def test_ot_paper_research_variants_match_numpy():
  """Unbalanced, epsilon schedule and a non-cosine cost: config only."""
  # iters 13: prime, so ott's unrolled loop runs one 13-step block
  cfg = {"cost": "sqeuclidean", "epsilon": 2.0, "tau_a": 0.9, "tau_b": 0.8, "eps_init": 20.0,
         "eps_decay": 0.7, "iters": 13}
  _, params, fwd, grad = _block("ot_paper", **cfg)
  q, s = _features(1, noise=0.05)
  q, s = q / 10, s / 10   # squared distances of order 1-10
  qm, sm = _masks()
  out, _, plan = fwd(params, q, qm, s, sm)
  want_out, want_plan = np_paper_block(q, s, qm, sm, np.zeros(D), eps=2.0, iters=13,
                                       cost="sqeuclidean", tau_a=0.9, tau_b=0.8,
                                       eps_init=20.0, eps_decay=0.7)
  assert _rel(plan, want_plan) < 1e-5
  assert _rel(out, want_out) < 1e-5
  # unbalanced + padding: ott NaNs on exact zero weights there (sinkhorn.PAD_WEIGHT)
  _, gq, gs = grad(params, q, s, qm, sm, _grad_weights())
  assert np.all(np.isfinite(gq)) and np.all(np.isfinite(gs)) and np.all(np.asarray(gs)[~sm] == 0)


def test_ot_paper_batched_equals_loop():
  """Each example alone (tiled to the batch shape, so no recompile) gives what
  it gets inside the batch: the vmapped solve keeps examples independent."""
  _, params, fwd, _ = _block("ot_paper")
  q, s = _features(2)
  qm, sm = _masks()
  out, _, plan = fwd(params, q, qm, s, sm)
  for i in range(B):
    o, _, p = fwd(params, *(np.repeat(a[i:i + 1], B, axis=0) for a in (q, qm, s, sm)))
    for j in range(B):
      np.testing.assert_allclose(o[j], out[i], atol=1e-6)
      np.testing.assert_allclose(p[j], plan[i], atol=1e-9)


def _low_rank(seed):
  """Rank-2 features: many near-duplicate directions, a hard case for OT grads."""
  q, s = _features(seed, rank=2, noise=0.0)
  return q, s


def test_ot_paper_grads_finite_low_rank_padded():
  _, params, _, grad = _block("ot_paper")
  q, s = _low_rank(3)
  qm, sm = _masks()
  w = _grad_weights()
  gp, gq, gs = jax.tree.map(np.asarray, grad(params, q, s, qm, sm, w))
  for g in (gp["params"]["alpha_logit"], gq, gs):
    assert np.all(np.isfinite(g))
  assert np.all(gs[~sm] == 0)                    # padded sources: no gradient
  np.testing.assert_array_equal(gq[~qm], w[~qm])  # padded rows pass through
  assert np.abs(gq[qm]).max() > 0 and np.abs(gs[sm]).max() > 0
  # ott's unrolled gradient equals plain autodiff through the same iterations
  # (~1e-6 apart); ott 0.6.0's backward for min_iterations == max_iterations
  # would be 1-60% off here.
  _, _, _, grad_jax = _block("ot_paper", solver="jax")
  gj = grad_jax(params, q, s, qm, sm, w)
  for a, b in zip(jax.tree.leaves(gj), jax.tree.leaves((gp, gq, gs))):
    assert _rel(a, b) < 1e-4


@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_kernel_sinkhorn_equals_log_domain_and_its_gradient(tau):
  """The scaling-domain solver (hand-written VJP) against the log-domain loop
  differentiated by autodiff: plan, and gradients w.r.t. cost and both
  weight vectors, with padded points (zero weights) on both sides."""
  from remote_jax.models.fusion import sinkhorn
  rng = np.random.default_rng(3)
  q, s = _features(6, shape=(1, 10, 14, 16))
  cost = sinkhorn.cost_matrix(jnp.asarray(q[0]), jnp.asarray(s[0]), "cosine")
  a = jnp.asarray(np.r_[np.full(8, 1 / 8), 0, 0], jnp.float32)
  b = jnp.asarray(np.r_[np.full(11, 1 / 11), 0, 0, 0], jnp.float32)
  w = jnp.asarray(rng.normal(size=cost.shape), jnp.float32)
  kw = dict(epsilon=0.1, iters=30, tau_a=tau, tau_b=tau)
  assert sinkhorn.kernel_domain_ok("cosine", 0.1)

  def loss(solve):
    return lambda c, a, b: jnp.sum(solve(c, a, b, **kw) * w)

  plan_k = sinkhorn.kernel_sinkhorn(cost, a, b, **kw)
  plan_l = sinkhorn.log_sinkhorn(cost, a, b, **kw)
  assert float(jnp.max(jnp.abs(plan_k - plan_l))) < 1e-6 * float(jnp.max(plan_l)) * 10
  assert np.all(np.asarray(plan_k)[8:] == 0) and np.all(np.asarray(plan_k)[:, 11:] == 0)
  g_k = jax.grad(loss(sinkhorn.kernel_sinkhorn), argnums=(0, 1, 2))(cost, a, b)
  g_l = jax.grad(loss(sinkhorn.log_sinkhorn), argnums=(0, 1, 2))(cost, a, b)
  for got, want in zip(g_k, g_l):
    assert np.all(np.isfinite(got)) and _rel(got, want) < 1e-4


def test_kernel_domain_only_where_safe():
  from remote_jax.models.fusion import sinkhorn
  assert sinkhorn.kernel_domain_ok("cosine", 0.1)
  assert not sinkhorn.kernel_domain_ok("cosine", 0.05)          # exp(-40): too close to underflow
  assert not sinkhorn.kernel_domain_ok("sqeuclidean", 1.0)      # unbounded cost
  assert not sinkhorn.kernel_domain_ok("cosine", 0.1, eps_init=10.0, eps_decay=0.9)


def test_ot_paper_implicit_matches_unrolled():
  """Well conditioned (full-rank features, converged at 50 iterations), with
  padding: the two differentiation modes agree. (On other padded inputs ott's
  lineax solve can raise at run time; see sinkhorn.ott_plan. Not claimed.)"""
  w = _grad_weights()
  qm, sm = _masks()
  q, s = _features(4, rank=D, noise=0.0)
  _, params, _, unrolled = _block("ot_paper")
  _, _, _, implicit = _block("ot_paper", diff="implicit")
  params = _with_alpha(params)
  gu = unrolled(params, q, s, qm, sm, w)
  gi = implicit(params, q, s, qm, sm, w)
  for a, b in zip(jax.tree.leaves(gi), jax.tree.leaves(gu)):
    assert _rel(a, b) < 1e-3


# --------------------------------------------------------- ot_reference


def test_ot_reference_matches_released_loop():
  """Small width (16), where distances ~6 keep K above the 1e-12 floor."""
  dim = 16
  _, params, fwd, _ = _block("ot_reference", dim=dim)
  params = {"params": dict(params["params"], w=jnp.float32(0.7))}
  q, s = _features(6, rank=4, shape=(B, N, M, dim))
  ones_q, ones_s = np.ones((B, N), bool), np.ones((B, M), bool)
  out, diag, plan = fwd(params, q, ones_q, s, ones_s)
  want_out, want_plan = np_released_block(q, s, params)
  assert _rel(plan, want_plan) < 1e-5
  assert _rel(out, want_out) < 1e-5
  assert float(diag["uniform_deviation"]) > 1.0   # not floored at this width
  # no masks in the release: padding flags change nothing
  qm, sm = _masks()
  out2, _, _ = fwd(params, q, qm, s, sm)
  np.testing.assert_array_equal(out2, out)


def test_reference_plan_is_uniform_but_paper_plan_is_not():
  """LayerNorm'd 768-d projections at torch init: every distance is ~39, the
  kernel is its 1e-12 floor and the plan is exactly a*b^T (mean pooling). ot_paper
  on the same inputs transports."""
  q, s = _features(7)
  ones_q, ones_s = np.ones((B, N), bool), np.ones((B, M), bool)
  _, params, fwd, _ = _block("ot_reference")
  out, diag, _ = fwd(params, q, ones_q, s, ones_s)
  assert float(diag["uniform_deviation"]) < 1e-6
  assert float(diag["plan_entropy"]) == pytest.approx(1.0, abs=1e-5)
  mean_src = s.astype(np.float64).mean(1, keepdims=True)
  np.testing.assert_allclose(out, q + mean_src / N, rtol=1e-5, atol=1e-5)
  _, paper_params, paper_fwd, _ = _block("ot_paper")
  _, paper_diag, _ = paper_fwd(paper_params, q, ones_q, s, ones_s)
  assert float(paper_diag["uniform_deviation"]) > 0.1
  assert float(paper_diag["plan_entropy"]) < 0.99


# ------------------------------------------------------ all entries


REGISTRY_CASES = [("ot_paper", {}), ("ot_reference", {}), ("xattn", {}), ("none", {})]


@pytest.mark.parametrize("variant,cfg", REGISTRY_CASES)
def test_registry_forward_backward(variant, cfg):
  assert set(FUSIONS) >= {"ot_paper", "ot_reference", "xattn", "none"}
  _, params, fwd, grad = _block(variant, **cfg)
  q, s = _features(8)
  qm, sm = _masks()
  out, diag, _ = fwd(params, q, qm, s, sm)
  assert out.shape == (B, N, D) and out.dtype == jnp.float32
  assert all(v.shape == () and v.dtype == jnp.float32 for v in diag.values())
  assert all(np.isfinite(float(v)) for v in diag.values())
  changed = not np.allclose(out, q)
  assert changed == (variant != "none")
  gp, gq, gs = grad(params, q, s, qm, sm, _grad_weights())
  for g in jax.tree.leaves((gp, gq, gs)):
    assert np.all(np.isfinite(np.asarray(g)))
  if variant != "none":
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(gp))


@pytest.mark.parametrize("variant,cfg", [("ot_paper", {}), ("xattn", {}),
                                         ("ot_reference", {"mask": True})])
def test_masked_source_points_change_nothing(variant, cfg):
  _, params, fwd, _ = _block(variant, **cfg)
  q, s = _features(9)
  qm, sm = _masks()
  out, diag, _ = fwd(params, q, qm, s, sm)
  s2 = s.copy()
  s2[0, M_VALID[0]:] = 1e4 * np.random.default_rng(0).normal(size=s2[0, M_VALID[0]:].shape)
  s2[0, -1] = np.nan
  q2 = q.copy()
  q2[0, N_VALID[0]:] = np.nan
  out2, diag2, _ = fwd(params, q2, qm, s2, sm)
  np.testing.assert_array_equal(np.asarray(out2)[qm], np.asarray(out)[qm])
  for k in diag:
    assert float(diag2[k]) == float(diag[k])


def test_xattn_heads_and_entropy():
  blk = make_fusion(mot_config("xattn"), D)
  assert blk.num_heads == 12   # the text encoder's, as nn.MultiheadAttention(768, 12)
  _, params, fwd, _ = _block("xattn")
  q, s = _features(10)
  qm, sm = _masks()
  _, diag, _ = fwd(params, q, qm, s, sm)
  assert 0.0 < float(diag["attention_entropy"]) <= 1.0
  assert float(diag["gate_mean"]) == 1.0


# ------------------------------------------------------------- errors


@pytest.mark.parametrize("cfg,field,allowed", [
    ({"variant": "bogus"}, "model.mot.variant", "ot_paper"),
    ({"variant": "ot_paper", "cost": "l1"}, "model.mot.cost", "sqeuclidean"),
    ({"variant": "ot_paper", "diff": "magic"}, "model.mot.diff", "implicit"),
    ({"variant": "ot_paper", "solver": "torch"}, "model.mot.solver", "ott"),
    ({"variant": "ot_paper", "solver": "jax", "diff": "implicit"}, "model.mot.diff", "ott"),
    ({"variant": "ot_paper", "epsilon": 0.0}, "model.mot.epsilon", "(0.0"),
    ({"variant": "ot_paper", "tau_a": 1.5}, "model.mot.tau_a", "1.0]"),
    ({"variant": "ot_paper", "eps_decay": 1.2}, "model.mot.eps_decay", "1.0]"),
    ({"variant": "ot_paper", "alpha_init": 1.0}, "model.mot.alpha_init", "1.0)"),
    ({"variant": "ot_reference", "iters": 2.5}, "model.mot.iters", "integer"),
    ({"variant": "ot_reference", "mask": "yes"}, "model.mot.mask", "True or False"),
    ({"variant": "xattn", "num_heads": 5}, "model.mot.num_heads", "divide"),
])
def test_bad_config_names_field_and_allowed(cfg, field, allowed):
  cfg = dict(cfg)
  with pytest.raises(ValueError) as err:
    make_fusion(mot_config(cfg.pop("variant"), **cfg), D)
  assert field in str(err.value) and allowed in str(err.value)


@pytest.mark.parametrize("variant,key", [("ot_paper", "epsilon"), ("ot_reference", "mask"),
                                         ("xattn", "num_heads")])
def test_blocks_take_every_value_from_the_config(variant, key):
  """No block falls back on a default of its own: the config is the one source."""
  cfg = mot_config(variant, epsilon=0.25, iters=7, mask=True, residual_init=0.5, num_heads=6)
  blk = make_fusion(cfg, D, "blk")
  for field in ("epsilon", "iters", "mask", "residual_init", "num_heads", "alpha_init"):
    if hasattr(blk, field):
      assert getattr(blk, field) == cfg[field], field
  del cfg[key]
  with pytest.raises(ValueError, match=rf"model\.mot\.{key} is not set"):
    make_fusion(cfg, D)


def test_bad_call_is_rejected():
  blk = make_fusion({"variant": "none"}, 8)
  q, s = np.zeros((2, 3, 8), np.float32), np.zeros((2, 4, 8), np.float32)
  ok_q, ok_s = np.ones((2, 3), bool), np.ones((2, 4), bool)
  with pytest.raises(ValueError, match="query_mask must be bool"):
    blk.apply({}, q, ok_q.astype(np.int32), s, ok_s)
  with pytest.raises(ValueError, match="width 8"):
    blk.apply({}, q, ok_q, np.zeros((2, 4, 6), np.float32), ok_s)
  out, diag = blk.apply({}, q, ok_q, s, ok_s)
  assert out is q and diag == {}
