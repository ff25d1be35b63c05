"""The `none` block (the paper's "w/o MOT" ablation) and the plumbing every
fusion block shares: call validation and diagnostic averaging.

Config values come from one flat dict (`config.model.mot`), whose defaults live in
configs/common.py:model_config and nowhere else; the blocks read them through
remote_jax/config.py (choice, flag, number): a missing key, or a bad value, raises
ValueError naming the field.
"""
import flax.linen as nn
import jax.numpy as jnp

from remote_jax import config as config_lib

FIELD = config_lib.MOT


def check_call(query, query_mask, source, source_mask, dim):
  """Validate `block(query, query_mask, source, source_mask)` against the contract."""
  if query.ndim != 3 or source.ndim != 3:
    raise ValueError(f"fusion: query {query.shape} and source {source.shape} must be (B,n,D), (B,m,D)")
  (b, n, d), (b2, m, d2) = query.shape, source.shape
  if b != b2 or d != dim or d2 != dim:
    raise ValueError(f"fusion: query {query.shape} and source {source.shape} need the same batch "
                     f"and width {dim} (the block's dim)")
  if not (jnp.issubdtype(query.dtype, jnp.floating) and jnp.issubdtype(source.dtype, jnp.floating)):
    raise ValueError(f"fusion: query/source must be floating, got {query.dtype}, {source.dtype}")
  for name, mask, shape in (("query_mask", query_mask, (b, n)), ("source_mask", source_mask, (b, m))):
    if tuple(mask.shape) != shape or mask.dtype != jnp.bool_:
      raise ValueError(f"fusion: {name} must be bool {shape}, got {mask.dtype} {tuple(mask.shape)}")


def prepare(block, query, query_mask, source, source_mask, dtype=jnp.float32):
  """Validate the call, apply `block.mask` (False: every point counts, as in the
  release) and zero the padding, so NaN/inf there reaches neither the value nor
  the gradient. Returns (x, query_mask, y, source_mask), x and y in `dtype`."""
  check_call(query, query_mask, source, source_mask, block.dim)
  if not block.mask:
    query_mask, source_mask = jnp.ones_like(query_mask), jnp.ones_like(source_mask)
  x = jnp.where(query_mask[..., None], query, 0).astype(dtype)
  y = jnp.where(source_mask[..., None], source, 0).astype(dtype)
  return x, query_mask, y, source_mask


def batch_mean(stats, ok):
  """Mean over the examples where `ok`, as float32 scalars (0 where none is)."""
  count = jnp.maximum(jnp.sum(ok), 1).astype(jnp.float32)
  return {k: jnp.sum(jnp.where(ok, v.astype(jnp.float32), 0.0)) / count
          for k, v in stats.items()}


class Identity(nn.Module):
  """Returns the query unchanged: no fusion, no parameters, empty diag."""
  dim: int

  def __call__(self, query, query_mask, source, source_mask, deterministic=True):
    check_call(query, query_mask, source, source_mask, self.dim)
    return query, {}


def build(cfg, dim, name):
  del cfg
  return Identity(dim=dim, name=name)
