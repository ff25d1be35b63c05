"""Encoders: parity with transformers' Flax BERT / CLIP vision (weights loaded
through our converter), REMOTE's hooks, and logical axis names."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remote_jax.models.convert import load_bert, load_clip_vision
from remote_jax.models.encoders import (
  BertConfig,
  BertEncoder,
  BertLayer,
  CLIPEncoderLayer,
  CLIPVisionConfig,
  CLIPVisionEmbeddings,
  CLIPVisionTower,
)
from remote_jax.models.encoders.bert import object_fusion

from .test_convert import random_like, tiny_hf_bert, tiny_hf_clip_vision

TOL = 1e-4
AXIS_NAMES = {"vocab", "embed", "mlp", "heads", "kv", "joined_kv", "position", "patch", None}


def padded_text_batch(vocab: int, length: int = 12):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, vocab, (2, length)).astype(np.int32)
  mask = np.ones((2, length), np.int32)
  mask[1, 7:] = 0
  ids[1, 7:] = 0
  types = np.zeros((2, length), np.int32)
  types[:, 5:] = 1
  return ids, types, mask


def random_params(module, *args, **kwargs):
  return random_like(jax.eval_shape(
      lambda: nn.meta.unbox(module.init(jax.random.key(0), *args, **kwargs)["params"])))


def jitted(module, **static):
  """module.apply under jit: eager flax compiles every op separately, which is
  several times slower on these small CPU tests."""
  return jax.jit(functools.partial(module.apply, **static))


def assert_bert_matches_hf(config, params, hf_model, hf_params=None):
  ids, types, mask = padded_text_batch(config.vocab_size)
  ours = jitted(BertEncoder(config), deterministic=True)({"params": params}, ids, types, mask)
  theirs = jax.jit(lambda p: hf_model(ids, attention_mask=mask, token_type_ids=types, params=p,
                                      output_hidden_states=True).hidden_states)(hf_params)
  assert len(ours) == len(theirs) == config.num_layers + 1
  for level, (a, b) in enumerate(zip(ours, theirs)):
    assert float(jnp.max(jnp.abs(a - b))) < TOL, f"hidden state {level}"


def test_bert_matches_transformers_on_minilm(minilm_dir, monkeypatch):
  from transformers import FlaxBertModel
  hf_init = FlaxBertModel.init_weights

  def zeros_instead_of_random_init(self, rng, input_shape, params=None):
    # HF draws random weights op by op (about 7 s of compiles here) only to
    # overwrite them all from the checkpoint; a weight it failed to load
    # would stay zero and break the parity below.
    assert params is None
    shapes = jax.eval_shape(lambda: hf_init(self, rng, input_shape))
    return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)

  monkeypatch.setattr(FlaxBertModel, "init_weights", zeros_instead_of_random_init)
  config, params = load_bert(minilm_dir)
  assert (config.num_layers, config.hidden_size, config.num_heads) == (6, 384, 12)
  hf_model = FlaxBertModel.from_pretrained(minilm_dir, from_pt=True)
  assert_bert_matches_hf(config, params, hf_model, hf_model.params)


def test_bert_matches_transformers_on_random_tiny(tmp_path):
  hf_model, hf_params = tiny_hf_bert(tmp_path)
  config, params = load_bert(tmp_path)
  assert_bert_matches_hf(config, params, hf_model, hf_params)


def test_clip_matches_transformers_on_random_224(tmp_path):
  hf_model, hf_params = tiny_hf_clip_vision(tmp_path)
  config, params = load_clip_vision(tmp_path)
  pixels = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
  states, pooled = jitted(CLIPVisionTower(config))({"params": params}, pixels)
  theirs = jax.jit(lambda p: hf_model(pixels.transpose(0, 3, 1, 2), params=p,
                                      output_hidden_states=True))(hf_params)
  assert len(states) == len(theirs.hidden_states) == 3 and states[0].shape == (2, 50, 64)
  for level, (a, b) in enumerate(zip(states, theirs.hidden_states)):
    assert float(jnp.max(jnp.abs(a - b))) < TOL, f"hidden state {level}"
  assert float(jnp.max(jnp.abs(pooled - theirs.pooler_output))) < TOL


def remote_clip_config(**kw):
  return CLIPVisionConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                          image_size=64, patch_size=32, use_cls=False, use_depth=True, **kw)


def test_clip_remote_variant_shapes_positions_and_determinism():
  config = remote_clip_config(attention_dropout=0.5)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(3, 64, 64, 3)).astype(np.float32)
  depth = rng.normal(size=(3, 64, 64, 1)).astype(np.float32)
  tower = CLIPVisionTower(config)

  params = random_params(tower, pixels, depth)

  @jax.jit
  def outputs(params):
    # Blank inputs leave only the positions: rgb and depth tokens share the 4 rows.
    blank = CLIPVisionEmbeddings(config).apply(
        {"params": params["embeddings"]}, pixels * 0, depth * 0)
    return {"blank": blank, "plain": tower.apply({"params": params}, pixels, depth),
                "dropped": tower.apply({"params": params}, pixels, depth, deterministic=False,
                                    rngs={"dropout": jax.random.key(1)})}

  out = outputs(params)
  states, pooled = out["plain"]
  assert pooled is None and len(states) == 3
  assert all(s.shape == (3, 8, 32) for s in states)
  np.testing.assert_array_equal(outputs(params)["plain"][0][-1], states[-1])
  assert not np.allclose(out["dropped"][0][-1], states[-1])
  table = params["embeddings"]["position_embedding"]["embedding"]
  np.testing.assert_array_equal(out["blank"][0, :4], table)
  np.testing.assert_array_equal(out["blank"][0, 4:], table)


def test_clip_prefix_copy_of_own_kv_changes_nothing():
  """Keys/values given twice (as prefix and own) leave the softmax average unchanged."""
  config = remote_clip_config()
  layer = CLIPEncoderLayer(config)
  h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 32)), jnp.float32)

  @jax.jit
  def outputs(params):
    x = nn.LayerNorm(epsilon=config.layer_norm_eps).apply({"params": params["layer_norm1"]}, h)
    project = lambda name: nn.DenseGeneral((4, 8)).apply({"params": params[name]}, x)
    prefix = (project("k_proj"), project("v_proj"))
    return (layer.apply({"params": params}, h),
            layer.apply({"params": params}, h, prefix_kv=prefix),
            layer.apply({"params": params}, h, prefix_kv=prefix, attention_mask=jnp.ones((2, 8))))

  plain, with_prefix, masked = outputs(random_params(layer, h))
  np.testing.assert_allclose(with_prefix, plain, atol=1e-5)
  np.testing.assert_allclose(masked, plain, atol=1e-5)


def tiny_bert_config(**kw):
  return BertConfig(vocab_size=50, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48,
                    max_position_embeddings=16, type_vocab_size=2, hidden_dropout=0.1,
                    attention_dropout=0.1, **kw)


def test_bert_layer_kv_and_fusion_hooks():
  config = tiny_bert_config()
  layer = BertLayer(config)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
  extra = jnp.asarray(rng.normal(size=(2, 6, 32)), jnp.float32)
  mask = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
  objects = jnp.asarray(rng.normal(size=(2, 3, 32)), jnp.float32)
  object_mask = jnp.array([[True, True, False], [True, False, False]])

  params = random_params(layer, h, mask, True, ffn_extra=extra)
  assert params["fusion_dense"]["kernel"].shape == (32, 48)

  @jax.jit
  def outputs(params):
    # No extra == a zero extra through a bias-free fusion_dense.
    zero_bias = {**params, "fusion_dense": {**params["fusion_dense"], "bias": jnp.zeros(48)}}
    run = lambda p, **kw: layer.apply({"params": p}, h, mask, **kw)
    return {
        "plain_kv": run(params, deterministic=True, return_kv=True),
        "zero_extra": run(zero_bias, deterministic=True, ffn_extra=jnp.zeros_like(h)),
        "fused": run(params, deterministic=True, ffn_extra=extra),
        # The extra may be a function of the attention context (the released fusion).
        "from_ctx": run(params, deterministic=True, ffn_extra=lambda ctx: extra + 0 * ctx),
        "dropped": run(params, deterministic=False, rngs={"dropout": jax.random.key(0)}),
        "visual": run(params, deterministic=True, visual=objects, visual_mask=object_mask),
        "visual_as_extra": run(params, deterministic=True,
                               ffn_extra=functools.partial(object_fusion, objects, object_mask))}

  out = outputs(params)
  plain, (k, v) = out["plain_kv"]
  assert k.shape == v.shape == (2, 6, 4, 8)
  key = params["key"]
  np.testing.assert_allclose(k, jnp.einsum("bld,dhk->blhk", h, key["kernel"]) + key["bias"],
                             atol=1e-5)
  np.testing.assert_allclose(out["zero_extra"], plain, atol=1e-6)
  np.testing.assert_allclose(out["from_ctx"], out["fused"], atol=1e-6)
  assert not np.allclose(out["fused"], plain)
  assert not np.allclose(out["dropped"], plain)
  np.testing.assert_allclose(out["visual"], out["visual_as_extra"], atol=1e-6)
  assert not np.allclose(out["visual"], out["fused"])


def test_object_fusion_is_unscaled_softmax_over_objects():
  rng = np.random.default_rng(0)
  ctx = rng.normal(size=(2, 5, 8)).astype(np.float32)
  objects = rng.normal(size=(2, 3, 8)).astype(np.float32)
  scores = np.einsum("bld,bkd->blk", ctx, objects)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  expected = np.einsum("blk,bkd->bld", weights, objects)
  np.testing.assert_allclose(object_fusion(objects, None, ctx), expected, rtol=1e-5, atol=1e-5)
  only_first = jnp.array([[True, False, False]] * 2)
  np.testing.assert_allclose(object_fusion(objects, only_first, ctx),
                             np.broadcast_to(objects[:, :1], (2, 5, 8)), atol=1e-6)


def logical_names(variables):
  boxed = jax.tree_util.tree_leaves(
      variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert all(isinstance(b, nn.LogicallyPartitioned) for b in boxed)
  for b in boxed:
    assert len(b.names) == b.value.ndim
  return {n for b in boxed for n in b.names}


def test_every_parameter_carries_known_logical_axes():
  config = tiny_bert_config()
  ids = jnp.zeros((1, 4), jnp.int32)
  h = jnp.zeros((1, 4, 32))
  names = logical_names(jax.eval_shape(
      lambda: BertEncoder(config).init(jax.random.key(0), ids, ids, ids, True)))
  names |= logical_names(jax.eval_shape(
      lambda: BertLayer(config).init(jax.random.key(0), h, None, True, ffn_extra=h)))
  for clip in (remote_clip_config(), CLIPVisionConfig(32, 1, 4, 48, image_size=64)):
    inputs = [jnp.zeros((1, 64, 64, 3))] + ([jnp.zeros((1, 64, 64, 1))] if clip.use_depth else [])
    names |= logical_names(jax.eval_shape(
        lambda: CLIPVisionTower(clip).init(jax.random.key(0), *inputs)))  # noqa: B023
  assert names <= AXIS_NAMES, names - AXIS_NAMES
  assert {"vocab", "embed", "mlp", "heads", "kv", "position", "patch"} <= names


def test_config_from_hf_dicts():
  clip = {"model_type": "clip", "vision_config": {
      "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
      "intermediate_size": 3072, "patch_size": 32}}
  config = CLIPVisionConfig.from_hf(clip, image_size=64, use_cls=False)
  assert (config.image_size, config.num_patches, config.num_positions) == (64, 4, 4)
  with pytest.raises(ValueError, match="missing field 'num_hidden_layers'"):
    CLIPVisionConfig.from_hf({"hidden_size": 768})
  with pytest.raises(ValueError, match="'hidden_act' = 'gelu'"):
    CLIPVisionConfig.from_hf({**clip["vision_config"], "hidden_act": "gelu"})
