"""Unified relation head (paper eq. 13 and the classifier; reference_remote.md 3.6).

Per side (head, tail), from the batch fields `{side}_marker`, `{side}_desc`,
`{side}_obj` (design.md section 1):
- textual entity (obj == -1): combine([H_T[<s>]; H_T[<k>] or 0])
- visual object (obj >= 0):   combine([obj_feats[obj]; H_T[<o>]]), the region
  feature together with its caption marker state (eq. 13).
`combine` = "mm_linear": one Dense(2D -> D) shared by heads, tails, entities
and objects (the released code); "concat": the raw 2D concatenation (eq. 13
read literally; entities zero-padded to 2D so both kinds share a width).

Missing positions (-1) gather zero vectors, as the released code does. A side
whose primary marker (<s> or <o>) is missing (truncated, or no captions: the
paper's "w/o caption" ablation) is, by `object_without_marker`:
- "zero_side": all zeros (the released code: its branches all fail then,
  dropping the region feature too);
- "keep_region": an object keeps its region feature next to a zero marker
  state (eq. 13 without the caption part); an entity side is still zeros.
aux["missing_marker"] (B,) flags an example with a missing primary marker.

Without captions (`use_caption` False, following data.use_caption) `without_caption`
says what the head does: "mm_linear" the above, with the marker sides that captions
would fill at zero (the paper's "w/o caption"); "raw" the released code's `use_cap=False`
branch: [h_head; h_tail] of the raw features (an entity's <s> state, an object's region
feature), no mm_linear (the model then has none). There an example misses its primary
feature when an entity has no <s> (the release stops on such an example; the side is zero
here).

The classifier is dropout -> [Dense(w) -> act -> dropout]* -> Dense(C) on
[h_head; h_tail]: hidden=() with dropout 0 is the released single Linear;
the paper's "MLP + dropout 0.5" is e.g. hidden=(D,), dropout=0.5. The paper
names no activation; the default is ReLU ("gelu" = exact GELU).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from remote_jax.models.layers import ACTIVATIONS, TorchDense, gather_rows

Dtype = Any
SIDES = ("head", "tail")
POSITION_FIELDS = tuple(f"{s}_{f}" for s in SIDES for f in ("marker", "desc"))
OBJECT_FIELDS = tuple(f"{s}_obj" for s in SIDES)


def validate_indices(batch: dict, num_tokens: int, num_objects: int) -> None:
  """Raises ValueError naming the field if an index is outside [-1, size).

  Call it on concrete (NumPy) batches; under jit the head clamps instead.
  """
  for fields, size, what in ((POSITION_FIELDS, num_tokens, "token positions"),
                             (OBJECT_FIELDS, num_objects, "object slots")):
    for field in fields:
      values = np.asarray(batch[field])
      bad = (values < -1) | (values >= size)
      if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"batch[{field!r}] must be in [-1, {size - 1}] ({size} {what}, -1 = "
            f"missing); got {values.reshape(-1)[rows[:5]].tolist()} at rows "
            f"{rows[:5].tolist()}")


def _is_concrete(batch: dict) -> bool:
  return not any(isinstance(batch[f], jax.core.Tracer)
                 for f in POSITION_FIELDS + OBJECT_FIELDS)


def combine_mm_linear(module: nn.Module, pairs):
  dense = TorchDense(pairs.shape[-1] // 2, kernel_axes=("mlp", "embed"),
                     dtype=module.dtype, param_dtype=module.param_dtype,
                     name="mm_linear")
  return dense(pairs)


def combine_concat(module: nn.Module, pairs):
  del module
  return pairs


COMBINES = {"mm_linear": combine_mm_linear, "concat": combine_concat}


def raw_pairs(use_caption: bool, without_caption: str) -> bool:
  """True when the head classifies the raw features without mm_linear (the released
  use_cap=False branch); the converter drops the released mm_linear then."""
  return not use_caption and without_caption == "raw"


class RelationHead(nn.Module):
  """(H_T (B,L,D), obj_feats (B,K,D), batch, deterministic) -> (logits (B,C), aux)."""
  num_classes: int
  # config.model.head (configs/common.py:model_config):
  hidden: tuple[int, ...]
  dropout: float
  use_desc: bool
  object_without_marker: str
  without_caption: str
  use_caption: bool
  # Not config fields: the released code's pair combination and activation.
  combine: str = "mm_linear"
  activation: str = "relu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h_t, obj_feats, batch, deterministic=True):
    if self.combine not in COMBINES:
      raise ValueError(f"model.head.combine={self.combine!r}: allowed {sorted(COMBINES)}")
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"model.head.activation={self.activation!r}: "
                       f"allowed {sorted(ACTIVATIONS)}")
    if self.object_without_marker not in ("zero_side", "keep_region"):
      raise ValueError(f"model.head.object_without_marker={self.object_without_marker!r}: "
                       "allowed 'zero_side', 'keep_region'")
    if self.without_caption not in ("mm_linear", "raw"):
      raise ValueError(f"model.head.without_caption={self.without_caption!r}: "
                       "allowed 'mm_linear', 'raw'")
    raw = raw_pairs(self.use_caption, self.without_caption)
    if _is_concrete(batch):
      validate_indices(batch, h_t.shape[1], obj_feats.shape[1])
    pairs, present, keep = [], [], []
    for side in SIDES:
      marker = jnp.asarray(batch[f"{side}_marker"], jnp.int32)
      obj = jnp.asarray(batch[f"{side}_obj"], jnp.int32)
      h_marker = gather_rows(h_t, marker)
      h_desc = gather_rows(h_t, jnp.asarray(batch[f"{side}_desc"], jnp.int32))
      if not self.use_desc:
        h_desc = jnp.zeros_like(h_desc)
      h_obj = gather_rows(obj_feats, obj)
      if raw:
        pairs.append(jnp.where((obj >= 0)[:, None], h_obj, h_marker))
        present.append((marker >= 0) | (obj >= 0))
        continue
      entity = jnp.concatenate([h_marker, h_desc], axis=-1)
      region = jnp.concatenate([h_obj, h_marker], axis=-1)
      pairs.append(jnp.where((obj >= 0)[:, None], region, entity))
      present.append(marker >= 0)
      keep.append((marker >= 0) | ((obj >= 0) & (self.object_without_marker == "keep_region")))
    present = jnp.stack(present, axis=1)                           # (B,2)
    if raw:
      x = jnp.concatenate(pairs, axis=-1).astype(self.dtype)      # (B,2D), no mm_linear
    else:
      pairs = jnp.stack(pairs, axis=1).astype(self.dtype)         # (B,2,2D)
      sides = COMBINES[self.combine](self, pairs)
      keep = jnp.stack(keep, axis=1)
      sides = jnp.where(keep[..., None], sides, jnp.zeros_like(sides))
      x = sides.reshape(sides.shape[0], -1)                        # [h_head; h_tail]
    self.sow("intermediates", "pair_features", x)
    act = ACTIVATIONS[self.activation]
    axes = ("embed", "mlp")
    for i, width in enumerate(self.hidden):
      x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
      x = act(TorchDense(width, kernel_axes=axes, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=f"hidden_{i}")(x))
      axes = axes[::-1]   # a kernel never carries one logical name twice
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    logits = TorchDense(self.num_classes, kernel_axes=(axes[0], "classes"),
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        name="classifier")(x)
    return logits.astype(jnp.float32), {"missing_marker": ~present.all(axis=1)}
