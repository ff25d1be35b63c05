"""Multimodal mixture of experts (paper sec. 5.3, eqs. 9-12) and the released variant.

`MMOE[variant](cfg, dim, name)` builds a module called as
`moe(text_levels, text_mask, vision_levels, vision_masks, deterministic)
-> (H_T (B,Lt,D), H_V (B,Lv_top,D), aux)`. The last entry of each level list
is the top level; vision levels may differ in length (patch vs object tokens).

Paper naming: V2T_j = top vision level (queries) over text level j
(vision-shaped); T2V_j = top text level over vision level j (text-shaped).

cfg keys (model.moe, every one set by configs/common.py:model_config): variant,
experts ("T,V,T2V,V2T" subsets, paper only), num_heads (1 = eqs. 9-10 as
written), shared_projections (paper), mask_keys (key masks in the
cross-attention; False = the released code), dropout_text / dropout_vision
(attention dropout when text / vision tokens are the queries), residual,
route_by, router_norm, balance_weight (paper only), dtype.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from remote_jax.models.layers import (
  ACTIVATIONS,
  DTYPES,
  MultiHeadCrossAttention,
  TorchDense,
  gather_rows,
  layer_norm,
  masked_mean,
  torch_xavier_uniform,
)

Dtype = Any
EXPERT_GROUPS = ("V", "V2T", "T2V", "T")   # the order of eq. 11


def parse_experts(spec: str) -> tuple[str, ...]:
  """"T,V2T" -> ("V2T", "T") in eq. 11 order; unknown or empty names raise."""
  names = {s.strip().upper() for s in str(spec).split(",") if s.strip()}
  bad = names - set(EXPERT_GROUPS)
  if bad or not names:
    raise ValueError(
        f"model.moe.experts={spec!r}: use a comma list of {list(EXPERT_GROUPS)}"
        " (for no experts at all use model.moe.variant='off')")
  return tuple(g for g in EXPERT_GROUPS if g in names)


ROUTE_BY = ("triplet", "example")
TRIPLET_FIELDS = ("head_marker", "tail_marker", "head_obj", "tail_obj", "obj_mask")


def _mean_present(rows, present, fallback):
  """Mean of the present rows ((B,D) each, present (B,) bool); `fallback` where none is."""
  w = jnp.stack(present, 0).astype(rows[0].dtype)[..., None]           # (S,B,1)
  total = jnp.sum(jnp.stack(rows, 0) * w, 0)
  count = jnp.sum(w, 0)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), fallback)


def pool_text_for_triplet(f, text_mask, triplet):
  """(B,L,D) -> (B,D): the triplet's marker rows (<s>/<o> of head and tail), averaged;
  the mean over valid tokens where neither marker survived truncation."""
  idx = [jnp.asarray(triplet[k], jnp.int32) for k in ("head_marker", "tail_marker")]
  return _mean_present([gather_rows(f, i) for i in idx], [i >= 0 for i in idx],
                       masked_mean(f, text_mask))


def pool_vision_for_triplet(f, v_mask, triplet):
  """(B,K*T,D) -> (B,D): the mean of the triplet's objects' tokens (head and/or tail
  object); the mean over every valid object where the triplet has none (entity-entity)."""
  obj_mask = triplet["obj_mask"]
  b, n, d = f.shape
  k = obj_mask.shape[1]
  per_obj = masked_mean(f.reshape(b, k, n // k, d), v_mask.reshape(b, k, n // k), axis=2)
  idx = [jnp.asarray(triplet[key], jnp.int32) for key in ("head_obj", "tail_obj")]
  return _mean_present([gather_rows(per_obj, i) for i in idx], [i >= 0 for i in idx],
                       masked_mean(per_obj, obj_mask))


def router_balance(router):
  """KL(mean routing over the batch || uniform): 0 when the experts are used equally on
  average, log(E) when one expert takes everything (a soft load-balancing term)."""
  load = jnp.mean(router, axis=0)
  e = router.shape[-1]
  return jnp.sum(load * (jnp.log(jnp.maximum(load, 1e-9)) + jnp.log(e)))


def _check_inputs(dim, text_levels, text_mask, vision_levels, vision_masks):
  if not text_levels or not vision_levels:
    raise ValueError("moe: need at least one text and one vision level")
  if len(vision_masks) != len(vision_levels):
    raise ValueError(f"moe: {len(vision_levels)} vision levels but "
                     f"{len(vision_masks)} vision masks")
  for kind, levels in (("text", text_levels), ("vision", vision_levels)):
    for j, x in enumerate(levels):
      if x.ndim != 3 or x.shape[-1] != dim:
        raise ValueError(f"moe: {kind} level {j} has shape {x.shape}, "
                         f"expected (B, L, {dim})")
  for j, (x, m) in enumerate(zip(vision_levels, vision_masks)):
    if m.shape != x.shape[:2]:
      raise ValueError(f"moe: vision mask {j} {m.shape} != level {x.shape[:2]}")
  if text_mask.shape != text_levels[-1].shape[:2]:
    raise ValueError(f"moe: text mask {text_mask.shape} != "
                     f"{text_levels[-1].shape[:2]}")


class PaperMMoE(nn.Module):
  """Eqs. 9-12: hierarchical cross-attention experts and one dense router.

  Eq. 11 concatenates experts of different shapes (text- and vision-shaped)
  before the mapping P, so it can only be read per example: every expert is
  mean-pooled over its valid tokens (text mask or top vision mask), the pooled
  vectors are concatenated (E*D) and P (with bias, like the released router)
  gives one softmax over all enabled experts per example, i.e. the "select for
  each triplet" of the text. Eq. 12's single sum is split by shape:
  H_T = S_T F_T + sum_j S_T2V_j T2V_j and H_V = S_V F_V + sum_j S_V2T_j V2T_j,
  so the weights of one side sum to less than 1 when both sides have experts.
  A side with no enabled expert passes its top level through unchanged.
  `residual`: H_V = F_V + (the mix above), likewise H_T. Eq. 12 read literally
  (residual=False) leaves an object's identity only in S_V F_V, next to V2T
  experts that carry text content for every object alike; on the demo world's
  object-object relations it generalises worst (bench/triplet_probe.py, README).
  The released code's experts carry the query as a residual, which
  `residual=True` mirrors.

  `route_by`: "triplet" (default for the paper: "select the most relevant experts
  for each triplet") pools every expert at the triplet's own positions, its head
  and tail markers for text-shaped experts and its head/tail objects' tokens for
  vision-shaped ones, so two triplets of one example get different weights;
  "example" pools over all valid tokens (one routing per example: on the demo it
  collapsed onto T with logits nearly constant across examples). `router_norm`
  LayerNorms each pooled vector before P, so no expert wins by its scale alone.
  aux["router"]: (B, E) over aux["expert_names"]; aux["aux_loss"]:
  `balance_weight` * router_balance (0 for the paper, which has no such term).
  """
  dim: int
  experts: tuple[str, ...]
  num_heads: int
  shared_projections: bool
  mask_keys: bool
  dropout_text: float
  dropout_vision: float
  residual: bool
  route_by: str
  router_norm: bool
  balance_weight: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def expert_names(self, num_text_levels: int, num_vision_levels: int):
    """Names of aux["router"]'s columns; static, usable outside jit."""
    names = {"V": ["V"], "T": ["T"],
             "V2T": [f"V2T_{j}" for j in range(num_text_levels)],
             "T2V": [f"T2V_{j}" for j in range(num_vision_levels)]}
    return tuple(n for g in self.experts for n in names[g])

  def _cross(self, direction, queries, levels, masks, dropout, deterministic):
    """One expert per level: `queries` over each level (eqs. 9-10)."""
    def attention(name):
      return MultiHeadCrossAttention(
          num_heads=self.num_heads, use_bias=False, out_proj=False,
          dropout_rate=dropout, dtype=self.dtype, param_dtype=self.param_dtype,
          name=name)
    shared = attention(f"{direction}_attn") if self.shared_projections else None
    out = []
    for j, (level, mask) in enumerate(zip(levels, masks)):
      attn = shared if shared is not None else attention(f"{direction}_attn_{j}")
      out.append(attn(queries, level, mask if self.mask_keys else None,
                      deterministic=deterministic))
    return out

  @nn.compact
  def __call__(self, text_levels, text_mask, vision_levels, vision_masks,
               deterministic=True, triplet=None):
    _check_inputs(self.dim, text_levels, text_mask, vision_levels, vision_masks)
    if self.route_by not in ROUTE_BY:
      raise ValueError(f"model.moe.route_by={self.route_by!r}: allowed {list(ROUTE_BY)}")
    if self.route_by == "triplet" and (
        triplet is None or any(k not in triplet for k in TRIPLET_FIELDS)):
      raise ValueError(f"model.moe.route_by='triplet' needs the batch fields {TRIPLET_FIELDS}")
    f_t, f_v, v_mask = text_levels[-1], vision_levels[-1], vision_masks[-1]
    feats = {"V": [f_v], "T": [f_t]}
    if "V2T" in self.experts:
      feats["V2T"] = self._cross("v2t", f_v, text_levels,
                                 [text_mask] * len(text_levels),
                                 self.dropout_vision, deterministic)
    if "T2V" in self.experts:
      feats["T2V"] = self._cross("t2v", f_t, vision_levels, vision_masks,
                                 self.dropout_text, deterministic)
    vision_side = [f for g in ("V", "V2T") if g in self.experts for f in feats[g]]
    text_side = [f for g in ("T2V", "T") if g in self.experts for f in feats[g]]
    if self.route_by == "triplet":
      pooled = ([pool_vision_for_triplet(f, v_mask, triplet) for f in vision_side]
                + [pool_text_for_triplet(f, text_mask, triplet) for f in text_side])
    else:
      pooled = ([masked_mean(f, v_mask) for f in vision_side]
                + [masked_mean(f, text_mask) for f in text_side])
    if self.router_norm:   # one shared LayerNorm: every expert enters P at unit scale
      norm = layer_norm(1e-5, self.dtype, self.param_dtype, "router_norm")
      pooled = [norm(p) for p in pooled]
    logits = TorchDense(len(pooled), kernel_axes=("embed", "experts"),
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        name="router")(jnp.concatenate(pooled, axis=-1))
    router = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)   # (B, E)

    def mix(experts, weights, top):
      if not experts:
        return top
      w = weights.astype(top.dtype)
      mixed = sum(w[:, i, None, None] * f for i, f in enumerate(experts))
      return top + mixed if self.residual else mixed

    h_v = mix(vision_side, router[:, :len(vision_side)], f_v)
    h_t = mix(text_side, router[:, len(vision_side):], f_t)
    names = self.expert_names(len(text_levels), len(vision_levels))
    aux_loss = (self.balance_weight * router_balance(router) if self.balance_weight
                else jnp.zeros((), jnp.float32))
    return h_t, h_v, {"router": router, "expert_names": names, "aux_loss": aux_loss}


