"""`sdiv`: OT as a training loss instead of a fusion operator.

The block fuses nothing (its output is the query, as `none`) and returns the Sinkhorn
divergence (ott.tools.sinkhorn_divergence on the three cost matrices, `model.mot.cost`, `epsilon`, `iters`
unrolled) between the level's valid tokens and those of the levels below it, averaged over
the batch, as `diag["sinkhorn_divergence"]`, and `loss_weight` times it as
`diag["aux_loss"]`, which the model adds to its aux loss (summed over levels and
modalities; remote.py). loss_weight = 0 turns the loss off (the block is then `none`).
The divergence pulls each level's token distribution towards the lower levels'; its
gradient reaches both (the encoders).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from ott.geometry import geometry
from ott.tools import sinkhorn_divergence

from remote_jax import config as config_lib
from remote_jax.models.fusion import ot, sinkhorn
from remote_jax.models.fusion.none import batch_mean, prepare


def divergence(x, y, a, b, *, cost, epsilon, iters):
  """Sinkhorn divergence between x (n,d) with weights a and y (m,d) with weights b."""
  kw = {"min_iterations": iters - 1, "max_iterations": iters, "threshold": -1.0,
        "inner_iterations": sinkhorn.unrolled_block(iters), "implicit_diff": None}
  # Cost matrices materialised once, as sinkhorn.ott_plan does: on point clouds (sinkdiv)
  # ott's unrolled backward re-differentiates each pairwise cost in every loop block, which
  # made the demo's train step 1,204 ms against 2xx ms here (docs/benchmarks.md).
  costs = [sinkhorn.cost_matrix(u, v, cost) for u, v in ((x, y), (x, x), (y, y))]
  return sinkhorn_divergence.sinkhorn_divergence(
      geometry.Geometry, cost_matrix=costs, epsilon=epsilon, a=a, b=b, solve_kwargs=kw)[0]


class SinkhornDivergenceLoss(nn.Module):
  dim: int
  epsilon: float
  iters: int
  cost: str
  loss_weight: float
  mask: bool

  def __call__(self, query, query_mask, source, source_mask, deterministic=True):
    x, query_mask, y, source_mask = prepare(self, query, query_mask, source, source_mask)
    if self.loss_weight == 0.0 or self.is_initializing():
      return query, {}
    fn = functools.partial(divergence, cost=self.cost, epsilon=self.epsilon, iters=self.iters)
    with jax.default_matmul_precision("highest"):
      div = jax.vmap(fn)(ot.masked(x, query_mask, 1.0), ot.masked(y, source_mask, 1.0),
                         ot.weights(query_mask), ot.weights(source_mask))
    ok = jnp.any(query_mask, -1) & jnp.any(source_mask, -1)
    diag = batch_mean({"sinkhorn_divergence": div}, ok)
    diag["aux_loss"] = self.loss_weight * diag["sinkhorn_divergence"]
    return query, diag


def build(cfg, dim, name):
  """sdiv: model.mot's epsilon, iters, cost, loss_weight (>= 0), mask."""
  return SinkhornDivergenceLoss(
      dim=dim,
      epsilon=config_lib.number(cfg, "epsilon", lo=0.0, lo_open=True),
      iters=config_lib.number(cfg, "iters", lo=1, integer=True),
      cost=config_lib.choice(cfg, "cost", sinkhorn.COSTS),
      loss_weight=config_lib.number(cfg, "loss_weight", lo=0.0),
      mask=config_lib.flag(cfg, "mask"),
      name=name)
