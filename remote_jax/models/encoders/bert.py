"""BERT text encoder (post-LN), parameter-compatible with Hugging Face BERT.

`convert.load_bert` fills these modules from a local HF checkpoint. Besides the
standard layer, `BertLayer` exposes the two hooks REMOTE's co-encoder needs:
`return_kv` (its key/value projections become the attention prefix of the
vision tower's upper layers) and `ffn_extra` / `visual` (the released object
fusion, added to the FFN pre-activation through `fusion_dense`).

The small building blocks below (config reading, logically partitioned
Dense/LayerNorm, multi-head attention) are shared with `clip_vit.py`.
"""
import dataclasses
import functools
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from remote_jax.models import layers

Dtype = Any
PathOrDict = str | pathlib.Path | Mapping[str, Any]


# ----------------------------------------------------------------------------
# Reading a Hugging Face config.json


def read_config_json(source: PathOrDict) -> tuple[dict, str]:
  """Returns (the config dict, a label naming where it came from)."""
  if isinstance(source, Mapping):
    return dict(source), "the given config dict"
  path = pathlib.Path(source)
  if path.is_dir():
    path = path / "config.json"
  if not path.is_file():
    raise ValueError(f"no config.json at {path}: pass a Hugging Face model "
                     "directory or its config.json")
  try:
    return json.loads(path.read_text()), str(path)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from None


REQUIRED = object()  # marks an HF field without a default


def _valid(value, kind) -> bool:
  if isinstance(value, bool):
    return False
  if kind is int:
    return isinstance(value, int) and value > 0
  return isinstance(value, (int, float)) and value >= 0


def hf_fields(raw: Mapping[str, Any], where: str, fields: Mapping[str, tuple],
              checks: Mapping[str, tuple] = ()) -> dict:
  """Maps HF keys onto our field names, with errors naming file and field.

  `fields`: our name -> (hf key, int or float, default or REQUIRED).
  `checks`: hf key -> allowed values, for keys that select behaviour
  implemented one way only (e.g. the activation).
  """
  out = {}
  for ours, (key, kind, default) in fields.items():
    if key not in raw:
      if default is REQUIRED:
        raise ValueError(f"{where}: missing field '{key}'")
      out[ours] = default
    elif _valid(raw[key], kind):
      out[ours] = kind(raw[key])
    else:
      wanted = "positive int" if kind is int else "non-negative number"
      raise ValueError(f"{where}: invalid field '{key}' = {raw[key]!r} (expected a {wanted})")
  for key, allowed in dict(checks).items():
    if key in raw and raw[key] not in allowed:
      raise ValueError(f"{where}: unsupported field '{key}' = {raw[key]!r} "
                       f"(supported: {', '.join(map(repr, allowed))})")
  return out


def check_heads(where: str, hidden_size: int, num_heads: int):
  if hidden_size % num_heads:
    raise ValueError(f"{where}: hidden_size {hidden_size} is not divisible by "
                     f"num_attention_heads {num_heads}")


def fields_of(cls, cfg, **overrides) -> dict:
  """The fields of the dataclass `cls` that `cfg` (a config section: a dict or ConfigDict,
  extras ignored) sets, with `overrides`."""
  names = {f.name for f in dataclasses.fields(cls)}
  return {**{k: cfg[k] for k in names if k in cfg}, **overrides}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int
  hidden_dropout: float
  attention_dropout: float
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @classmethod
  def from_config(cls, text, **overrides) -> "BertConfig":
    """config.model.text (BertConfig's field names) -> BertConfig; `overrides` win (REMOTE's
    vocab_size: its tokenizer's)."""
    return cls(**fields_of(cls, text, **overrides))

  @classmethod
  def from_hf(cls, path_or_dict: PathOrDict) -> "BertConfig":
    raw, where = read_config_json(path_or_dict)
    fields = {
        "vocab_size": ("vocab_size", int, REQUIRED),
        "hidden_size": ("hidden_size", int, REQUIRED),
        "num_layers": ("num_hidden_layers", int, REQUIRED),
        "num_heads": ("num_attention_heads", int, REQUIRED),
        "intermediate_size": ("intermediate_size", int, REQUIRED),
        "max_position_embeddings": ("max_position_embeddings", int, REQUIRED),
        "type_vocab_size": ("type_vocab_size", int, REQUIRED),
        "hidden_dropout": ("hidden_dropout_prob", float, REQUIRED),
        "attention_dropout": ("attention_probs_dropout_prob", float, REQUIRED),
        "layer_norm_eps": ("layer_norm_eps", float, 1e-12),
        "initializer_range": ("initializer_range", float, 0.02),
    }
    # HF's "gelu" is the exact erf GELU, the only activation implemented here.
    checks = {"hidden_act": ("gelu",), "position_embedding_type": ("absolute",)}
    config = cls(**hf_fields(raw, where, fields, checks))
    check_heads(where, config.hidden_size, config.num_heads)
    return config


