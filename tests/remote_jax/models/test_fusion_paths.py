"""Issue 19's model paths, each checked against the behaviour it replaced: the vision
MOT per object (eq. 5), a box position the LayerNorm cannot drown, and an MMoE router
that routes per triplet."""

import jax
import numpy as np
import pytest

from remote_jax.models import remote
from tests.conftest import C, jit, make_batch, micro_config, random_params

_MODELS = {}


def forward(cfg, batch, scale_patches=1.0):
  """(logits, aux, intermediates); params from one init per config."""
  key = cfg.to_json()
  if key not in _MODELS:
    model = remote.build(cfg, C, 2100)
    params = random_params(model, batch)   # init would compile ~9 s
    apply = jit(lambda p, b: model.apply({"params": p}, b, mutable=["intermediates"]))
    _MODELS[key] = (params, apply)
  params, apply = _MODELS[key]
  if scale_patches != 1.0:   # patch/depth embeddings grown in training (issue 19: 3 -> 49)
    grown = lambda path: "['vision']['embeddings']" in jax.tree_util.keystr(path)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x * scale_patches if grown(path) else x, params)
  (logits, aux), state = apply(params, batch)
  return logits, aux, state["intermediates"]


def object_features(cfg, batch):
  return np.asarray(forward(cfg, batch)[2]["object_features"][0])


@pytest.mark.parametrize("scope", ["object", "image"])
def test_vision_ot_per_object_keeps_objects_apart(scope):
  # moe=off isolates the encoders + MOT: object tokens meet only inside the vision MOT.
  cfg = micro_config(**{"mot.vision_scope": scope, "moe.variant": "off"})
  batch = make_batch()
  other = {k: np.array(v) for k, v in batch.items()}
  other["obj_pixels"][:, 1] += 1.0                  # change object 1 only
  a, b = object_features(cfg, batch), object_features(cfg, other)
  assert not np.allclose(a[:, 1], b[:, 1])
  if scope == "object":
    np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-6)
    plan = forward(cfg, batch)[2]["mot_vision_1"]["plan"][0]
    t = plan.shape[1]                                # one problem per (example, object)
    assert plan.shape == (2 * 3, t, t)
  else:
    assert np.abs(a[:, 0] - b[:, 0]).max() > 1e-4


def head_input_change(position, scale):
  cfg = micro_config(box_position=position)
  batch = make_batch()
  moved = {k: np.array(v) for k, v in batch.items()}
  moved["obj_boxes"][1, 1] = [0.7, 0.6, 0.95, 0.9, 0.0625]   # the e-o triplet's object
  x = np.asarray(forward(cfg, batch, scale)[2]["head"]["pair_features"][0][1])
  y = np.asarray(forward(cfg, moved, scale)[2]["head"]["pair_features"][0][1])
  return np.linalg.norm(x - y) / np.linalg.norm(x)


def test_box_reaches_the_head_after_patch_embeddings_grow():
  # Patch embeddings 30x larger, as after training: before the LayerNorm the box is
  # scaled down with every token; after it, it keeps its weight.
  post, pre = head_input_change("post_norm", 30.0), head_input_change("pre_norm", 30.0)
  np.testing.assert_allclose(post, head_input_change("post_norm", 1.0), rtol=1e-3)
  assert post > 0.05 and post > 4 * pre, (post, pre)


def two_triplets_of_one_example():
  batch = make_batch(b=2)
  for v in batch.values():       # row 1 = row 0's inputs ...
    v[1] = v[0]
  batch["head_marker"][:] = [1, 1]
  batch["tail_marker"][:] = [3, 6]
  batch["head_obj"][:] = [-1, 0]  # ... with another triplet: e-e vs o-o
  batch["tail_obj"][:] = [-1, 1]
  batch["head_desc"][:] = [8, -1]
  return batch


@pytest.mark.parametrize("route_by", ["triplet", "example"])
def test_router_weights_differ_between_triplets_of_one_example(route_by):
  cfg = micro_config(**{"moe.route_by": route_by})
  router = np.asarray(forward(cfg, two_triplets_of_one_example())[1]["router"])
  np.testing.assert_allclose(router.sum(-1), 1.0, rtol=1e-5)
  if route_by == "triplet":
    assert np.abs(router[0] - router[1]).max() > 1e-4
  else:
    np.testing.assert_allclose(router[0], router[1], atol=1e-6)


def test_balance_term_is_zero_when_off_and_kl_to_uniform_when_on():
  from remote_jax.models.moe import router_balance
  uniform = np.full((4, 5), 0.2, np.float32)
  one_hot = np.eye(5, dtype=np.float32)[[0, 0, 0, 0]]
  assert abs(float(router_balance(uniform))) < 1e-6
  np.testing.assert_allclose(float(router_balance(one_hot)), np.log(5), rtol=1e-5)
  batch = make_batch()
  off = forward(micro_config(), batch)[1]["aux_loss"]
  on = forward(micro_config(**{"moe.balance_weight": 2.0}), batch)[1]
  assert float(off) == 0.0
  np.testing.assert_allclose(float(on["aux_loss"]),
                             2.0 * float(router_balance(on["router"])), rtol=1e-5)
