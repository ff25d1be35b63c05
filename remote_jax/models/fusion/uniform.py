"""`uniform`: ot_paper with its plan replaced by the uniform plan a·bᵀ over the same valid
tokens (a = 1/n_valid on valid query tokens, b = 1/m_valid on valid source tokens, 0 on
padding). The barycentre is then the mean of the valid source tokens: the control that
separates "adds a mean of the lower levels" from "transports". Same parameters as ot_paper
(alpha_logit), so a trained ot_paper checkpoint can be evaluated under it.
"""
from remote_jax.models.fusion import ot


class UniformPlan(ot.OTPaper):
  def plan(self, x, y, query_mask, source_mask):
    del x, y
    return ot.marginals(query_mask)[:, :, None] * ot.marginals(source_mask)[:, None, :]


def build(cfg, dim, name):
  return UniformPlan(**ot.paper_fields(cfg, dim, name))
