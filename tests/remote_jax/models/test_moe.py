"""MMoE variants: routing, masks, stop-gradient, expert subsets, init, axes.

Every config is initialised and compiled once (`compiled`), and every test
reuses the same input shapes, so the file stays fast on a shared CPU.
"""
import functools
import itertools
import math
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remote_jax.models import moe as moe_lib
from remote_jax.models.layers import MultiHeadCrossAttention

D, B, LT = 8, 3, 5
LV = (5, 3)             # a patch level then a pooled object level
JT = 3                  # text levels (a different count on purpose)
ALL = "T,V,T2V,V2T"
# Tiny graphs: XLA's backend optimisations cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
ALLOWED_AXES = {"embed", "mlp", "joined_kv", "heads", "kv", "experts", "levels",
                "classes"}


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  text = [jnp.asarray(rng.normal(size=(B, LT, D)), jnp.float32) for _ in range(JT)]
  vision = [jnp.asarray(rng.normal(size=(B, n, D)), jnp.float32) for n in LV]
  lengths = np.array([LT, 2, 4])
  text_mask = jnp.asarray(np.arange(LT)[None] < lengths[:, None])
  vision_masks = []
  for n in LV:
    m = rng.random((B, n)) < 0.6
    m[:, 0] = True
    vision_masks.append(jnp.asarray(m))
  return text, text_mask, vision, vision_masks


# Module settings under test: eqs. 9-12 as written for "paper" (no residual, one routing
# per example, no router norm, no dropout), the released code's for "reference".
SETTINGS = {
    "paper": dict(experts=ALL, shared_projections=True, mask_keys=True, dropout_text=0.0,
                  dropout_vision=0.0, residual=False, route_by="example", router_norm=False,
                  balance_weight=0.0),
    "reference": dict(experts=ALL, mask_keys=False, dropout_text=0.1, dropout_vision=0.0),
    "off": {},
}


def build(variant, **cfg):
  cfg = dict(variant=variant, num_heads=2, dtype="float32", **{**SETTINGS[variant], **cfg})
  return moe_lib.make_moe(cfg, D, "moe")


@functools.cache
def init_params(variant, experts=ALL, shared_projections=True):
  """Parameters depend only on these; unsafe_rbg keys compile faster in tests."""
  module = build(variant, experts=experts, shared_projections=shared_projections)
  return jit(module.init)(jax.random.key(0, impl="unsafe_rbg"), *make_inputs())


@functools.cache
def compiled(variant, experts=ALL, shared_projections=True, **cfg):
  """module, params, forward(inputs) and grad(params, inputs), all jitted.

  forward returns (H_T, H_V, aux); jit cannot return the static expert names,
  so they are read off while tracing and put back into aux. grad gives
  ((loss, (H_T, H_V)), (d params, d text levels, d vision levels)) for
  loss = sum H_T^2 + sum H_V^2.
  """
  module = build(variant, experts=experts,
                 shared_projections=shared_projections, **cfg)
  params = init_params(variant, experts, shared_projections)
  names = {}

  def apply(params, *inputs):
    h_t, h_v, aux = module.apply(params, *inputs)
    names.update({k: aux.pop(k) for k in list(aux) if k.startswith("expert_names")})
    return h_t, h_v, aux

  def loss(params, text, text_mask, vision, vision_masks):
    h_t, h_v, _ = module.apply(params, text, text_mask, vision, vision_masks)
    return jnp.sum(h_t ** 2) + jnp.sum(h_v ** 2), (h_t, h_v)

  apply_jit = jit(apply)
  grad_jit = jit(jax.value_and_grad(loss, argnums=(0, 1, 3), has_aux=True))

  def forward(inputs, p=None):
    h_t, h_v, aux = apply_jit(params if p is None else p, *inputs)
    return h_t, h_v, {**aux, **names}

  return types.SimpleNamespace(
      module=module, params=params, forward=forward,
      grad=lambda inputs: grad_jit(params, *inputs))


def perturb_padding(inputs, seed=1):
  """Replaces every masked text token and padded vision token with noise."""
  text, text_mask, vision, vision_masks = inputs
  rng = np.random.default_rng(seed)
  noise = lambda x: jnp.asarray(100 * rng.normal(size=x.shape), x.dtype)
  text = [jnp.where(text_mask[..., None], t, noise(t)) for t in text]
  vision = [jnp.where(m[..., None], v, noise(v)) for v, m in zip(vision, vision_masks)]
  return text, text_mask, vision, vision_masks


def finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


def test_unknown_variant_and_experts_raise():
  with pytest.raises(ValueError, match=r"model\.moe\.variant.*'off'.*'paper'"):
    moe_lib.make_moe({"variant": "sparse"}, D)
  for variant in ("paper", "reference"):   # a config-time error, not one deep inside apply
    with pytest.raises(ValueError, match=rf"model\.moe\.num_heads={D + 1}: .*divides the width {D}"):
      moe_lib.make_moe({"variant": variant, "num_heads": D + 1}, D)
  with pytest.raises(ValueError, match=r"model\.moe\.experts"):
    build("paper", experts="T,X")
  with pytest.raises(ValueError, match=r"model\.moe\.experts"):
    build("paper", experts="")
  with pytest.raises(ValueError, match=r"only for model\.moe\.variant='paper'"):
    build("reference", experts="T")


