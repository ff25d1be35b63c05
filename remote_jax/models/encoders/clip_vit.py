"""CLIP vision tower (pre-LN ViT), parameter-compatible with Hugging Face CLIP.

With the defaults (224 px, patch 32, CLS) it computes what FlaxCLIPVisionModel
does. REMOTE's released variant runs it on 64x64 object crops: 4 patches, no
CLS, and a depth crop embedded by its own bias-free patch projection
(`depth_embedding`) whose tokens share the rgb tokens' position rows. Its
upper layers attend over BERT keys/values prepended to their own
(`prefix_kv`).

The patch "conv" is stored as a (kh*kw*cin, D) matrix applied to flattened
patches: the same arithmetic as a stride = kernel conv, with a kernel that
carries the `patch` logical axis.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from remote_jax.models import layers
from remote_jax.models.encoders.bert import (
  REQUIRED,
  Dtype,
  PathOrDict,
  attention_bias,
  check_heads,
  dense,
  fields_of,
  hf_fields,
  layer_norm,
  multi_head_attention,
  normal_init,
  read_config_json,
)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  image_size: int = 224
  patch_size: int = 32
  layer_norm_eps: float = 1e-5
  use_cls: bool = True
  use_depth: bool = False
  attention_dropout: float = 0.0
  initializer_range: float = 0.02

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  @property
  def num_positions(self) -> int:
    return self.num_patches + int(self.use_cls)

  @property
  def num_tokens(self) -> int:
    return self.num_positions + self.num_patches * int(self.use_depth)

  @classmethod
  def from_config(cls, vision, **overrides) -> "CLIPVisionConfig":
    """config.model.vision (CLIPVisionConfig's field names) -> CLIPVisionConfig."""
    return cls(**fields_of(cls, vision, **overrides))

  @classmethod
  def from_hf(cls, path_or_dict: PathOrDict, **overrides) -> "CLIPVisionConfig":
    """Reads a CLIPModel config (its `vision_config`) or a CLIPVisionModel one.

    `overrides` replace fields afterwards (e.g. image_size=64, use_cls=False).
    """
    raw, where = read_config_json(path_or_dict)
    for key in ("vision_config", "vision_config_dict"):  # the latter: old files
      if isinstance(raw.get(key), dict):
        raw, where = raw[key], f"{where} ({key})"
        break
    else:
      if raw.get("model_type") == "clip":
        raise ValueError(f"{where}: a CLIPModel config without 'vision_config'")
    # Absent optional keys take HF CLIPVisionConfig's defaults, as HF does.
    fields = {
        "hidden_size": ("hidden_size", int, REQUIRED),
        "num_layers": ("num_hidden_layers", int, REQUIRED),
        "num_heads": ("num_attention_heads", int, REQUIRED),
        "intermediate_size": ("intermediate_size", int, REQUIRED),
        "image_size": ("image_size", int, 224),
        "patch_size": ("patch_size", int, 32),
        "layer_norm_eps": ("layer_norm_eps", float, 1e-5),
        "attention_dropout": ("attention_dropout", float, 0.0),
        "initializer_range": ("initializer_range", float, 0.02),
    }
    checks = {"hidden_act": ("quick_gelu",), "num_channels": (3,)}
    config = dataclasses.replace(cls(**hf_fields(raw, where, fields, checks)), **overrides)
    check_heads(where, config.hidden_size, config.num_heads)
    if config.image_size % config.patch_size:
      raise ValueError(f"{where}: image_size {config.image_size} is not a multiple "
                       f"of patch_size {config.patch_size}")
    return config


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def patchify(images, patch: int):
  """(N, H, W, C) -> (N, H/p * W/p, p*p*C), row-major patches flattened (kh, kw, c)."""
  n, h, w, c = images.shape
  x = images.reshape(n, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, (h // patch) * (w // patch), -1)


class CLIPVisionEmbeddings(nn.Module):
  """Tokens [CLS?, rgb p0..pP-1, depth p0..pP-1] -> (N, T, D)."""
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels, depth=None):
    cfg = self.config
    size = (cfg.image_size, cfg.image_size)
    if pixels.shape[1:] != size + (3,):
      raise ValueError(f"pixels must be (N, {cfg.image_size}, {cfg.image_size}, 3), "
                       f"got {pixels.shape}")
    if cfg.use_depth != (depth is not None):
      raise ValueError(f"use_depth={cfg.use_depth} but depth is "
                       f"{'missing' if depth is None else 'given'}")
    std = cfg.initializer_range

    def patch_tokens(images, name):
      project = nn.DenseGeneral(
          cfg.hidden_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
          dot_general=layers.dot_general,
          kernel_init=normal_init(std, ("patch", "embed")), name=name)
      return project(patchify(images.astype(self.dtype), cfg.patch_size))

    positions = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="position_embedding",
                         embedding_init=normal_init(std, ("position", "embed")))(
                             jnp.arange(cfg.num_positions))
    patch_positions = positions[int(cfg.use_cls):]
    tokens = [patch_tokens(pixels, "patch_embedding") + patch_positions]
    if cfg.use_cls:
      cls = self.param("class_embedding", normal_init(std, ("embed",)),
                       (cfg.hidden_size,), self.param_dtype)
      cls = (cls.astype(self.dtype) + positions[0])[None, None, :]
      tokens.insert(0, jnp.broadcast_to(cls, (pixels.shape[0], 1, cfg.hidden_size)))
    if depth is not None:
      if depth.shape[1:] != size + (1,):
        raise ValueError(f"depth must be (N, {cfg.image_size}, {cfg.image_size}, 1), "
                         f"got {depth.shape}")
      # Same position rows as the rgb patches: the released code adds one table to both.
      tokens.append(patch_tokens(depth, "depth_embedding") + patch_positions)
    return jnp.concatenate(tokens, axis=1)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN layer: h + attn(LN1 h), then + MLP(LN2 h) with quick_gelu.

  `prefix_kv` = (k, v), each (N, Lp, heads, head_dim), is put before this
  layer's own keys/values and is never masked (the released code attends to
  text padding too). `attention_mask` (N, T) {0,1} masks the own tokens only.
  """
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, deterministic: bool = True, prefix_kv=None, attention_mask=None):
    cfg = self.config
    std = cfg.initializer_range

    def norm(name):
      return layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, name)

    x = norm("layer_norm1")(h)

    def project(name):
      return dense((cfg.num_heads, cfg.head_dim), ("embed",), ("heads", "kv"), std,
                   self.dtype, self.param_dtype, name)(x)

    q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
    if prefix_kv is not None:
      pk, pv = prefix_kv
      k = jnp.concatenate([pk.astype(k.dtype), k], axis=1)
      v = jnp.concatenate([pv.astype(v.dtype), v], axis=1)
      if attention_mask is not None:
        prefix_ones = jnp.ones((h.shape[0], pk.shape[1]), attention_mask.dtype)
        attention_mask = jnp.concatenate([prefix_ones, attention_mask], axis=1)
    ctx = multi_head_attention(self, q, k, v, attention_bias(attention_mask, self.dtype),
                               cfg.attention_dropout, deterministic, self.dtype)
    h = h + dense(cfg.hidden_size, ("heads", "kv"), ("embed",), std, self.dtype,
                  self.param_dtype, "out_proj", axis=(-2, -1))(ctx)
    x = norm("layer_norm2")(h)
    x = dense(cfg.intermediate_size, ("embed",), ("mlp",), std, self.dtype,
              self.param_dtype, "fc1")(x)
    x = dense(cfg.hidden_size, ("mlp",), ("embed",), std, self.dtype,
              self.param_dtype, "fc2")(quick_gelu(x))
    return h + x


class CLIPVisionTower(nn.Module):
  """Returns (num_layers + 1 hidden states, pooled or None).

  Index 0 is pre_layrnorm(embeddings); pooled = post_layernorm(last[:, 0])
  with a CLS token (HF's pooler_output), else None.
  """
  config: CLIPVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False   # recompute each layer's activations in the backward pass

  def setup(self):
    cfg = self.config
    kw = {"config": cfg, "dtype": self.dtype, "param_dtype": self.param_dtype}
    self.embeddings = CLIPVisionEmbeddings(**kw)
    self.pre_layrnorm = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype)
    # static: deterministic (2); call remat'd layers positionally.
    layer = nn.remat(CLIPEncoderLayer, static_argnums=(2,)) if self.remat else CLIPEncoderLayer
    self.layers = [layer(**kw) for _ in range(cfg.num_layers)]
    self.post_layernorm = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype)

  def __call__(self, pixels, depth=None, deterministic: bool = True):
    h = self.pre_layrnorm(self.embeddings(pixels, depth))
    states = [h]
    for layer in self.layers:
      h = layer(h, deterministic)
      states.append(h)
    pooled = self.post_layernorm(h[:, 0]) if self.config.use_cls else None
    return tuple(states), pooled
