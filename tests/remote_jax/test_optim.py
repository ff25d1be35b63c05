"""Optimizer: schedule values, AdamW arithmetic, groups, freezing, accumulation."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from remote_jax import optim


def full(cfg):
  """config.optim with `cfg`'s keys changed."""
  return common.optim_config(**cfg)


class Tiny(nn.Module):
  """Real flax paths: text/Dense_0, text/LayerNorm_0, head/mm_linear, head/classifier."""

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name="LayerNorm_0")(nn.Dense(4, name="Dense_0")(x))
    return nn.Dense(2, name="classifier")(nn.Dense(4, name="mm_linear")(h))


def tiny_params():
  p = Tiny().init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  return {"text": {k: p[k] for k in ("Dense_0", "LayerNorm_0")},
          "head": {k: p[k] for k in ("mm_linear", "classifier")}}


def run(tx, params, grads, n):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(n):
    u, state = update(grads, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def test_linear_schedule_matches_hf_at_known_steps():
  s = optim.make_schedule(1.0, total_steps=100, warmup_ratio=0.1)
  # warmup 10: step/10 before, then (100 - step)/90.
  for step, want in [(0, 0.0), (5, 0.5), (10, 1.0), (55, 0.5), (100, 0.0), (130, 0.0)]:
    assert float(s(step)) == pytest.approx(want, abs=1e-6), step
  # Float warmup as in the reference: 0.06 * 50 = 3.0 steps.
  s = optim.make_schedule(2.0, total_steps=50, warmup_ratio=0.06)
  assert float(s(1)) == pytest.approx(2.0 / 3.0)
  assert float(s(26)) == pytest.approx(2.0 * (50 - 26) / 47)


def test_make_optimizer_returns_its_schedule():
  _, sched = optim.make_optimizer(full({"lr": 3e-5, "warmup_ratio": 0.5}), tiny_params(), 20)
  assert float(sched(5)) == pytest.approx(1.5e-5) and float(sched(10)) == pytest.approx(3e-5)


def first_update(decay_mask):
  params = {"w": jnp.full((2, 2), 2.0), "b": jnp.full((2,), 2.0)}
  grads = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.5), params)
  cfg = {"lr": 0.1, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.01,
         "decay_mask": decay_mask}
  tx, _ = optim.make_optimizer(full(cfg), params, 10)
  new, _ = run(tx, params, grads, 1)
  return jax.tree_util.tree_map(lambda a, b: float((a - b).reshape(-1)[0]), new, params)


def test_adamw_first_step_and_decay_mask():
  # First Adam step: m_hat = g, v_hat = g^2 -> g / (|g| + 1e-8) = 1 (to 2e-8);
  # decoupled decay adds wd * p = 0.01 * 2: delta = -0.1 * (1 + 0.02).
  d = first_update("all")
  assert d["w"] == pytest.approx(-0.102, abs=1e-6) and d["b"] == pytest.approx(-0.102, abs=1e-6)
  d = first_update("no_bias_norm")
  assert d["w"] == pytest.approx(-0.102, abs=1e-6) and d["b"] == pytest.approx(-0.1, abs=1e-6)


def test_decay_mask_on_flax_paths():
  m = optim.decay_mask(tiny_params(), "no_bias_norm")
  assert m["text"]["Dense_0"] == {"kernel": True, "bias": False}
  assert m["text"]["LayerNorm_0"] == {"scale": False, "bias": False}
  with pytest.raises(ValueError, match="decay_mask"):
    optim.decay_mask(tiny_params(), "some")


def test_frozen_params_unchanged_others_change():
  params = tiny_params()
  cfg = {"lr": 1e-2, "warmup_steps": 0, "schedule": "constant",
         "frozen_patterns": ("head/mm_linear", "head/classifier")}
  tx, _ = optim.make_optimizer(full(cfg), params, 10)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  new, _state = run(tx, params, grads, 3)
  for name in ("mm_linear", "classifier"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, new["head"][name], params["head"][name])
  for leaf_new, leaf_old in zip(jax.tree_util.tree_leaves(new["text"]),
                                jax.tree_util.tree_leaves(params["text"])):
    assert not np.allclose(leaf_new, leaf_old)
  summary = optim.group_summary(full(cfg), params)
  assert summary["frozen"] == {"tensors": 4, "params": 4 * 4 + 4 + 4 * 2 + 2}
  assert summary["default"]["tensors"] == 4


