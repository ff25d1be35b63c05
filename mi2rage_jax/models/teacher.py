"""Teacher networks (paper section 3.2). A teacher never sees the real view.

TextTeacher  input: one synthetic caption with both entity names appended,
             `[CLS] caption [SEP] <s1> subj </s1> <s2> obj </s2> [SEP]` (with
             data.mark_mentions a name the caption has is marked there instead);
             [h_<s1> ; h_<s2>] of the last layer -> linear classifier.
ImageTeacher input: one synthetic image and the entity names only,
             `[CLS] <s1> subj </s1> <s2> obj </s2> [SEP]`; the two entity
             states attend over the image patch states (one CrossBlock),
             their concatenation -> linear classifier (fig. 3).

Batch keys (B examples = B synthetic views): batch_spec.KEYS["text_teacher"] and
["image_teacher"].
"""
import flax.linen as nn
import jax.numpy as jnp

from mi2rage_jax.models import common


class TextTeacher(common.RelationClassifier):
  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    h = self.encode_tokens(batch, deterministic)
    x = common.entity_states(h, batch).reshape(h.shape[0], -1)
    return self.classify(x, deterministic)


class ImageTeacher(common.CrossModalClassifier):
  @nn.compact
  def __call__(self, batch, deterministic: bool = True):
    h = self.encode_tokens(batch, deterministic)
    d = h.shape[-1]
    states, _ = self.encode_pixels(batch["pixels"], deterministic)
    patches = self.to_text_width(states[:, 1:], d)
    queries = common.entity_states(h, batch)                            # (B, 2, D)
    mask = jnp.ones(patches.shape[:2], bool)
    out = self.cross_block()(queries, patches, mask, deterministic)
    return self.classify(out.reshape(out.shape[0], 2 * d), deterministic)
