"""Issue 34's fusion controls and ott-jax variants (uniform, skip, detached, fgw, sdiv),
each against a direct computation: the uniform plan, the same-position mean, a constant
plan's gradient, ott-jax's own FGW solve and Sinkhorn divergence on the valid points; the
new plan diagnostics; one micro-model step for the aux loss.

Block-level on tiny inputs (B=2, n=4 query tokens, m=8 = two source levels, D=8), so a
compile is a fraction of a second except ott's FGW (a few seconds).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ott.geometry import geometry
from ott.problems.quadratic import quadratic_problem
from ott.solvers.linear import sinkhorn as ott_sinkhorn
from ott.solvers.quadratic import gromov_wasserstein
from ott.tools import sinkhorn_divergence

from bench import ot_probe
from configs import common
from remote_jax.models import remote
from remote_jax.models.fusion import FUSIONS, make_fusion, sinkhorn
from tests.conftest import C, jit, make_batch, micro_config, random_params

B, N, LEVELS, D = 2, 4, 2, 8
M = N * LEVELS
NEW = ("uniform", "skip", "detached", "fgw", "sdiv")


def mot_config(variant, **overrides):
  return dict(common.model_config("tiny").mot, variant=variant, iters=10, **overrides)


def inputs(seed=0):
  """Query (B,n,D), source (B,m,D) on a shared rank-3 subspace (a spread of cosines);
  example 0 has a padded query token and a padded source position (in level 1)."""
  rng = np.random.default_rng(seed)
  basis = rng.normal(size=(3, D))
  q = rng.normal(size=(B, N, 3)) @ basis + 0.3 * rng.normal(size=(B, N, D))
  s = rng.normal(size=(B, M, 3)) @ basis + 0.3 * rng.normal(size=(B, M, D))
  qm = np.ones((B, N), bool)
  sm = np.ones((B, M), bool)
  qm[0, 3] = False
  sm[0, N + 1] = False
  w = rng.normal(size=(B, N, D))
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  return f32(q), jnp.asarray(qm), f32(s), jnp.asarray(sm), f32(w)


@functools.cache
def block(variant, **cfg):
  """(module, params with alpha away from 0.5, jitted fwd -> (out, diag, plan))."""
  blk = make_fusion(mot_config(variant, **cfg), D, "blk")
  q, qm, s, sm, _ = inputs()
  params = nn.meta.unbox(blk.init(jax.random.key(0), q, qm, s, sm))
  if "alpha_logit" in params.get("params", {}):
    logit = np.random.default_rng(3).normal(size=(D,))
    params = {"params": {"alpha_logit": jnp.asarray(logit, jnp.float32)}}

  @jax.jit
  def fwd(p, q, qm, s, sm):
    (out, diag), inter = blk.apply(p, q, qm, s, sm, mutable=["intermediates"])
    plan = inter.get("intermediates", {}).get("plan", (None,))[0]
    return out, diag, plan

  return blk, params, fwd


def input_grads(variant, w, **cfg):
  blk, params, _ = block(variant, **cfg)
  q, qm, s, sm, _ = inputs()
  loss = lambda q, s: jnp.sum(blk.apply(params, q, qm, s, sm)[0] * w)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(q, s)


def alpha_of(params):
  return np.asarray(jax.nn.sigmoid(params["params"]["alpha_logit"]))


def test_registry_and_shared_parameters():
  assert set(NEW) <= set(FUSIONS)
  ref = jax.tree.map(jnp.shape, block("ot_paper")[1])
  for variant in ("uniform", "skip", "detached", "fgw"):   # an ot_paper checkpoint loads
    assert jax.tree.map(jnp.shape, block(variant)[1]) == ref, variant
  assert block("sdiv")[1] == {}


def test_uniform_plan_and_output():
  _, params, fwd = block("uniform")
  q, qm, s, sm, _ = inputs()
  out, diag, plan = fwd(params, q, qm, s, sm)
  alpha = alpha_of(params)
  for i in range(B):
    a = np.asarray(qm[i]) / np.sum(qm[i])
    b = np.asarray(sm[i]) / np.sum(sm[i])
    np.testing.assert_allclose(plan[i], np.outer(a, b), atol=1e-7)
    mean = np.asarray(s[i])[np.asarray(sm[i])].mean(0)
    want = alpha * np.asarray(q[i]) + (1 - alpha) * mean
    valid = np.asarray(qm[i])
    np.testing.assert_allclose(out[i][valid], want[valid], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[i][~valid], q[i][~valid])
  # The new diagnostics at their uniform values.
  assert abs(float(diag["row_entropy"]) - 1.0) < 1e-5
  assert float(diag["uniform_tv"]) < 1e-6
  # Uniform rows put (valid sources at the row's position) / m_valid on that position.
  rows = [[np.sum(sm[i][np.arange(M) % N == r]) / np.sum(sm[i]) for r in range(N) if qm[i][r]]
          for i in range(B)]
  want_same = np.mean([np.mean(r) for r in rows])
  np.testing.assert_allclose(float(diag["same_position_mass"]), want_same, rtol=1e-5)


def test_skip_is_the_same_position_mean():
  _, params, fwd = block("skip")
  q, qm, s, sm, _ = inputs()
  out, diag, _ = fwd(params, q, qm, s, sm)
  alpha = alpha_of(params)
  levels = np.asarray(s).reshape(B, LEVELS, N, D)
  lmask = np.asarray(sm).reshape(B, LEVELS, N)[..., None]
  mean = (levels * lmask).sum(1) / lmask.sum(1)            # over the valid levels
  want = np.where(np.asarray(qm)[..., None], alpha * np.asarray(q) + (1 - alpha) * mean,
                  np.asarray(q))
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  assert abs(float(diag["same_position_mass"]) - 1.0) < 1e-6


def test_skip_needs_whole_levels():
  blk = make_fusion(mot_config("skip"), D, "blk")
  q, qm, s, sm, _ = inputs()
  with pytest.raises(ValueError, match="whole levels"):
    blk.apply(block("skip")[1], q, qm, s[:, :M - 1], sm[:, :M - 1])


def test_detached_forward_equals_ot_paper_and_grads_a_constant_plans():
  _, params, fwd = block("ot_paper")
  q, qm, s, sm, w = inputs()
  out_p, _, plan = fwd(params, q, qm, s, sm)
  out_d, _, plan_d = block("detached")[2](params, q, qm, s, sm)
  np.testing.assert_array_equal(out_d, out_p)
  np.testing.assert_array_equal(plan_d, plan)

  alpha = jnp.asarray(alpha_of(params))
  row_ok = np.asarray(qm) & (np.asarray(plan).sum(-1) > 0)

  def constant_plan(q, s):   # ot_paper's arithmetic with the plan as a constant
    x = jnp.where(qm[..., None], q, 0.0)
    y = jnp.where(sm[..., None], s, 0.0)
    moved = jnp.einsum("bnm,bmd->bnd", plan, y) / jnp.maximum(plan.sum(-1, keepdims=True),
                                                               1e-30)
    out = jnp.where(row_ok[..., None], alpha * x + (1 - alpha) * moved, q)
    return jnp.sum(out * w)

  want = jax.grad(constant_plan, argnums=(0, 1))(q, s)
  got = input_grads("detached", w)
  full = input_grads("ot_paper", w)
  for g, h, f in zip(got, want, full):
    np.testing.assert_allclose(g, h, rtol=1e-4, atol=1e-6)
    # ot_paper's gradient has a through-the-plan part, so the two differ.
    assert np.abs(np.asarray(f) - np.asarray(g)).max() > 1e-3 * np.abs(np.asarray(f)).max()


def direct_fgw(x, y, penalty, epsilon, iters, outer):
  """ott-jax's FGW on the valid points alone (uniform weights), unrolled inner solver."""
  geom = lambda u, v: geometry.Geometry(cost_matrix=sinkhorn.cost_matrix(u, v, "cosine"))
  prob = quadratic_problem.QuadraticProblem(geom(x, x), geom(y, y), geom(x, y),
                                            fused_penalty=penalty)
  linear = ott_sinkhorn.Sinkhorn(min_iterations=iters - 1, max_iterations=iters,
                                 threshold=-1.0, inner_iterations=2, implicit_diff=None)
  solver = gromov_wasserstein.GromovWasserstein(linear, epsilon=epsilon, min_iterations=outer,
                                                max_iterations=outer)
  return solver(prob).matrix


