"""`skip`: an alpha-gated same-position skip from the lower levels, no transport.

out_i = alpha * x_i + (1 - alpha) * mean over the valid source levels of the token at
position i. The source is the lower levels concatenated (remote.py `_fuse`), each as long
as the query, so source token j sits at position j % n; for vision with
vision_scope="object" the model fuses per object, so the position is within the object.
Written as ot_paper with a fixed plan (row i: mass a_i spread over {j : j % n == i}), so the
parameters (alpha_logit), gate and diagnostics are ot_paper's (its column marginals are
not b, so marginal_error is not ~0; same_position_mass is 1).
"""
import jax.numpy as jnp

from remote_jax.models.fusion import ot
from remote_jax.models.fusion.none import FIELD


class SamePositionSkip(ot.OTPaper):
  def plan(self, x, y, query_mask, source_mask):
    n, m = x.shape[1], y.shape[1]
    if m % n:
      raise ValueError(f"{FIELD}.variant='skip': the source has {m} tokens, not whole levels "
                       f"of the query's {n}; skip needs levels of one length (not the "
                       "co-encoder's pooled objects: use semantics='paper')")
    same = jnp.arange(m)[None, :] % n == jnp.arange(n)[:, None]            # (n, m)
    keep = same[None] & query_mask[:, :, None] & source_mask[:, None, :]
    count = jnp.maximum(jnp.sum(keep, -1, keepdims=True), 1)
    return jnp.where(keep, ot.marginals(query_mask)[:, :, None] / count, 0.0)


def build(cfg, dim, name):
  return SamePositionSkip(**ot.paper_fields(cfg, dim, name))
