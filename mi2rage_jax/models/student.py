"""Student networks (paper section 3.3, eq. 4, fig. 4), with a view mask.

ImageStudent ("no_real_text": real image + N synthetic texts, fig. 4a):
  h_CLS of the real image queries M_sub and M_obj, the <s1>/<s2> states of the
  N captions (each encoded on its own, entity names appended or marked); the same
  CrossBlock (cross-attention + feed-forward) is applied twice; the two
  outputs are concatenated -> linear classifier.
TextStudent ("no_real_image": real text + N synthetic images, fig. 4b):
  h_<s1> and h_<s2> of the real (marked) text query M_img, the CLS states of
  the N images; concatenation -> linear classifier.

`view_mask` (B, N) bool marks the real view slots; a masked slot gets zero
attention, so a student given n < N views computes exactly what it computes
with the missing views present but masked. At test time the real view of
the synthetic modality is one more (unmasked) slot.

`view_dropout` p (ours, not the paper's; 0 = off): in training each synthetic view is
dropped with probability p. TextStudent: its image slot is masked, so the student also
learns from fewer views and from its real text alone (every slot masked); without it a
student trained on three views per instance can let an image cue learnt on one family
override what the text alone decides on another. ImageStudent: its caption becomes the
entity names alone (the `names_*` keys), because the names are the query; without it the
student trusted its captions and stopped reading the photo (mi2rage_jax/README.md).

Batch keys:
  ImageStudent: pixels (B,H,W,3); view_input_ids, view_token_type_ids,
    view_attention_mask (B,N,L); view_subj_pos, view_obj_pos (B,N); view_mask (B,N);
    names_* (B,L) / (B,): the names-only encoding (read only by view dropout)
  TextStudent: input_ids, token_type_ids, attention_mask (B,L); subj_pos, obj_pos (B,);
    view_pixels (B,N,H,W,3); view_mask (B,N)
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mi2rage_jax.models import common

Dtype = Any


CAPTION_KEYS = ("input_ids", "token_type_ids", "attention_mask", "subj_pos", "obj_pos")


class ImageStudent(nn.Module):
  text: Any
  vision: Any
  num_classes: int
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  view_dropout: float = 0.0

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    views = {k: batch[f"view_{k}"] for k in CAPTION_KEYS}
    if self.view_dropout and not deterministic:   # training only
      # A dropped caption becomes the entity names alone (the unimodal student's input):
      # the query stays, what the caption says goes.
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.view_dropout,
                                  views["input_ids"].shape[:2])
      views = {k: jnp.where(drop.reshape(drop.shape + (1,) * (v.ndim - 2)),
                            batch[f"names_{k}"][:, None], v) for k, v in views.items()}
    h = common.encode_text("text", self.text, views["input_ids"], views["token_type_ids"],
                           views["attention_mask"], deterministic, self.dtype)  # (B, N, L, D)
    b, n, _, d = h.shape
    flat = h.reshape((b * n,) + h.shape[2:])
    m_sub = common.gather(flat, views["subj_pos"].reshape(-1)).reshape(b, n, d)
    m_obj = common.gather(flat, views["obj_pos"].reshape(-1)).reshape(b, n, d)
    _, cls = common.encode_image("vision", self.vision, batch["pixels"], deterministic,
                                 self.dtype)
    q = common.project(cls, d, "vision_proj", self.dtype)[:, None]      # (B, 1, D)
    block = common.CrossBlock(self.num_heads, self.mlp_dim, self.dropout, dtype=self.dtype,
                              name="cross")
    mask = batch["view_mask"]
    a_sub = block(q, m_sub, mask, deterministic)[:, 0]
    a_obj = block(q, m_obj, mask, deterministic)[:, 0]
    x = jnp.concatenate([a_sub, a_obj], -1)
    return common.classifier(x, self.num_classes, self.dropout, deterministic, self.dtype)


class TextStudent(nn.Module):
  text: Any
  vision: Any
  num_classes: int
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1
  view_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    h = common.encode_text("text", self.text, batch["input_ids"], batch["token_type_ids"],
                           batch["attention_mask"], deterministic, self.dtype)
    d = h.shape[-1]
    q = common.entity_states(h, batch)                                  # (B, 2, D)
    pixels = batch["view_pixels"]
    b, n = pixels.shape[:2]
    if n:
      _, cls = common.encode_image("vision", self.vision, pixels, deterministic, self.dtype)
      m_img = common.project(cls, d, "vision_proj", self.dtype)         # (B, N, D)
    else:  # a text-only batch (unimodal / text-only data): one masked dummy slot
      m_img = jnp.zeros((b, 1, d), h.dtype)
    mask = batch["view_mask"] if n else jnp.zeros((b, 1), bool)
    if n and self.view_dropout and not deterministic:   # training only
      mask = mask & jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.view_dropout,
                                         mask.shape)
    out = common.CrossBlock(self.num_heads, self.mlp_dim, self.dropout, dtype=self.dtype,
                            name="cross")(q, m_img, mask, deterministic)
    x = out.reshape(b, 2 * d)
    return common.classifier(x, self.num_classes, self.dropout, deterministic, self.dtype)