def test_group_lr_mult_and_validation():
  params = tiny_params()
  cfg = {"lr": 0.1, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
         "groups": {"bert": {"pattern": "^text/", "lr_mult": 2.0},
                    "head": {"pattern": "^head/", "lr_mult": 0.5}}}
  tx, _ = optim.make_optimizer(full(cfg), params, 10)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  new, _ = run(tx, params, grads, 1)
  delta = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new, params)
  # |first Adam step| = lr * mult (grads of 1 normalise to 1).
  assert delta["text"]["Dense_0"]["kernel"] == pytest.approx(0.2, abs=1e-5)
  assert delta["head"]["classifier"]["kernel"] == pytest.approx(0.05, abs=1e-5)

  bad = {**cfg, "groups": {"bert": {"pattern": "^text/", "lr_mul": 2.0}}}
  with pytest.raises(ValueError, match=r"'bert'.*lr_mul"):
    optim.make_optimizer(full(bad), params, 10)
  bad = {**cfg, "groups": {"clip": {"pattern": "^vision/"}}}
  with pytest.raises(ValueError, match="match no parameter.*clip"):
    optim.make_optimizer(full(bad), params, 10)
  with pytest.raises(ValueError, match="match no parameter.*head/mm_linaer"):
    optim.make_optimizer(full({"frozen_patterns": ("head/mm_linaer",)}), params, 10)
  with pytest.raises(ValueError, match="unknown key.*warmup"):
    optim.make_optimizer(full({"warmup": 0.1}), params, 10)
  overlap = {"groups": {"a": {"pattern": "^text/"}, "b": {"pattern": "Dense"}}}
  with pytest.raises(ValueError, match="matches optim groups"):
    optim.make_optimizer(full(overlap), params, 10)
  # An ordered sequence makes "first match wins" explicit.
  ordered = {"groups": [("a", {"pattern": "^text/"}), ("b", {"pattern": "kernel$"})]}
  labels = optim.param_labels(full(ordered), params)
  assert labels["text"]["Dense_0"]["kernel"] == "a"
  assert labels["head"]["mm_linear"]["kernel"] == "b"


def test_clipping_ignores_frozen_grads():
  params = {"w": jnp.zeros((2,)), "frozen": jnp.zeros((2,))}
  grads = {"w": jnp.array([3.0, 4.0]), "frozen": jnp.array([100.0, 0.0])}
  cfg = {"frozen_patterns": ("frozen",), "clip_norm": 1.0, "warmup_steps": 0}
  tx, _ = optim.make_optimizer(full(cfg), params, 10)
  _, state = tx.update(grads, tx.init(params), params)
  # Norm of the trained grads is 5 -> clipped to [0.6, 0.8]; mu = (1 - b1) * g.
  mu = optax.tree_utils.tree_get(state, "mu")
  np.testing.assert_allclose(mu["w"], [0.06, 0.08], rtol=1e-6)


def test_grad_accumulation_equals_one_step_on_the_mean():
  params = {"w": jnp.ones((3,)), "k": jnp.ones((2, 2))}
  g1 = {"w": jnp.array([1.0, -2.0, 3.0]), "k": jnp.full((2, 2), 0.5)}
  g2 = {"w": jnp.array([3.0, 2.0, -1.0]), "k": jnp.full((2, 2), 1.5)}
  base = {"lr": 0.1, "warmup_steps": 0, "schedule": "constant"}
  tx, _ = optim.make_optimizer(full({**base, "grad_accum": 2}), params, 10)
  state = tx.init(params)
  u, state = tx.update(g1, state, params)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(u))
  p_acc = optax.apply_updates(params, u)
  u, state = tx.update(g2, state, p_acc)
  p_acc = optax.apply_updates(p_acc, u)
  tx1, _ = optim.make_optimizer(full(base), params, 10)
  mean = jax.tree_util.tree_map(lambda a, b: (a + b) / 2, g1, g2)
  p_one, _ = run(tx1, params, mean, 1)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), p_acc, p_one)


def test_layer_decay_scales_each_text_layer_and_the_embeddings():
  w = lambda: {"kernel": jnp.ones((2, 2))}
  params = {"text": {"embeddings": {"word": w()}, "layers_0": w(), "layers_1": w(),
                     "layers_2": w()},
            "head": w(), "mot_text_1": w()}
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  cfg = {"lr": 0.1, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
         "layer_decay": 0.5, "groups": {"new": {"pattern": "^(head|mot_)", "lr_mult": 10.0}}}
  tx, _ = optim.make_optimizer(full(cfg), params, 10)
  new, _ = run(tx, params, grads, 1)
  step = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new, params)
  t = step["text"]
  # First Adam step moves every weight by its lr: top layer 0.1, then x0.5 per layer down.
  for got, want in [(t["layers_2"]["kernel"], 0.1), (t["layers_1"]["kernel"], 0.05),
                    (t["layers_0"]["kernel"], 0.025), (t["embeddings"]["word"]["kernel"], 0.0125),
                    (step["head"]["kernel"], 1.0), (step["mot_text_1"]["kernel"], 1.0)]:
    assert got == pytest.approx(want, rel=1e-5)
  summary = optim.group_summary(full(cfg), params)
  assert set(summary) == {"default", "default@1", "default@2", "default@3", "new"}
  with pytest.raises(ValueError, match="layer_decay=1.5"):
    optim.make_optimizer(full({**cfg, "layer_decay": 1.5}), params, 10)
  with pytest.raises(ValueError, match="matches no numbered layer"):
    optim.make_optimizer(full({**cfg, "layer_decay_pattern": "^vision/"}), params, 10)
  off, _ = optim.make_optimizer(full({**cfg, "layer_decay": 1.0}), params, 10)
  flat, _ = run(off, params, grads, 1)
  assert float(jnp.max(jnp.abs(flat["text"]["layers_0"]["kernel"] - 1.0))) == pytest.approx(0.1, rel=1e-5)


@pytest.mark.parametrize("ema", [-0.1, 1.0])
def test_an_average_decay_outside_0_1_is_refused(ema):
  params = {"w": jnp.zeros((2, 2))}
  with pytest.raises(ValueError, match=r"optim.ema=.*must be in \[0, 1\)"):
    optim.make_optimizer(full(dict(lr=1e-3, ema=ema)), params, 10)
