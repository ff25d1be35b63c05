"""The similarity ("CLIP") teacher of the ablation: a dual encoder trained with a
InfoNCE loss (text to image) on (real view, synthetic view) pairs, no labels.

No CLIP weights ship offline, so the CLIP teacher of the paper is replaced by
this contrastively trained stand-in; like CLIP filtering it scores a synthetic
view by its cosine similarity to the REAL view of the same instance (it sees
the real view by design). `__call__` returns the (B, B) similarity logits of
a batch of pairs (targets: the diagonal); `pair_scores` the (B,) cosines.

Batch keys: batch_spec.KEYS["similarity"] (the text side: real text or caption + names;
the image side: pixels).
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mi2rage_jax.models import common
from remote_jax.models.layers import TorchDense


class SimilarityModel(nn.Module):
  text: Any
  vision: Any
  dim: int = 64
  temperature: float = 0.1
  dtype: Any = jnp.float32
  num_classes: int = 0   # unused; uniform builder signature
  dropout: float = 0.0

  @nn.compact
  def embed(self, batch, deterministic):
    h = common.encode_text("text_tower", self.text, batch["input_ids"], batch["token_type_ids"],
                           batch["attention_mask"], deterministic, self.dtype)[:, 0]
    _, cls = common.encode_image("vision_tower", self.vision, batch["pixels"], deterministic,
                                 self.dtype)
    t = TorchDense(self.dim, ("embed", "mlp"), name="text_proj")(h)
    v = TorchDense(self.dim, ("embed", "mlp"), name="image_proj")(cls)
    norm = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    return norm(t), norm(v)

  def __call__(self, batch, deterministic: bool = True):
    t, v = self.embed(batch, deterministic)
    return (t @ v.T) / self.temperature

  def pair_scores(self, batch):
    t, v = self.embed(batch, True)
    return (t * v).sum(-1)