class ReferenceSide(nn.Module):
  """One of the released per-modality blocks (reference_remote.md 3.5).

  C_j = LayerNorm(MHA_j(Q, stop_gradient(source_j))) per level, no residual;
  per-token router r = softmax(Dense([Q; C_0..C_{J-1}])) over J+1 experts;
  E_n = Q + W2_n act(W1_n [Q; C_n]) (no biases); out = r_0 Q + sum_n r_{n+1} E_n.
  Returns (out (B,n,D), router (B,n,J+1)).
  """
  num_heads: int
  dropout_rate: float
  activation: str
  mask_keys: bool
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query, sources, source_masks, deterministic=True):
    d = query.shape[-1]
    cross = []
    for j, (src, mask) in enumerate(zip(sources, source_masks)):
      c = MultiHeadCrossAttention(
          num_heads=self.num_heads, dropout_rate=self.dropout_rate,
          dtype=self.dtype, param_dtype=self.param_dtype, name=f"attn_{j}")(
              query, jax.lax.stop_gradient(src),
              mask if self.mask_keys else None, deterministic=deterministic)
      cross.append(layer_norm(1e-5, self.dtype, self.param_dtype, f"norm_{j}")(c))
    num = len(cross)
    logits = TorchDense(num + 1, kernel_axes=("embed", "experts"),
                        dtype=self.dtype, param_dtype=self.param_dtype,
                        name="router")(jnp.concatenate([query] + cross, axis=-1))
    router = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w1 = self.param("expert_in", nn.with_logical_partitioning(
        torch_xavier_uniform, ("experts", "embed", "mlp")),
        (num, 2 * d, d), self.param_dtype).astype(self.dtype)
    w2 = self.param("expert_out", nn.with_logical_partitioning(
        torch_xavier_uniform, ("experts", "mlp", "embed")),
        (num, d, d), self.param_dtype).astype(self.dtype)
    c = jnp.stack(cross)                                          # (J,B,n,D)
    x = jnp.concatenate([jnp.broadcast_to(query, c.shape), c], axis=-1)
    hidden = ACTIVATIONS[self.activation](jnp.einsum("jbnk,jkd->jbnd", x, w1))
    experts = query + jnp.einsum("jbnd,jde->jbne", hidden, w2)
    r = router.astype(self.dtype)
    out = r[..., :1] * query + jnp.einsum("bnj,jbnd->bnd", r[..., 1:], experts)
    return out, router


