"""The "MOT (Cross Attention)" ablation (paper table 3, CA).

The released `.pyc` uses `nn.MultiheadAttention(768, 12)` with query = the
current level and key = value = the concatenated lower levels, fused as
`query + w * attn` with a scalar w initialised to 1 (reference_remote.md 3.4).
Parameters follow nn.MultiheadAttention's init: in-projections xavier-uniform
over the stacked (3D, D) matrix, zero biases, out-projection U(+-1/sqrt(D))
with zero bias; no dropout (its default 0). The release passes no masks;
`mask=True` (semantics="paper") excludes padded keys and leaves padded rows as is.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from remote_jax import config as config_lib
from remote_jax.models.fusion.none import FIELD, batch_mean, prepare
from remote_jax.models.layers import uniform_init


class CrossAttentionFusion(nn.Module):
  dim: int
  num_heads: int
  mask: bool
  residual_init: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _param(self, name, init, shape, axes):
    return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                      self.param_dtype).astype(self.dtype)

  @nn.compact
  def __call__(self, query, query_mask, source, source_mask, deterministic=True):
    x, query_mask, y, source_mask = prepare(self, query, query_mask, source, source_mask,
                                            self.dtype)
    d, h = self.dim, self.num_heads
    kv = d // h
    in_init = uniform_init(math.sqrt(6.0 / (4 * d)))   # xavier on (3D, D)
    zeros = nn.initializers.zeros
    kernels = {name: (self._param(f"{name}_kernel", in_init, (d, h, kv), ("embed", "heads", "kv")),
                      self._param(f"{name}_bias", zeros, (h, kv), ("heads", "kv")))
               for name in ("query", "key", "value")}
    out_kernel = self._param("out_kernel", uniform_init(1.0 / math.sqrt(d)), (h, kv, d),
                             ("heads", "kv", "embed"))
    out_bias = self._param("out_bias", zeros, (d,), ("embed",))
    w = self.param("w", nn.with_logical_partitioning(
        nn.initializers.constant(self.residual_init), ()), (), self.param_dtype)
    if self.is_initializing():   # parameters exist now; skip the attention
      return query, dict.fromkeys(("attention_entropy", "gate_mean"), jnp.zeros((), jnp.float32))

    def project(inputs, name):
      kernel, bias = kernels[name]
      return jnp.einsum("bld,dhk->blhk", inputs, kernel) + bias

    q, k, v = project(x, "query"), project(y, "key"), project(y, "value")
    scores = jnp.einsum("bnhk,bmhk->bhnm", q, k).astype(jnp.float32) / math.sqrt(kv)
    keep = source_mask[:, None, None, :]
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1) * keep        # no valid key -> zeros
    attn = jnp.einsum("bhnm,bmhk->bnhk", probs.astype(self.dtype), v)
    attn = jnp.einsum("bnhk,hkd->bnd", attn, out_kernel) + out_bias
    row_ok = query_mask & jnp.any(source_mask, -1, keepdims=True)
    fused = (x + w.astype(self.dtype) * attn).astype(query.dtype)
    out = jnp.where(row_ok[..., None], fused, query)
    return out, self._diag(probs, query_mask, source_mask, w)

  def _diag(self, probs, query_mask, source_mask, w):
    """attention_entropy: H(row) / log(m_valid), mean over heads and valid rows."""
    probs = jax.lax.stop_gradient(probs)
    ent = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), -1)
    m_v = jnp.sum(source_mask, -1).astype(jnp.float32)[:, None, None]
    ent = jnp.where(m_v > 1, ent / jnp.log(jnp.maximum(m_v, 2.0)), 1.0)
    rows = query_mask.astype(jnp.float32)
    per_example = jnp.sum(jnp.mean(ent, 1) * rows, -1) / jnp.maximum(jnp.sum(rows, -1), 1.0)
    ok = jnp.any(query_mask, -1) & jnp.any(source_mask, -1)
    diag = batch_mean({"attention_entropy": per_example}, ok)
    diag["gate_mean"] = w.astype(jnp.float32)
    return diag


def build(cfg, dim, name):
  """xattn: model.mot's num_heads (the text encoder's: 12 at 768, as released), mask and
  residual_init."""
  heads = config_lib.number(cfg, "num_heads", lo=1, integer=True)
  if dim % heads:
    raise ValueError(f"{FIELD}.num_heads={heads}: must divide the width {dim}")
  return CrossAttentionFusion(
      dim=dim, num_heads=heads, mask=config_lib.flag(cfg, "mask"),
      residual_init=config_lib.number(cfg, "residual_init"), name=name)