def test_fgw_plan_and_gradient_match_a_direct_ott_solve():
  from remote_jax.models.fusion import fgw, ot
  _, params, fwd = block("fgw", fused_penalty=0.5, outer_iters=2)
  q, qm, s, sm, _ = inputs()
  _, diag, plan = fwd(params, q, qm, s, sm)
  i = 0                                                     # the padded example
  mq, ms = np.asarray(qm[i]), np.asarray(sm[i])
  x, y = q[i][mq], s[i][ms]
  pw = jnp.asarray(np.random.default_rng(1).normal(size=(x.shape[0], y.shape[0])), jnp.float32)

  @jax.jit
  def direct(x, y):   # plan and the gradient of <plan, pw>, on the valid points alone
    p, vjp = jax.vjp(lambda x, y: direct_fgw(x, y, 0.5, 0.1, 10, 2), x, y)
    return p, vjp(pw)

  @jax.jit
  def padded(q, s):   # the block's arithmetic on the padded example
    p, vjp = jax.vjp(lambda q, s: fgw.fgw_plan(
        ot.masked(q, mq, 1.0), ot.masked(s, ms, 1.0), ot.weights(mq), ot.weights(ms),
        cost="cosine", epsilon=0.1, iters=10, outer_iters=2, fused_penalty=0.5), q, s)
    return p, vjp(jnp.zeros((N, M)).at[np.ix_(mq, ms)].set(pw))

  want, (hx, hy) = direct(x, y)
  np.testing.assert_allclose(np.asarray(plan[i])[np.ix_(mq, ms)], want, rtol=1e-4, atol=1e-7)
  assert float(diag["uniform_tv"]) > 0.05                   # a real plan, not uniform
  got, (gq, gs) = padded(q[i], s[i])
  np.testing.assert_allclose(np.asarray(got)[np.ix_(mq, ms)], want, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(np.asarray(gq)[mq], hx, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gs)[ms], hy, rtol=1e-3, atol=1e-5)
  assert np.all(np.asarray(gq)[~mq] == 0) and np.abs(np.asarray(hx)).max() > 0


