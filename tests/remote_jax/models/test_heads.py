"""RelationHead: gathers vs a NumPy loop, missing markers, mixed triplet types,
index validation, jit, dropout and logical axes."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from remote_jax.models.heads import RelationHead, validate_indices

B, L, K, D, C = 6, 10, 4, 8, 5
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
FIELDS = ("head_marker", "head_desc", "head_obj", "tail_marker", "tail_desc", "tail_obj")
# One row per case: (head marker, desc, obj), (tail marker, desc, obj).
ROWS = [
    ((1, 3, -1), (5, -1, -1)),    # entity-entity, head with <k>, tail without
    ((2, -1, 0), (7, -1, 3)),     # object-object
    ((4, 6, -1), (8, -1, 2)),     # entity-object
    ((9, -1, 1), (0, 2, -1)),     # object-entity
    ((-1, -1, 2), (3, 5, -1)),    # object head whose <o1> was truncated away
    ((-1, 4, -1), (6, -1, 1)),    # entity head without <s1> (its <k1> survived)
]
MISSING = [False, False, False, False, True, True]


def make_head(**fields):
  """A head with the released code's settings unless `fields` say otherwise."""
  config = dict(hidden=(), dropout=0.0, use_desc=True, object_without_marker="zero_side",
                without_caption="raw", use_caption=True)
  return RelationHead(C, **{**config, **fields})


def make_inputs(seed=0):
  rng = np.random.default_rng(seed)
  h_t = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  objs = jnp.asarray(rng.normal(size=(B, K, D)), jnp.float32)
  batch = {f: np.array([row[s][i] for row in ROWS], np.int32)
           for s, side in enumerate(("head", "tail"))
           for i, f in enumerate((f"{side}_marker", f"{side}_desc", f"{side}_obj"))}
  return h_t, objs, batch


def init(head, h_t, objs, batch):
  return head.init(jax.random.key(0), h_t, objs, batch)


def numpy_logits(params, h_t, objs, batch, use_desc, combine, keep_region=False):
  """The released code's per-sample loop (reference_remote.md 3.6), in NumPy;
  `keep_region`: an object side without its marker is [region; 0] instead of 0."""
  p = nn.meta.unbox(params)["params"]
  h_t, objs = np.asarray(h_t), np.asarray(objs)
  rows = []
  for b in range(B):
    sides = []
    for side in ("head", "tail"):
      marker, desc, obj = (int(batch[f"{side}_{f}"][b]) for f in ("marker", "desc", "obj"))
      width = D if combine == "mm_linear" else 2 * D
      if marker < 0 and not (keep_region and obj >= 0):
        sides.append(np.zeros(width, np.float32))
        continue
      if obj >= 0:
        text = h_t[b, marker] if marker >= 0 else np.zeros(D, np.float32)
        pair = np.concatenate([objs[b, obj], text])
      else:
        k = h_t[b, desc] if (desc >= 0 and use_desc) else np.zeros(D, np.float32)
        pair = np.concatenate([h_t[b, marker], k])
      if combine == "mm_linear":
        pair = pair @ np.asarray(p["mm_linear"]["kernel"]) + np.asarray(p["mm_linear"]["bias"])
      sides.append(pair)
    rows.append(np.concatenate(sides))
  z = np.stack(rows)
  return z @ np.asarray(p["classifier"]["kernel"]) + np.asarray(p["classifier"]["bias"])


@pytest.mark.parametrize("combine,use_desc", [("mm_linear", True),
                                              ("mm_linear", False),
                                              ("concat", True)])