class ReferenceMMoE(nn.Module):
  """The released code: two separate per-token MoE blocks (ref. 3.5).

  Text side: top text level over every vision level (the paper's T2V), exact
  GELU, attention dropout `dropout_text`; vision side: top vision level over
  every text level (V2T), quick_gelu, `dropout_vision`. Keys are unmasked
  unless mask_keys. aux: router_text (B,Lt,Jv+1), router_vision (B,Lv,Jt+1),
  router = the text router averaged over each example's valid text tokens
  (B,Jv+1) (zeros for an example without any), expert_names its names
  ("T", "T2V_0", ...), expert_names_vision ("V", "V2T_0", ...).
  """
  dim: int
  num_heads: int
  mask_keys: bool
  dropout_text: float
  dropout_vision: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def expert_names(self, num_text_levels: int, num_vision_levels: int):
    """Names of aux["router"]'s columns (the text block's experts)."""
    del num_text_levels
    return ("T",) + tuple(f"T2V_{j}" for j in range(num_vision_levels))

  @nn.compact
  def __call__(self, text_levels, text_mask, vision_levels, vision_masks,
               deterministic=True, triplet=None):
    del triplet   # routes per token
    _check_inputs(self.dim, text_levels, text_mask, vision_levels, vision_masks)
    side = lambda name, dropout, act: ReferenceSide(
        num_heads=self.num_heads, dropout_rate=dropout, activation=act,
        mask_keys=self.mask_keys, dtype=self.dtype, param_dtype=self.param_dtype,
        name=name)
    h_t, r_t = side("text", self.dropout_text, "gelu")(
        text_levels[-1], vision_levels, vision_masks, deterministic)
    h_v, r_v = side("vision", self.dropout_vision, "quick_gelu")(
        vision_levels[-1], text_levels, [text_mask] * len(text_levels),
        deterministic)
    return h_t, h_v, {
        "router": masked_mean(r_t, text_mask),
        "router_text": r_t, "router_vision": r_v,
        "expert_names": self.expert_names(len(text_levels), len(vision_levels)),
        "expert_names_vision": ("V",) + tuple(
            f"V2T_{j}" for j in range(len(text_levels))),
    }