# ----------------------------------------------------------------------------
# Building blocks with logical axis names (shared with clip_vit.py)


def normal_init(std: float, names: tuple):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros_init(names: tuple):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def dense(features, in_names: tuple, out_names: tuple, std: float, dtype: Dtype,
          param_dtype: Dtype, name: str, axis=-1) -> nn.DenseGeneral:
  """Dense layer; `features`/`out_names` may be multi-dimensional (heads, kv)."""
  return nn.DenseGeneral(
      features, axis=axis, dtype=dtype, param_dtype=param_dtype, name=name,
      dot_general=layers.dot_general,
      kernel_init=normal_init(std, in_names + out_names),
      bias_init=zeros_init(out_names))


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype,
               name: str | None = None) -> nn.LayerNorm:
  """LayerNorm over the model width (name=None inside setup, which names it)."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=zeros_init(("embed",)))


def attention_bias(mask, dtype: Dtype):
  """(B, Lk) {0,1} mask -> additive (B, 1, 1, Lk) bias (as HF Flax does)."""
  if mask is None:
    return None
  big_negative = jnp.finfo(dtype).min
  return jnp.where(mask[:, None, None, :] > 0, 0.0, big_negative).astype(dtype)


def multi_head_attention(module: nn.Module, q, k, v, bias, dropout_rate: float,
                         deterministic: bool, dtype: Dtype):
  """softmax(q k^T / sqrt(head_dim) + bias) v on (B, L, heads, head_dim) arrays."""
  use_dropout = not deterministic and dropout_rate > 0.0
  return nn.dot_product_attention(
      q, k, v, bias=bias, dropout_rate=dropout_rate,
      dropout_rng=module.make_rng("dropout") if use_dropout else None,
      deterministic=not use_dropout, dtype=dtype, force_fp32_for_softmax=True)


# ----------------------------------------------------------------------------
# BERT


class BertEmbeddings(nn.Module):
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic: bool):
    cfg = self.config

    def embed(num, names, name):
      return nn.Embed(num, cfg.hidden_size, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name,
                      embedding_init=normal_init(cfg.initializer_range, names))

    length = input_ids.shape[-1]
    if length > cfg.max_position_embeddings:  # jnp indexing would clamp silently
      raise ValueError(f"{length} tokens exceed max_position_embeddings "
                       f"{cfg.max_position_embeddings}")
    positions = jnp.arange(length)[None, :]
    h = (embed(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
         + embed(cfg.max_position_embeddings, ("position", "embed"),
                 "position_embeddings")(positions)
         # Two token types: too few rows to shard, so that axis stays replicated.
         + embed(cfg.type_vocab_size, (None, "embed"),
                 "token_type_embeddings")(token_type_ids))
    h = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "layer_norm")(h)
    return nn.Dropout(cfg.hidden_dropout)(h, deterministic=deterministic)


def object_fusion(visual, visual_mask, ctx):
  """The released BERT-side object fusion: softmax_k(ctx . v_k) v_k.

  ctx (B, L, D) attention context, visual (B, K, D), visual_mask (B, K) or
  None. Dot products are unscaled and, without a mask, padded objects take
  part, as released.
  """
  scores = jnp.einsum("bld,bkd->blk", ctx, visual.astype(ctx.dtype)).astype(jnp.float32)
  if visual_mask is not None:
    scores = jnp.where(visual_mask[:, None, :], scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(ctx.dtype)
  return jnp.einsum("blk,bkd->bld", weights, visual.astype(ctx.dtype))


class BertLayer(nn.Module):
  """Post-LN transformer layer with REMOTE's two hooks.

  `ffn_extra`: (B, L, D) array, or a function of the attention context (the
  merged heads before the output dense, (B, L, D)) returning one. It enters
  the FFN as GELU(intermediate(a) + fusion_dense(extra)). `visual` (B, K, D)
  with optional `visual_mask` (B, K) is shorthand for the released fusion,
  `ffn_extra = object_fusion(visual, visual_mask, ctx)`.
  """
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h, attention_mask, deterministic: bool,
               ffn_extra: jax.Array | Callable | None = None,
               return_kv: bool = False, visual=None, visual_mask=None):
    cfg = self.config
    if visual is not None:
      if ffn_extra is not None:
        raise ValueError("BertLayer: pass either visual or ffn_extra, not both")
      ffn_extra = functools.partial(object_fusion, visual, visual_mask)
    std = cfg.initializer_range
    heads = (cfg.num_heads, cfg.head_dim)

    def project(name):
      return dense(heads, ("embed",), ("heads", "kv"), std, self.dtype,
                   self.param_dtype, name)(h)

    q, k, v = project("query"), project("key"), project("value")
    ctx = multi_head_attention(self, q, k, v, attention_bias(attention_mask, self.dtype),
                               cfg.attention_dropout, deterministic, self.dtype)
    a = dense(cfg.hidden_size, ("heads", "kv"), ("embed",), std, self.dtype,
              self.param_dtype, "attention_output", axis=(-2, -1))(ctx)
    a = nn.Dropout(cfg.hidden_dropout)(a, deterministic=deterministic)
    a = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "attention_norm")(a + h)

    def ffn_dense(name):
      return dense(cfg.intermediate_size, ("embed",), ("mlp",), std, self.dtype,
                   self.param_dtype, name)

    pre = ffn_dense("intermediate")(a)
    if ffn_extra is not None:
      if callable(ffn_extra):
        ffn_extra = ffn_extra(ctx.reshape(ctx.shape[:2] + (-1,)))
      # A new layer (no BERT checkpoint has it): torch.nn.Linear's default init, as the
      # released code leaves it (docs/parity.md).
      kernel_init, bias_init = layers.torch_linear_init(cfg.hidden_size, ("embed", "mlp"))
      pre = pre + nn.DenseGeneral(
          cfg.intermediate_size, dtype=self.dtype, param_dtype=self.param_dtype,
          dot_general=layers.dot_general, kernel_init=kernel_init, bias_init=bias_init,
          name="fusion_dense")(ffn_extra)
    out = dense(cfg.hidden_size, ("mlp",), ("embed",), std, self.dtype,
                self.param_dtype, "output")(nn.gelu(pre, approximate=False))
    out = nn.Dropout(cfg.hidden_dropout)(out, deterministic=deterministic)
    out = layer_norm(cfg.layer_norm_eps, self.dtype, self.param_dtype, "output_norm")(out + a)
    return (out, (k, v)) if return_kv else out


class BertEncoder(nn.Module):
  """Embeddings + layers; returns the num_layers + 1 hidden states."""
  config: BertConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: bool = False   # recompute each layer's activations in the backward pass

  def setup(self):
    kw = {"config": self.config, "dtype": self.dtype, "param_dtype": self.param_dtype}
    self.embeddings = BertEmbeddings(**kw)
    # static: deterministic (3), ffn_extra (4, None or a function), return_kv (5);
    # call remat'd layers positionally.
    layer = nn.remat(BertLayer, static_argnums=(3, 4, 5)) if self.remat else BertLayer
    self.layers = [layer(**kw) for _ in range(self.config.num_layers)]

  def __call__(self, input_ids, token_type_ids, attention_mask, deterministic: bool):
    h = self.embeddings(input_ids, token_type_ids, deterministic)
    states = [h]
    for layer in self.layers:
      h = layer(h, attention_mask, deterministic)
      states.append(h)
    return tuple(states)
