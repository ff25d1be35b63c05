"""Teacher networks (paper section 3.2). A teacher never sees the real view.

TextTeacher  input: one synthetic caption with both entity names appended,
             `[CLS] caption [SEP] <s1> subj </s1> <s2> obj </s2> [SEP]` (with
             data.mark_mentions a name the caption has is marked there instead);
             [h_<s1> ; h_<s2>] of the last layer -> linear classifier.
ImageTeacher input: one synthetic image and the entity names only,
             `[CLS] <s1> subj </s1> <s2> obj </s2> [SEP]`; the two entity
             states attend over the image patch states (one CrossBlock),
             their concatenation -> linear classifier (fig. 3).

Batch keys (B examples = B synthetic views):
  text:  input_ids, token_type_ids, attention_mask (B, L) int32; subj_pos, obj_pos (B,)
  image: pixels (B, H, W, 3) float32, and the entity-name tokens as above
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mi2rage_jax.models import common

Dtype = Any


class TextTeacher(nn.Module):
  text: Any                     # BertConfig
  num_classes: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    h = common.encode_text("text", self.text, batch["input_ids"], batch["token_type_ids"],
                           batch["attention_mask"], deterministic, self.dtype)
    x = common.entity_states(h, batch).reshape(h.shape[0], -1)
    return common.classifier(x, self.num_classes, self.dropout, deterministic, self.dtype)


class ImageTeacher(nn.Module):
  text: Any                     # BertConfig
  vision: Any                   # CLIPVisionConfig
  num_classes: int
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    h = common.encode_text("text", self.text, batch["input_ids"], batch["token_type_ids"],
                           batch["attention_mask"], deterministic, self.dtype)
    d = h.shape[-1]
    states, _ = common.encode_image("vision", self.vision, batch["pixels"], deterministic,
                                    self.dtype)
    patches = common.project(states[:, 1:], d, "vision_proj", self.dtype)
    queries = common.entity_states(h, batch)                            # (B, 2, D)
    mask = jnp.ones(patches.shape[:2], bool)
    out = common.CrossBlock(self.num_heads, self.mlp_dim, self.dropout, dtype=self.dtype,
                            name="cross")(queries, patches, mask, deterministic)
    x = out.reshape(out.shape[0], 2 * d)
    return common.classifier(x, self.num_classes, self.dropout, deterministic, self.dtype)