def test_fgw_is_balanced_only():
  with pytest.raises(ValueError, match="model.mot.tau_a/tau_b"):
    make_fusion(mot_config("fgw", tau_a=0.5), D, "blk")


def test_sdiv_matches_ott_and_has_gradient_into_both_sides():
  blk, params, fwd = block("sdiv", loss_weight=0.3)
  q, qm, s, sm, _ = inputs()
  out, diag, _ = fwd(params, q, qm, s, sm)
  np.testing.assert_array_equal(out, q)                     # fuses nothing
  kw = {"min_iterations": 9, "max_iterations": 10, "threshold": -1.0, "inner_iterations": 2,
        "implicit_diff": None}
  direct = jax.jit(lambda x, y: sinkhorn_divergence.sinkdiv(
      x, y, cost_fn=sinkhorn.COSTS["cosine"](), epsilon=0.1, solve_kwargs=kw)[0])
  want = np.mean([float(direct(q[i][qm[i]], s[i][sm[i]])) for i in range(B)])
  np.testing.assert_allclose(float(diag["sinkhorn_divergence"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(diag["aux_loss"]), 0.3 * want, rtol=1e-4)
  loss = lambda q, s: blk.apply(params, q, qm, s, sm)[1]["aux_loss"]
  gq, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, s)
  for g, mask in ((gq, qm), (gs, sm)):
    g, mask = np.asarray(g), np.asarray(mask)
    assert np.all(np.isfinite(g)) and np.abs(g[mask]).max() > 0
    assert np.all(g[~mask] == 0)
  assert block("sdiv", loss_weight=0.0)[2]({}, q, qm, s, sm)[1] == {}   # 0 = off


def test_micro_model_sdiv_aux_loss_reaches_the_encoders():
  """One micro-model step: sdiv's loss joins aux_loss and its gradient reaches both
  towers (the model sums diag["aux_loss"] over levels and modalities)."""
  cfg = micro_config(**{"mot.variant": "sdiv", "moe.variant": "off", "mot.levels": "1",
                        "mot.iters": 2})
  batch = make_batch()
  model = remote.build(cfg, C, 2100)
  params = random_params(model, batch, std=0.02)

  @jit
  def step(p):
    def aux_loss(p):
      _, aux = model.apply({"params": p}, batch, deterministic=True)
      return aux["aux_loss"], aux["ot"]
    return jax.value_and_grad(aux_loss, has_aux=True)(p)

  (value, ot), grads = step(params)
  parts = [float(ot[k]["sinkhorn_divergence"]) for k in ("text_1", "vision_1")]
  np.testing.assert_allclose(float(value), cfg.mot.loss_weight * sum(parts), rtol=1e-5)
  assert all("aux_loss" not in d for d in ot.values())
  for tower in ("text", "vision"):
    norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads[tower]))
    assert np.isfinite(norm) and norm > 0, tower


