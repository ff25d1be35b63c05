"""REMOTE: encoders + multilevel OT + multimodal MoE + unified relation head.

The co-encoder walks the text and vision towers one layer at a time, so that
the multilevel optimal transport (paper sec. 5.2) can fuse every level with the
levels below it before the next layer runs, as the released code does. Level 0
is the embedding output, level l the output of layer l (after fusion).

Two semantics share this code (configs/common.py:model_config):
- "paper": each object crop encoded alone (RGB + depth tokens + box position
  embedding, eq. 4), cosine-cost OT with a convex gate, one MMoE router, an MLP
  head; masks everywhere.
- "reference": the released code: all object tokens attend jointly, text K/V
  prefixed into late ViT layers, object pooling + box embedding after
  `pool_layer`, object attention inside late BERT FFNs, Euclidean OT that
  degenerates to mean pooling, two per-token MoE routers, a linear head.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from remote_jax import config as config_lib
from remote_jax.models import heads as heads_lib
from remote_jax.models import moe as moe_lib
from remote_jax.models.encoders import bert as bert_lib
from remote_jax.models.encoders import clip_vit as clip_lib
from remote_jax.models.fusion import make_fusion
from remote_jax.models.layers import DTYPES, TorchDense, masked_mean


def _fuse(block, query, query_mask, sources, source_masks, deterministic):
  """One MOT level: `query` fused with its source levels, concatenated."""
  return block(query, query_mask, jnp.concatenate(sources, 1),
               jnp.concatenate(source_masks, 1), deterministic)


def _per_object(x, t):
  """(B, K*T, ...) -> (B*K, T, ...): each object's tokens become their own sequence."""
  return x.reshape((x.shape[0] * (x.shape[1] // t), t) + x.shape[2:])


def _fuse_per_object(block, query, query_mask, sources, source_masks, deterministic, t):
  """Eq. 5 per object: an object's tokens at level l are transported from that
  object's tokens at the levels below, never from another object's."""
  out, diag = _fuse(block, _per_object(query, t), _per_object(query_mask, t),
                    [_per_object(x, t) for x in sources],
                    [_per_object(m, t) for m in source_masks], deterministic)
  return out.reshape(query.shape), diag


# With cfg.remat the backward recomputes each level's concatenation, cost
# matrix and Sinkhorn solve from the stored levels instead of keeping them.
_fuse_remat = nn.checkpoint(_fuse, static_argnums=(5,))
_fuse_per_object_remat = nn.checkpoint(_fuse_per_object, static_argnums=(5, 6))


class RemoteModel(nn.Module):
  """The full model; `cfg` is config.model plus `num_classes`, `vocab_size`."""
  cfg: Any
  num_classes: int
  vocab_size: int

  def setup(self):
    cfg = self.cfg
    config_lib.check_model(cfg)
    self.dtype = DTYPES[cfg.dtype]
    self.text = bert_lib.BertEncoder(
        bert_lib.BertConfig.from_config(cfg.text, vocab_size=self.vocab_size),
        dtype=self.dtype, remat=cfg.remat, name="text")
    self.vision = clip_lib.CLIPVisionTower(clip_lib.CLIPVisionConfig.from_config(cfg.vision),
                                           dtype=self.dtype, remat=cfg.remat, name="vision")
    d = cfg.vision.hidden_size
    self.num_layers = cfg.text.num_layers
    self.levels = config_lib.mot_levels(cfg.mot, self.num_layers)
    self.mot_text = {str(t): make_fusion(dict(cfg.mot), d, f"mot_text_{t}")
                     for t in self.levels}
    self.mot_vision = {str(t): make_fusion(dict(cfg.mot), d, f"mot_vision_{t}")
                       for t in self.levels}
    self.moe = moe_lib.make_moe(dict(cfg.moe, dtype=cfg.dtype), d, "moe")
    self.head = heads_lib.RelationHead(
        num_classes=self.num_classes, hidden=tuple(cfg.head.hidden),
        dropout=cfg.head.dropout, use_desc=cfg.head.use_desc,
        object_without_marker=cfg.head.object_without_marker,
        without_caption=cfg.head.without_caption, use_caption=cfg.head.use_caption,
        dtype=self.dtype, name="head")
    if cfg.depth_summary == "post_norm" and cfg.vision.use_depth and not cfg.co_encoder:
      # [mean, max] of an object's depth crop -> model width.
      self.depth_embed = TorchDense(d, kernel_axes=("position", "embed"),
                                    dtype=self.dtype, name="depth_embed")
    if cfg.use_pos:
      # Box features [l, t, r, b, area] -> model width. New layers use
      # PyTorch's default init, as the released code (reference_remote.md 3.1).
      self.box_embed = TorchDense(d, kernel_axes=("position", "embed"),
                                  dtype=self.dtype, name="box_embed")
    if cfg.co_encoder:
      self.pool_norm = nn.LayerNorm(epsilon=1e-12, dtype=self.dtype,
                                    name="pool_norm")
      self.pool_dropout = nn.Dropout(0.1)

  # -- pieces -----------------------------------------------------------------

  def embed_objects(self, batch):
    """Object crops -> (B, K*T, D) tokens and their mask; T tokens per object."""
    pixels = batch["obj_pixels"].astype(self.dtype)
    b, k = pixels.shape[:2]
    flat = pixels.reshape((b * k,) + pixels.shape[2:])
    depth = None
    if self.cfg.vision.use_depth:
      depth = batch["obj_depth"].astype(self.dtype)
      depth = depth.reshape((b * k,) + depth.shape[2:])
    tokens = self.vision.embeddings(flat, depth)               # (B*K, T, D)
    t = tokens.shape[1]
    tokens = tokens.reshape(b, k, t, -1)
    box = None
    if self.cfg.use_pos and not self.cfg.co_encoder:
      # Paper eq. 4: the box position is added to every RGB and depth token.
      box = self.box_embed(batch["obj_boxes"].astype(self.dtype))[:, :, None]
    if box is not None and self.cfg.box_position == "pre_norm":
      tokens = tokens + box
    tokens = self.vision.pre_layrnorm(tokens)
    if box is not None and self.cfg.box_position == "post_norm":
      # After CLIP's pre-LayerNorm: as the patch embeddings grow in training the
      # LayerNorm would otherwise scale the box down to a few % of each token.
      tokens = tokens + box
    if depth is not None and self.cfg.depth_summary == "post_norm" and not self.cfg.co_encoder:
      # The pre-LayerNorm divides a depth patch's value away: a uniform patch embeds as
      # d * u (no bias), and LN(d * u + position) -> LN(u) as training grows u. The
      # object's mean and max depth, added here, keep "how near" in every token.
      crop = depth.reshape(b, k, -1)
      summary = jnp.stack([crop.mean(-1), crop.max(-1)], axis=-1)     # (B, K, 2)
      tokens = tokens + self.depth_embed(summary)[:, :, None]
    mask = jnp.repeat(batch["obj_mask"], t, axis=1)
    return tokens.reshape(b, k * t, -1), mask, t

  def vision_layer(self, i, v, v_mask, per_object_t, prefix_kv, deterministic):
    layer = self.vision.layers[i]
    if per_object_t:
      b, n, d = v.shape
      k = n // per_object_t
      out = layer(v.reshape(b * k, per_object_t, d), deterministic)
      return out.reshape(b, n, d)
    mask = v_mask if self.cfg.respect_masks else None
    # Positional: remat'd layers take static arguments by position.
    return layer(v, deterministic, prefix_kv, mask)

  def pool_objects(self, v, v_mask, t, batch, deterministic):
    """Released code after layer `pool_layer`: mean of each object's tokens + box."""
    b, n, d = v.shape
    pooled = v.reshape(b, n // t, t, d).mean(axis=2)
    if self.cfg.use_pos:   # without boxes the release skips the LayerNorm and dropout too
      pooled = pooled + self.box_embed(batch["obj_boxes"].astype(self.dtype))
      pooled = self.pool_dropout(self.pool_norm(pooled), deterministic=deterministic)
    return pooled, batch["obj_mask"]

  # -- forward ----------------------------------------------------------------

  def __call__(self, batch, deterministic=True):
    cfg = self.cfg
    text_mask = batch["attention_mask"].astype(bool)
    t_h = self.text.embeddings(batch["input_ids"], batch["token_type_ids"],
                               deterministic=deterministic)
    v_h, v_mask, tok_per_obj = self.embed_objects(batch)
    per_object = cfg.object_attention == "per_object"
    if cfg.object_attention not in ("per_object", "joint"):
      raise ValueError(f"model.object_attention={cfg.object_attention!r}: "
                       "allowed 'per_object', 'joint'")
    text_levels, text_masks = [t_h], [text_mask]
    vision_levels, vision_masks = [v_h], [v_mask]
    ot_diag = {}
    kv_text = None
    pooled = False
    attn_mask = batch["attention_mask"]
    for i in range(self.num_layers):
      co = cfg.co_encoder
      prefix = kv_text if (co and i > cfg.pool_layer) else None
      v_h = self.vision_layer(i, v_h, v_mask,
                              tok_per_obj if (per_object and not pooled) else 0,
                              prefix, deterministic)
      if co and i == cfg.pool_layer:
        v_h, v_mask = self.pool_objects(v_h, v_mask, tok_per_obj, batch,
                                        deterministic)
        pooled = True
      visual = v_h if (co and i > cfg.pool_layer) else None
      visual_mask = v_mask if cfg.respect_masks else None
      out = self.text.layers[i](t_h, attn_mask, deterministic, None,
                                co and i >= cfg.pool_layer, visual, visual_mask)
      if co and i >= cfg.pool_layer:
        t_h, kv_text = out
      else:
        t_h = out
      level = i + 1
      if level in self.levels:
        src = self.levels[level]
        fuse = _fuse_remat if cfg.remat else _fuse
        t_h, diag_t = fuse(self.mot_text[str(level)], t_h, text_mask,
                           [text_levels[j] for j in src], [text_masks[j] for j in src],
                           deterministic)
        v_args = (self.mot_vision[str(level)], v_h, v_mask,
                  [vision_levels[j] for j in src], [vision_masks[j] for j in src],
                  deterministic)
        if cfg.mot.vision_scope == "object":
          fuse_v = _fuse_per_object_remat if cfg.remat else _fuse_per_object
          v_h, diag_v = fuse_v(*v_args, tok_per_obj)
        else:
          v_h, diag_v = fuse(*v_args)
        ot_diag[f"text_{level}"] = diag_t
        ot_diag[f"vision_{level}"] = diag_v
      text_levels.append(t_h)
      text_masks.append(text_mask)
      vision_levels.append(v_h)
      vision_masks.append(v_mask)

    h_t, h_v, moe_aux = self.moe(text_levels, text_mask, vision_levels,
                                 vision_masks, deterministic=deterministic, triplet=batch)
    if h_v.shape[1] == batch["obj_mask"].shape[1]:
      obj_feats = h_v
    else:   # token level: an object's feature is the mean of its tokens
      b, n, d = h_v.shape
      k = batch["obj_mask"].shape[1]
      obj_feats = masked_mean(h_v.reshape(b, k, n // k, d),
                              v_mask.reshape(b, k, n // k), axis=2)
    # Probes (bench/geometry_probe.py, bench/fused_probe.py) read what the head sees of each
    # object, and every vision level after its fusion.
    self.sow("intermediates", "object_features", obj_feats)
    self.sow("intermediates", "vision_levels", tuple(vision_levels))
    logits, head_aux = self.head(h_t, obj_feats, batch,
                                 deterministic=deterministic)
    # A fusion block's diag["aux_loss"] (sdiv's divergence) joins the MMoE's.
    aux_loss = moe_aux.get("aux_loss", jnp.zeros((), jnp.float32))
    for diag in ot_diag.values():
      if "aux_loss" in diag:
        aux_loss = aux_loss + diag.pop("aux_loss")
    aux = dict(router=moe_aux.get("router"), ot=ot_diag,
               missing_marker=head_aux["missing_marker"], aux_loss=aux_loss)
    return logits.astype(jnp.float32), aux


def expert_names(model_cfg):
  """The MMoE's expert names (static), for logs and the router plot."""
  moe = moe_lib.MMOE[model_cfg.moe.variant](dict(model_cfg.moe, dtype=model_cfg.dtype), 1, "moe")
  levels = model_cfg.text.num_layers + 1
  return tuple(moe.expert_names(levels, levels))


def build(model_cfg, num_classes, vocab_size):
  return RemoteModel(model_cfg, num_classes=num_classes, vocab_size=vocab_size)
