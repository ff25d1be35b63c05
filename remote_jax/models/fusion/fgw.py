"""`fgw`: fused Gromov-Wasserstein fusion through ott-jax; barycentre and gate as ot_paper.

The plan solves entropic FGW (ott's QuadraticProblem, square loss): it matches the
structure within each side (query-query costs against source-source costs) plus
`fused_penalty` times the query-source cost, so the two sides' costs need not be
comparable. Costs are `model.mot.cost` on each pair of token sets; `epsilon` is the
entropic weight of every linearised problem, `iters` its Sinkhorn iterations (unrolled, as
ot_paper's), `outer_iters` the GW linearisations. Balanced only (tau_a = tau_b = 1).

The plan's gradient (ott-jax 0.6.0, read in solvers/quadratic/gromov_wasserstein.py and
math/fixed_point_loop.py; checked against central differences, docs/ot_variants.md): ott stops gradients only in what
it recomputes after the loop (the final linearisation, used for `reg_gw_cost`) and in the
previous transport mass (the unbalanced rescaling); the returned `matrix` is the last inner
Sinkhorn's plan on the last linearisation, and that linearisation depends on the previous
plan without a stop. With min_iterations == max_iterations (as here) the outer loop is a
`lax.scan`, so the plan gets the exact gradient of the whole unrolled computation: every
outer linearisation and every inner Sinkhorn iteration. (With min < max the outer loop is a
while loop and reverse-mode differentiation raises, so no other setting is offered.)
"""
import functools

from ott.geometry import geometry
from ott.problems.quadratic import quadratic_problem
from ott.solvers.linear import sinkhorn as ott_sinkhorn
from ott.solvers.quadratic import gromov_wasserstein

from remote_jax import config as config_lib
from remote_jax.models.fusion import ot, sinkhorn
from remote_jax.models.fusion.none import FIELD


def fgw_plan(x, y, a, b, *, cost, epsilon, iters, outer_iters, fused_penalty):
  """Entropic fused GW plan between x (n,d) and y (m,d), weights a (n,), b (m,)."""
  geom = lambda u, v: geometry.Geometry(cost_matrix=sinkhorn.cost_matrix(u, v, cost))
  prob = quadratic_problem.QuadraticProblem(geom(x, x), geom(y, y), geom(x, y),
                                            fused_penalty=fused_penalty, a=a, b=b)
  # The linear solver as ot_paper's unrolled one (sinkhorn.ott_plan says why min < max).
  linear = ott_sinkhorn.Sinkhorn(min_iterations=iters - 1, max_iterations=iters, threshold=-1.0,
                                 inner_iterations=sinkhorn.unrolled_block(iters),
                                 implicit_diff=None)
  solver = gromov_wasserstein.GromovWasserstein(
      linear, epsilon=epsilon, min_iterations=outer_iters, max_iterations=outer_iters)
  return solver(prob).matrix


class FusedGW(ot.OTPaper):
  # Defaults only because fields after OTPaper's defaulted param_dtype need one;
  # `build` always sets them from the config.
  fused_penalty: float = 1.0
  outer_iters: int = 5

  def plan(self, x, y, query_mask, source_mask):
    fn = functools.partial(fgw_plan, cost=self.cost, epsilon=self.epsilon, iters=self.iters,
                           outer_iters=self.outer_iters, fused_penalty=self.fused_penalty)
    return ot.masked_plan(fn, x, y, query_mask, source_mask)


def build(cfg, dim, name):
  """fgw: ot_paper's fields plus fused_penalty and outer_iters (configs/common.py)."""
  fields = ot.paper_fields(cfg, dim, name)
  if fields["tau_a"] != 1.0 or fields["tau_b"] != 1.0:
    raise ValueError(f"{FIELD}.tau_a/tau_b: fgw is balanced; set both to 1.0")
  return FusedGW(
      **fields,
      fused_penalty=config_lib.number(cfg, "fused_penalty", lo=0.0),
      outer_iters=config_lib.number(cfg, "outer_iters", lo=1, integer=True))