def test_probe_switches():
  """bench/ot_probe.py: alpha = 1 returns the query; the gradient share is the relative
  distance of the detached gradient, per encoder and child module."""
  _, params, fwd = block("ot_paper")
  q, qm, s, sm, _ = inputs()
  out, _, _ = fwd(ot_probe.alpha_one(params), q, qm, s, sm)
  np.testing.assert_array_equal(out, q)
  full = {"text": {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}, "vision": {"c": jnp.ones(1)}}
  det = {"text": {"a": jnp.array([3.0, 0.0]), "b": jnp.array([0.0])}, "vision": {"c": jnp.ones(1)}}
  assert ot_probe.per_level({"text_1/a": 1.0, "text_1/b": 2.0, "vision_2/a": 3.0}) == {
      "text_1": {"a": 1.0, "b": 2.0}, "vision_2": {"a": 3.0}}
  assert ot_probe.grad_share(full, det) == {"text": 0.8, "text/a": 0.8, "text/b": 0.0,
                                            "vision": 0.0, "vision/c": 0.0}


def test_plan_stats_on_a_hand_made_plan():
  # n=2 query tokens, m=4 source tokens (two levels); row 0 all on its own position in
  # level 0; row 1 split over positions 1 and 3 (both its position) and 2 (not).
  plan = jnp.array([[0.5, 0.0, 0.0, 0.0], [0.0, 0.25, 0.125, 0.125]])
  a, b = jnp.full(2, 0.5), jnp.full(4, 0.25)
  valid_r, valid_c = jnp.ones(2, bool), jnp.ones(4, bool)
  st = sinkhorn.plan_stats(plan, a, b, valid_r, valid_c)
  np.testing.assert_allclose(st["same_position_mass"], (1.0 + 0.75) / 2, rtol=1e-6)
  h1 = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)) / np.log(4)
  np.testing.assert_allclose(st["row_entropy"], (0.0 + h1) / 2, rtol=1e-6)
  np.testing.assert_allclose(st["uniform_tv"], 0.5 * np.sum(np.abs(np.asarray(plan) - 1 / 8)),
                             rtol=1e-6)
  assert "same_position_mass" not in sinkhorn.plan_stats(plan[:, :3], a, b[:3], valid_r,
                                                         valid_c[:3])
