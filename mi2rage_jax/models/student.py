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

Batch keys: batch_spec.KEYS["no_real_text"] (ImageStudent), ["no_real_image"] (TextStudent).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mi2rage_jax import batch_spec
from mi2rage_jax.models import common


class ImageStudent(common.CrossModalClassifier):
  view_dropout: float = 0.0

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    views = {k: batch[f"view_{k}"] for k in batch_spec.TOKENS}
    if self.view_dropout and not deterministic:   # training only
      # A dropped caption becomes the entity names alone (the unimodal student's input):
      # the query stays, what the caption says goes.
      drop = jax.random.bernoulli(self.make_rng("dropout"), self.view_dropout,
                                  views["input_ids"].shape[:2])
      views = {k: jnp.where(drop.reshape(drop.shape + (1,) * (v.ndim - 2)),
                            batch[f"names_{k}"][:, None], v) for k, v in views.items()}
    h = self.encode_tokens(views, deterministic)                        # (B, N, L, D)
    b, n, _, d = h.shape
    flat = h.reshape((b * n,) + h.shape[2:])
    m_sub = common.gather(flat, views["subj_pos"].reshape(-1)).reshape(b, n, d)
    m_obj = common.gather(flat, views["obj_pos"].reshape(-1)).reshape(b, n, d)
    _, cls = self.encode_pixels(batch["pixels"], deterministic)
    q = self.to_text_width(cls, d)[:, None]                             # (B, 1, D)
    block = self.cross_block()
    mask = batch["view_mask"]
    a_sub = block(q, m_sub, mask, deterministic)[:, 0]
    a_obj = block(q, m_obj, mask, deterministic)[:, 0]
    return self.classify(jnp.concatenate([a_sub, a_obj], -1), deterministic)


class TextStudent(common.CrossModalClassifier):
  view_dropout: float = 0.0

  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    h = self.encode_tokens(batch, deterministic)
    d = h.shape[-1]
    q = common.entity_states(h, batch)                                  # (B, 2, D)
    pixels = batch["view_pixels"]
    b, n = pixels.shape[:2]
    if n:
      _, cls = self.encode_pixels(pixels, deterministic)
      m_img = self.to_text_width(cls, d)                                # (B, N, D)
    else:  # a text-only batch (unimodal / text-only data): one masked dummy slot
      m_img = jnp.zeros((b, 1, d), h.dtype)
    mask = batch["view_mask"] if n else jnp.zeros((b, 1), bool)
    if n and self.view_dropout and not deterministic:   # training only
      mask = mask & jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.view_dropout,
                                         mask.shape)
    out = self.cross_block()(q, m_img, mask, deterministic)
    return self.classify(out.reshape(b, 2 * d), deterministic)
