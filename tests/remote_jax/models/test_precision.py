"""Precision and memory switches of the REMOTE model (issue 6): the bfloat16 path
computes in bf16 with float32 parameters, keeps every OT block (cost, Sinkhorn,
plan) in float32 and stays finite; rematerialised encoder layers give the same
loss and gradients as stored activations."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remote_jax.models import remote
from tests.conftest import C, jit, make_batch, micro_config, random_params

_COMPILED = {}   # (config, capture): (model, jitted value-and-grad), shared by tests


def _build(cfg, capture):
  model = remote.build(cfg, C, 2100)

  def loss(p, batch):
    # Sown OT plans always land in "intermediates"; `capture` adds the first layers' outputs.
    pick = (lambda mdl, _: mdl.name == "layers_0") if capture else False
    out = model.apply({"params": p}, batch, deterministic=True,
                      capture_intermediates=pick, mutable=["intermediates"])
    (logits, _), state = out
    labels = jnp.asarray(batch["label"])
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).mean()
    return ce, (logits, state["intermediates"])

  return model, jit(jax.value_and_grad(loss, has_aux=True))


def loss_and_grads(cfg, batch, capture=False):
  key = (cfg.to_json(), capture)
  if key not in _COMPILED:
    _COMPILED[key] = _build(cfg, capture)
  model, value_and_grad = _COMPILED[key]
  params = random_params(model, batch, std=0.02)   # init would compile ~9 s
  (value, (logits, inter)), grads = value_and_grad(params, batch)
  return params, value, logits, inter, grads


def leaves_named(tree, word):
  return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
          if word in jax.tree_util.keystr(p)]


# The MoE's cross-attention is plain attention like the encoders': off, it saves ~20 s.
NO_MOE = {"moe.variant": "off"}


def test_bf16_path_keeps_ot_in_float32_and_stays_finite():
  batch = make_batch(b=2)
  batch["label"] = np.array([1, 3], np.int32)
  cfg = micro_config("paper", dtype="bfloat16", **NO_MOE)
  params, value, logits, inter, grads = loss_and_grads(cfg, batch, capture=True)
  assert np.isfinite(float(value)) and logits.dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert all(x.dtype == jnp.float32 and bool(jnp.isfinite(x).all())
             for x in jax.tree.leaves(grads))
  # The encoders really compute in bf16 ...
  layers = leaves_named(inter, "text']['layers_0']['__call__")
  assert layers and all(x.dtype == jnp.bfloat16 for _, x in layers)
  # ... and every OT plan (text and vision, every level) is float32 and a transport plan.
  plans = leaves_named(inter, "['plan']")
  assert len(plans) == 2 * cfg.text.num_layers, [p for p, _ in plans]
  for path, plan in plans:
    assert plan.dtype == jnp.float32, path
    assert bool(jnp.isfinite(plan).all()) and float(plan.min()) >= 0.0, path


@pytest.mark.slow   # one more compile of the model (~35 s on 2 cores)
def test_bf16_stays_close_to_float32_with_the_same_parameters():
  batch = make_batch(b=2)
  batch["label"] = np.array([1, 3], np.int32)
  _, _, logits, _, _ = loss_and_grads(micro_config("paper", dtype="bfloat16", **NO_MOE), batch)
  _, _, logits32, _, _ = loss_and_grads(micro_config("paper", **NO_MOE), batch)
  np.testing.assert_allclose(logits, logits32, atol=0.1, rtol=0.1)


@pytest.mark.slow   # about a minute on 2 cores; the fast suite stays under CI's budget
def test_remat_gives_the_same_loss_and_gradients():
  batch = make_batch(b=2)
  batch["label"] = np.array([0, 2], np.int32)
  _, v0, _, _, g0 = loss_and_grads(micro_config("paper"), batch)
  _, v1, _, _, g1 = loss_and_grads(micro_config("paper", remat=True), batch)
  np.testing.assert_allclose(float(v1), float(v0), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g0)


def test_bf16_dense_matmuls_accumulate_in_float32_both_ways():
  """layers.dot_general (every encoder Dense): bf16 operands, float32
  accumulation, bf16 result, in the forward and in both backward matmuls;
  exactly what an f32-accumulating bf16 matmul gives, not the bf16-output
  lax.dot_general that XLA:CPU runs by upcasting to f32."""
  from remote_jax.models import layers
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(64, 4, 8)), jnp.bfloat16)   # DenseGeneral (heads, kv)
  ct = jnp.asarray(rng.normal(size=(3, 5, 4, 8)), jnp.bfloat16)
  dims = (((2,), (0,)), ((), ()))
  f32 = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)

  out, vjp = jax.vjp(lambda x, w: layers.dot_general(x, w, dims), x, w)
  assert out.dtype == jnp.bfloat16 and out.shape == (3, 5, 4, 8)
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(f32(x, w, dims).astype(jnp.bfloat16), np.float32))
  dx, dw = vjp(ct)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  want_dx = f32(ct.reshape(15, 32), w.reshape(64, 32), (((1,), (1,)), ((), ())))
  want_dw = f32(x.reshape(15, 64), ct.reshape(15, 32), (((0,), (0,)), ((), ())))
  np.testing.assert_array_equal(np.asarray(dx, np.float32),
                                np.asarray(want_dx.astype(jnp.bfloat16).reshape(3, 5, 64), np.float32))
  np.testing.assert_array_equal(np.asarray(dw, np.float32),
                                np.asarray(want_dw.astype(jnp.bfloat16).reshape(64, 4, 8), np.float32))
  # float32 operands and batched contractions are plain lax.dot_general
  xf, wf = x.astype(jnp.float32), w.astype(jnp.float32)
  np.testing.assert_array_equal(layers.dot_general(xf, wf, dims), jax.lax.dot_general(xf, wf, dims))
  bdims = (((2,), (1,)), ((0,), (0,)))
  a, b = x, jnp.asarray(rng.normal(size=(3, 64, 7)), jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(layers.dot_general(a, b, bdims), np.float32),
                                np.asarray(jax.lax.dot_general(a, b, bdims), np.float32))