def test_paper_router_is_a_distribution_over_all_experts():
  h_t, h_v, aux = compiled("paper").forward(make_inputs())
  names = ("V",) + tuple(f"V2T_{j}" for j in range(JT)) + tuple(
      f"T2V_{j}" for j in range(len(LV))) + ("T",)
  assert aux["expert_names"] == names
  assert aux["router"].shape == (B, len(names))
  np.testing.assert_allclose(aux["router"].sum(-1), 1.0, rtol=1e-6)
  assert h_t.shape == (B, LT, D) and h_v.shape == (B, LV[-1], D)
  assert finite((h_t, h_v))


def test_reference_routers_are_per_token_distributions():
  inputs = make_inputs()
  h_t, h_v, aux = compiled("reference").forward(inputs)
  assert h_t.shape == (B, LT, D) and h_v.shape == (B, LV[-1], D)
  assert aux["router_text"].shape == (B, LT, len(LV) + 1)
  assert aux["router_vision"].shape == (B, LV[-1], JT + 1)
  assert aux["router"].shape == (B, len(LV) + 1)
  assert aux["expert_names"] == ("T", "T2V_0", "T2V_1")
  assert aux["expert_names_vision"] == ("V", "V2T_0", "V2T_1", "V2T_2")
  for r in (aux["router_text"], aux["router_vision"], aux["router"]):
    np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-6)
  # aux["router"] is the mean over valid text tokens only.
  text_mask = np.asarray(inputs[1])
  want = [np.asarray(aux["router_text"])[b][text_mask[b]].mean(0) for b in range(B)]
  np.testing.assert_allclose(aux["router"], np.stack(want), rtol=1e-5)


def _valid_rows_equal(out_a, out_b, inputs):
  (ht_a, hv_a, aux_a), (ht_b, hv_b, aux_b) = out_a, out_b
  tm, vm = np.asarray(inputs[1]), np.asarray(inputs[3][-1])
  return (np.allclose(np.asarray(ht_a)[tm], np.asarray(ht_b)[tm], atol=1e-5)
          and np.allclose(np.asarray(hv_a)[vm], np.asarray(hv_b)[vm], atol=1e-5)
          and np.allclose(aux_a["router"], aux_b["router"], atol=1e-6))


@pytest.mark.parametrize("variant,cfg,invariant", [
    ("paper", {}, True),
    ("paper", {"shared_projections": False}, True),
    ("reference", {"mask_keys": True}, True),
    ("reference", {}, False),     # the released code attends padding
])
def test_padding_does_not_leak(variant, cfg, invariant):
  inputs = make_inputs()
  run = compiled(variant, **cfg).forward
  assert _valid_rows_equal(run(inputs), run(perturb_padding(inputs)), inputs) == invariant


@pytest.mark.parametrize("variant,cfg", [("paper", {}),
                                         ("reference", {"mask_keys": True})])
def test_all_masked_keys_stay_finite(variant, cfg):
  text, text_mask, vision, vision_masks = make_inputs()
  vision_masks = [vision_masks[0].at[0].set(False)] + vision_masks[1:]
  text_mask = text_mask.at[1].set(False)     # an example without valid text
  (value, outs), grads = compiled(variant, **cfg).grad(
      (text, text_mask, vision, vision_masks))
  assert finite((value, outs, grads))


def test_reference_stops_gradients_into_lower_levels_paper_does_not():
  inputs = make_inputs()
  _, (_, g_text, g_vision) = compiled("reference").grad(inputs)
  for g in g_text[:-1] + g_vision[:-1]:
    assert np.abs(g).max() == 0.0
  assert np.abs(g_text[-1]).max() > 0 and np.abs(g_vision[-1]).max() > 0
  _, (_, g_text, g_vision) = compiled("paper").grad(inputs)
  for g in g_text + g_vision:
    assert np.abs(g).max() > 0


# Singletons and the rows of paper table 5.
SUBSETS = ["T", "V", "T2V", "V2T", "T2V,V2T,T", "V2T,T,V", ALL]


def test_each_expert_subset_runs_and_changes_the_output():
  inputs = make_inputs()
  h_t, h_v, _ = compiled("off").forward(inputs)
  outs = {"off": np.concatenate([np.ravel(h_t), np.ravel(h_v)])}
  for experts in SUBSETS:
    c = compiled("paper", experts=experts)
    (_, (h_t, h_v)), grads = c.grad(inputs)
    assert finite(grads)
    if len(c.module.experts) > 1:     # a lone expert's router gets no gradient
      assert np.abs(grads[0]["params"]["router"]["kernel"].value).max() > 0
    outs[experts] = np.concatenate([np.ravel(h_t), np.ravel(h_v)])
  # A lone T (or V) expert gets weight 1 and the other side passes through:
  # exactly `off`. Every other subset changes the output.
  np.testing.assert_allclose(outs.pop("T"), outs["off"])
  np.testing.assert_allclose(outs.pop("V"), outs["off"])
  for a, b in itertools.combinations(outs, 2):
    assert not np.allclose(outs[a], outs[b], atol=1e-4), (a, b)


