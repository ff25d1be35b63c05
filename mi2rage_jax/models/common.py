"""Pieces shared by the teachers and the students.

Encoders come from remote_jax (design.md section 2): `BertEncoder` returns the
num_layers + 1 hidden states, `CLIPVisionTower` returns (hidden states, pooled).
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from remote_jax.models.encoders.bert import BertConfig, BertEncoder
from remote_jax.models.encoders.clip_vit import CLIPVisionConfig, CLIPVisionTower
from remote_jax.models.layers import MultiHeadCrossAttention, TorchDense, gather_rows, layer_norm

Dtype = Any


def bert_config(cfg) -> BertConfig:
  """config.model.text (BertConfig's field names; extras ignored). With
  `pretrained_dir` the sizes come from its config.json (vocab_size and dropout
  from `cfg`: the vocabulary includes the marker tokens)."""
  if cfg.get("pretrained_dir"):
    keep = {k: cfg[k] for k in ("vocab_size", "hidden_dropout", "attention_dropout") if k in cfg}
    return dataclasses.replace(BertConfig.from_hf(cfg["pretrained_dir"]), **keep)
  return BertConfig.from_config(cfg)


def vision_config(cfg) -> CLIPVisionConfig:
  """config.model.vision; the students and the image teacher need a CLS token. With
  `pretrained_dir` the sizes come from the checkpoint (image/patch size from `cfg`)."""
  if str(cfg.get("pretrained_dir") or "").startswith("synth:"):
    raise ValueError(f"model.vision.pretrained_dir={cfg['pretrained_dir']!r}: the synthetic "
                     "towers (remote_jax/towers.py) are REMOTE's and have no CLS token, which "
                     "MI²RAGE's students read; give a CLIPVisionModel directory or ''")
  if cfg.get("pretrained_dir"):
    return CLIPVisionConfig.from_hf(cfg["pretrained_dir"], image_size=cfg["image_size"],
                                    patch_size=cfg["patch_size"], use_cls=True,
                                    use_depth=False)
  return CLIPVisionConfig.from_config(cfg, use_cls=True, use_depth=False)


# h (B, L, D), pos (B,) -> (B, D); a position of -1 (marker truncated) gives 0. The same
# gather as REMOTE's relation head.
gather = gather_rows


def entity_states(h, batch):
  """The subject and object marker states, (B, 2, D)."""
  return jnp.stack([gather(h, batch["subj_pos"]), gather(h, batch["obj_pos"])], 1)


class CrossBlock(nn.Module):
  """The paper's cross-attention layer (eq. 4) as a post-LN Transformer layer.

  x = LN(q + CA(q, M, M)); out = LN(x + FFN(x)). With every source masked,
  CA returns 0 and the block reduces to a feed-forward layer on q.
  """
  num_heads: int
  mlp_dim: int
  dropout: float = 0.1
  eps: float = 1e-12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, source, source_mask, deterministic: bool):
    d = query.shape[-1]
    a = MultiHeadCrossAttention(self.num_heads, dtype=self.dtype, name="attention")(
        query, source, source_mask, deterministic)
    a = nn.Dropout(self.dropout)(a, deterministic=deterministic)
    x = layer_norm(self.eps, self.dtype, jnp.float32, "attention_norm")(query + a)
    f = TorchDense(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name="intermediate")(x)
    f = TorchDense(d, ("mlp", "embed"), dtype=self.dtype, name="output")(
        nn.gelu(f, approximate=False))
    f = nn.Dropout(self.dropout)(f, deterministic=deterministic)
    return layer_norm(self.eps, self.dtype, jnp.float32, "output_norm")(x + f)


def project(x, dim: int, name: str, dtype=jnp.float32):
  """Maps vision width to text width when they differ (identity otherwise)."""
  if x.shape[-1] == dim:
    return x
  return TorchDense(dim, ("embed", "embed"), dtype=dtype, name=name)(x)


def classifier(x, num_classes: int, dropout: float, deterministic: bool, dtype=jnp.float32):
  x = nn.Dropout(dropout)(x, deterministic=deterministic)
  return TorchDense(num_classes, ("embed", "classes"), dtype=dtype, name="classifier")(x)


def encode_text(module_name, cfg: BertConfig, ids, types, mask, deterministic, dtype):
  """Last hidden state of a BERT over (..., L) token arrays (leading dims flattened)."""
  lead = ids.shape[:-1]
  flat = lambda a: a.reshape((-1, a.shape[-1]))
  h = BertEncoder(cfg, dtype=dtype, name=module_name)(
      flat(ids), flat(types), flat(mask), deterministic)[-1]
  return h.reshape(lead + h.shape[-2:])


def encode_image(module_name, cfg: CLIPVisionConfig, pixels, deterministic, dtype):
  """(..., H, W, 3) -> (last hidden state (..., T, D), pooled CLS (..., D))."""
  lead = pixels.shape[:-3]
  states, pooled = CLIPVisionTower(cfg, dtype=dtype, name=module_name)(
      pixels.reshape((-1,) + pixels.shape[-3:]), None, deterministic)
  h = states[-1]
  return h.reshape(lead + h.shape[-2:]), pooled.reshape(lead + pooled.shape[-1:])


class RelationClassifier(nn.Module):
  """The base of every teacher and student: a BERT ("text") over the batch's tokens and a
  linear classifier ("classifier") over the relation features."""
  text: Any                     # BertConfig
  num_classes: int
  dropout: float = 0.1
  dtype: Dtype = jnp.float32

  def encode_tokens(self, tokens, deterministic):
    """Last hidden state over tokens' input_ids, token_type_ids, attention_mask (..., L)."""
    return encode_text("text", self.text, tokens["input_ids"], tokens["token_type_ids"],
                       tokens["attention_mask"], deterministic, self.dtype)

  def classify(self, x, deterministic):
    return classifier(x, self.num_classes, self.dropout, deterministic, self.dtype)


class CrossModalClassifier(RelationClassifier):
  """A RelationClassifier with an image side: a CLIP tower ("vision"), its projection to the
  text width ("vision_proj") and one CrossBlock ("cross")."""
  vision: Any = None            # CLIPVisionConfig
  num_heads: int = 4
  mlp_dim: int = 128

  def encode_pixels(self, pixels, deterministic):
    """(..., H, W, 3) -> (last hidden state (..., T, D), pooled CLS (..., D))."""
    return encode_image("vision", self.vision, pixels, deterministic, self.dtype)

  def to_text_width(self, x, dim):
    return project(x, dim, "vision_proj", self.dtype)

  def cross_block(self):
    """The CrossBlock; one instance, so a model that applies it twice shares its weights."""
    return CrossBlock(self.num_heads, self.mlp_dim, self.dropout, dtype=self.dtype,
                      name="cross")
