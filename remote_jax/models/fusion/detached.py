"""`detached`: ot_paper with the plan under `jax.lax.stop_gradient`, as UNITER's WRA,
PLOT and GOT use transport: the forward is ot_paper's; the encoders get gradient through
the barycentre's values (the transported tokens) and the gate, none through the plan's
dependence on the costs. Same parameters as ot_paper.
"""
import jax

from remote_jax.models.fusion import ot


class DetachedPlan(ot.OTPaper):
  def plan(self, x, y, query_mask, source_mask):
    return jax.lax.stop_gradient(super().plan(x, y, query_mask, source_mask))


def build(cfg, dim, name):
  return DetachedPlan(**ot.paper_fields(cfg, dim, name))