def test_subset_names_follow_eq11_order():
  assert build("paper", experts="T,V2T").expert_names(2, 3) == ("V2T_0", "V2T_1", "T")
  assert build("paper", experts="t2v, V").expert_names(2, 1) == ("V", "T2V_0")


def test_off_returns_the_top_levels():
  inputs = make_inputs()
  c = compiled("off")
  h_t, h_v, aux = c.forward(inputs)
  assert not jax.tree.leaves(c.params)
  np.testing.assert_array_equal(h_t, inputs[0][-1])
  np.testing.assert_array_equal(h_v, inputs[2][-1])
  assert aux["router"].shape == (B, 0) and aux["expert_names"] == ()


def test_residual_adds_the_top_levels_to_the_eq12_mix():
  inputs = make_inputs()
  h_t, h_v, aux = compiled("paper").forward(inputs)
  r_t, r_v, r_aux = compiled("paper", residual=True).forward(inputs)   # same params
  np.testing.assert_allclose(r_t, np.asarray(h_t) + np.asarray(inputs[0][-1]), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(r_v, np.asarray(h_v) + np.asarray(inputs[2][-1]), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_array_equal(r_aux["router"], aux["router"])


def test_shared_projections_share_weights():
  shared = compiled("paper").params["params"]
  per_level = compiled("paper", shared_projections=False).params["params"]
  assert {"v2t_attn", "t2v_attn", "router"} == set(shared)
  assert {f"v2t_attn_{j}" for j in range(JT)} | {
      f"t2v_attn_{j}" for j in range(len(LV))} | {"router"} == set(per_level)
  assert "out" not in shared["v2t_attn"]                  # eqs. 9-10: F = A H
  assert "bias" not in shared["v2t_attn"]["query"]


def test_reference_init_is_torch_style():
  text = nn.meta.unbox(compiled("reference").params["params"])["text"]
  j = len(LV)
  w1, w2 = text["expert_in"], text["expert_out"]
  assert w1.shape == (j, 2 * D, D) and w2.shape == (j, D, D)
  for w in (w1, w2):
    bound = math.sqrt(6.0 / (w.shape[1] * w.shape[2] + w.shape[0] * w.shape[2]))
    assert 0.7 * bound < np.abs(w).max() <= bound
  router = text["router"]
  assert router["kernel"].shape == ((j + 1) * D, j + 1)
  bound = 1 / math.sqrt((j + 1) * D)
  assert 0.7 * bound < np.abs(router["kernel"]).max() <= bound
  assert np.abs(router["bias"]).max() <= bound       # only J+1 draws
  assert "bias" in text["attn_0"]["query"] and "out" in text["attn_0"]
  np.testing.assert_array_equal(text["norm_0"]["scale"], 1.0)


def test_reference_attention_dropout_is_text_only():
  inputs = make_inputs()
  c = compiled("reference")          # dropout_text 0.1, dropout_vision 0.0
  fn = jit(lambda key: c.module.apply(
      c.params, *inputs, deterministic=False, rngs={"dropout": key})[:2])
  outs = [fn(jax.random.key(s)) for s in (1, 2)]
  assert not np.allclose(outs[0][0], outs[1][0])
  np.testing.assert_allclose(outs[0][1], outs[1][1])


@pytest.mark.parametrize("variant", ["paper", "reference"])
def test_params_carry_allowed_logical_axes(variant):
  leaves = jax.tree.leaves(compiled(variant).params["params"],
                           is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim
    assert set(leaf.names) <= ALLOWED_AXES and len(set(leaf.names)) == len(leaf.names)


def test_wrong_width_raises():
  text, text_mask, vision, vision_masks = make_inputs()
  vision = [vision[0][..., :4]] + vision[1:]
  module = build("paper")
  with pytest.raises(ValueError, match=r"vision level 0"):
    jax.eval_shape(lambda *a: module.init(jax.random.key(0), *a),
                   text, text_mask, vision, vision_masks)


def test_cross_attention_masks_keys_and_zeroes_rows_without_keys():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 3, D)), jnp.float32)
  src = jnp.asarray(rng.normal(size=(2, 4, D)), jnp.float32)
  mask = jnp.array([[True, True, False, False], [False] * 4])
  attn = MultiHeadCrossAttention(num_heads=2, use_bias=False, out_proj=False)
  params = attn.init(jax.random.key(0), q, src, mask)
  out = attn.apply(params, q, src, mask)
  np.testing.assert_array_equal(out[1], 0.0)       # no valid key at all
  noisy = src.at[0, 2:].set(1e3)
  np.testing.assert_allclose(attn.apply(params, q, noisy, mask)[0], out[0], atol=1e-6)