class NoMMoE(nn.Module):
  """`off`: the top levels pass through; the router is empty (B, 0)."""
  dim: int

  def expert_names(self, num_text_levels: int, num_vision_levels: int):
    del num_text_levels, num_vision_levels
    return ()

  def __call__(self, text_levels, text_mask, vision_levels, vision_masks,
               deterministic=True, triplet=None):
    del triplet
    _check_inputs(self.dim, text_levels, text_mask, vision_levels, vision_masks)
    b = text_levels[-1].shape[0]
    return text_levels[-1], vision_levels[-1], {
        "router": jnp.zeros((b, 0), jnp.float32), "expert_names": ()}


def _common(cfg, dim, name):
  dtype = cfg["dtype"]
  return {"dim": dim, "name": name, "dtype": DTYPES.get(dtype, dtype)}


def build_paper(cfg: dict, dim: int, name: str) -> nn.Module:
  return PaperMMoE(
      experts=parse_experts(cfg["experts"]), num_heads=cfg["num_heads"],
      shared_projections=cfg["shared_projections"], mask_keys=cfg["mask_keys"],
      dropout_text=cfg["dropout_text"], dropout_vision=cfg["dropout_vision"],
      residual=cfg["residual"], route_by=cfg["route_by"], router_norm=cfg["router_norm"],
      balance_weight=float(cfg["balance_weight"]), **_common(cfg, dim, name))


def build_reference(cfg: dict, dim: int, name: str) -> nn.Module:
  if parse_experts(cfg["experts"]) != EXPERT_GROUPS:
    raise ValueError(f"model.moe.experts={cfg['experts']!r}: expert subsets "
                     "exist only for model.moe.variant='paper'")
  return ReferenceMMoE(
      num_heads=cfg["num_heads"], mask_keys=cfg["mask_keys"], dropout_text=cfg["dropout_text"],
      dropout_vision=cfg["dropout_vision"], **_common(cfg, dim, name))


def build_off(cfg: dict, dim: int, name: str) -> nn.Module:
  del cfg
  return NoMMoE(dim=dim, name=name)


MMOE = {"paper": build_paper, "reference": build_reference, "off": build_off}


def make_moe(cfg: dict, dim: int, name: str = "moe") -> nn.Module:
  variant = cfg.get("variant")
  if variant not in MMOE:
    raise ValueError(f"model.moe.variant={variant!r}: allowed {sorted(MMOE)}")
  heads = cfg.get("num_heads")
  if variant != "off" and (not isinstance(heads, int) or heads < 1 or dim % heads):
    raise ValueError(f"model.moe.num_heads={heads!r}: must be a positive integer that "
                     f"divides the width {dim} (the text encoder's hidden_size)")
  return MMOE[variant](cfg, dim, name)