def test_gathers_match_a_numpy_loop(combine, use_desc):
  h_t, objs, batch = make_inputs()
  head = make_head(use_desc=use_desc, combine=combine)
  params = init(head, h_t, objs, batch)
  logits, aux = head.apply(params, h_t, objs, batch)
  assert logits.shape == (B, C) and logits.dtype == jnp.float32
  np.testing.assert_allclose(
      logits, numpy_logits(params, h_t, objs, batch, use_desc, combine),
      rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(aux["missing_marker"], MISSING)


@pytest.mark.parametrize("combine", ["mm_linear", "concat"])
def test_keep_region_object_without_marker(combine):
  """Paper semantics: the object head of row 4 (no <o1>) keeps its region feature."""
  h_t, objs, batch = make_inputs()
  head = make_head(combine=combine, object_without_marker="keep_region")
  params = init(head, h_t, objs, batch)
  logits, aux = head.apply(params, h_t, objs, batch)
  np.testing.assert_allclose(
      logits, numpy_logits(params, h_t, objs, batch, True, combine, keep_region=True),
      rtol=1e-5, atol=1e-5)
  zero_side = numpy_logits(params, h_t, objs, batch, True, combine)
  assert np.abs(np.asarray(logits)[4] - zero_side[4]).max() > 1e-3    # row 4 differs
  np.testing.assert_allclose(np.asarray(logits)[5], zero_side[5], rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(aux["missing_marker"], MISSING)
  bad = make_head(object_without_marker="drop")
  with pytest.raises(ValueError, match="object_without_marker='drop'.*keep_region"):
    init(bad, h_t, objs, batch)


def test_raw_pairs_without_captions():
  """The released use_cap=False branch: [h_head; h_tail] of an entity's marker state or an
  object's feature, no mm_linear; without_caption="mm_linear" (the paper) or captions on
  keep the mm_linear head."""
  h_t, objs, batch = make_inputs()
  head = make_head(use_caption=False)
  params = init(head, h_t, objs, batch)
  p = nn.meta.unbox(params)["params"]
  assert set(p) == {"classifier"}
  logits, aux = head.apply(params, h_t, objs, batch)
  side = lambda b, s: (objs[b, batch[f"{s}_obj"][b]] if batch[f"{s}_obj"][b] >= 0 else
                       h_t[b, batch[f"{s}_marker"][b]] if batch[f"{s}_marker"][b] >= 0 else
                       np.zeros(D, np.float32))
  x = np.stack([np.concatenate([side(b, "head"), side(b, "tail")]) for b in range(B)])
  want = x @ np.asarray(p["classifier"]["kernel"]) + np.asarray(p["classifier"]["bias"])
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  # Row 4's object head lost its <o1> but keeps its feature; row 5's entity has no <s1>.
  np.testing.assert_array_equal(aux["missing_marker"], [False] * 5 + [True])
  for fields in (dict(use_caption=True), dict(use_caption=False, without_caption="mm_linear")):
    mm = make_head(**fields)
    got = init(mm, h_t, objs, batch)
    assert "mm_linear" in got["params"]
    np.testing.assert_allclose(mm.apply(got, h_t, objs, batch)[0],
                               numpy_logits(got, h_t, objs, batch, True, "mm_linear"),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="without_caption='drop'.*'raw'"):
    init(make_head(without_caption="drop"), h_t, objs, batch)


def test_missing_marker_side_is_zero():
  h_t, objs, batch = make_inputs()
  head = make_head(combine="concat")
  params = init(head, h_t, objs, batch)
  p = nn.meta.unbox(params)["params"]["classifier"]
  # With a zero head side the logits only see the tail half of the classifier.
  logits, _ = head.apply(params, h_t, objs, batch)
  rows = np.flatnonzero(MISSING)
  tail = np.stack([np.concatenate([h_t[b, batch["tail_marker"][b]],
                                   h_t[b, batch["tail_desc"][b]]])
                   if batch["tail_obj"][b] < 0 else
                   np.concatenate([objs[b, batch["tail_obj"][b]],
                                   h_t[b, batch["tail_marker"][b]]]) for b in rows])
  want = tail @ np.asarray(p["kernel"])[2 * D:] + np.asarray(p["bias"])
  np.testing.assert_allclose(np.asarray(logits)[rows], want, rtol=1e-5, atol=1e-5)


def test_mixed_batch_gradients_reach_exactly_the_gathered_rows():
  h_t, objs, batch = make_inputs()
  head = make_head(hidden=(16,), dropout=0.5)
  params = init(head, h_t, objs, batch)

  def loss(params, h_t, objs):
    logits, _ = head.apply(params, h_t, objs, batch, deterministic=False,
                           rngs={"dropout": jax.random.key(1)})
    return jnp.sum(jnp.sin(logits))

  grads = jit(jax.grad(loss, argnums=(0, 1, 2)))(params, h_t, objs)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  _, g_text, g_objs = grads
  used_objs = np.zeros((B, K), bool)
  used_text = np.zeros((B, L), bool)
  for b, row in enumerate(ROWS):
    for marker, desc, obj in row:
      if marker < 0:
        continue                       # the whole side is zeroed
      used_text[b, marker] = True
      if obj >= 0:
        used_objs[b, obj] = True
      elif desc >= 0:
        used_text[b, desc] = True
  # Dropout 0.5 on 16 units can zero a whole row's gradient only by chance;
  # the check is that nothing outside the gathered rows gets any.
  assert not np.abs(np.asarray(g_objs))[~used_objs].any()
  assert not np.abs(np.asarray(g_text))[~used_text].any()
  assert np.abs(np.asarray(g_objs))[used_objs].sum() > 0
  assert np.abs(np.asarray(g_text))[used_text].sum() > 0


@pytest.mark.parametrize("field,value,bound", [("head_marker", L, L - 1),
                                               ("tail_desc", -2, L - 1),
                                               ("head_obj", K, K - 1),
                                               ("tail_obj", 7, K - 1)])
def test_bad_index_raises_naming_the_field(field, value, bound):
  h_t, objs, batch = make_inputs()
  batch[field] = batch[field].copy()
  batch[field][3] = value
  with pytest.raises(ValueError, match=rf"'{field}'.*\[-1, {bound}\].*rows \[3\]"):
    validate_indices(batch, L, K)
  head = make_head()
  with pytest.raises(ValueError, match=field):
    init(head, h_t, objs, batch)


def test_under_jit_indices_are_clamped_not_checked():
  h_t, objs, batch = make_inputs()
  head = make_head()
  params = init(head, h_t, objs, batch)
  fn = jit(lambda batch: head.apply(params, h_t, objs, batch))
  logits, aux = fn(batch)
  assert logits.shape == (B, C) and aux["missing_marker"].shape == (B,)
  np.testing.assert_allclose(logits, head.apply(params, h_t, objs, batch)[0],
                             rtol=1e-6, atol=1e-6)
  bad = dict(batch, head_marker=batch["head_marker"].copy())
  bad["head_marker"][0] = L + 5
  clamped = dict(batch, head_marker=batch["head_marker"].copy())
  clamped["head_marker"][0] = L - 1
  np.testing.assert_allclose(fn(bad)[0], fn(clamped)[0], rtol=1e-6)


def test_dropout_and_hidden_layers():
  h_t, objs, batch = make_inputs()
  head = make_head(hidden=(16, 12), dropout=0.5, activation="gelu")
  params = init(head, h_t, objs, batch)
  shapes = jax.tree.map(jnp.shape, nn.meta.unbox(params))["params"]
  assert shapes["hidden_0"]["kernel"] == (2 * D, 16)
  assert shapes["hidden_1"]["kernel"] == (16, 12)
  assert shapes["classifier"]["kernel"] == (12, C)
  det = head.apply(params, h_t, objs, batch)[0]
  np.testing.assert_array_equal(det, head.apply(params, h_t, objs, batch)[0])
  drop = [head.apply(params, h_t, objs, batch, deterministic=False,
                     rngs={"dropout": jax.random.key(s)})[0] for s in (1, 2)]
  assert not np.allclose(drop[0], drop[1])


def test_logical_axes_and_bad_options():
  h_t, objs, batch = make_inputs()
  params = init(make_head(hidden=(16, 12)), h_t, objs, batch)["params"]
  leaves = jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned)
    assert len(leaf.names) == leaf.value.ndim == len(set(leaf.names))
    assert set(leaf.names) <= {"embed", "mlp", "classes"}
  with pytest.raises(ValueError, match="model.head.combine"):
    init(make_head(combine="sum"), h_t, objs, batch)
  with pytest.raises(ValueError, match="model.head.activation"):
    init(make_head(hidden=(4,), activation="tanh"), h_t, objs, batch)
