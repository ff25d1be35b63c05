"""bench/fused_probe.py's layouts: a run's own parameters read with parts of the object-token
layout switched off (no trained run needed: a micro model with random parameters)."""
import jax
import numpy as np
import pytest

from bench import fused_probe
from remote_jax.models import remote
from tests.conftest import C, K, make_batch, micro_config, random_params


def test_each_layout_switches_off_its_parts_and_nothing_else():
  cfg = micro_config(depth_summary="post_norm")
  for layout, parts in fused_probe.LAYOUTS.items():
    want = cfg.to_dict()
    for path, value in parts.items():
      *parents, key = path.split(".")
      node = want
      for k in parents:
        node = node[k]
      node[key] = value
    assert fused_probe.with_layout(cfg, layout).to_dict() == want, layout
  assert (cfg.use_pos, cfg.vision.use_depth, cfg.depth_summary) == (True, True, "post_norm")
  for bad in ("rgb", "full,rgb_only"):   # one name, known
    with pytest.raises(ValueError, match="choose from.*rgb_only"):
      fused_probe.with_layout(cfg, bad)
  assert fused_probe.parse_layouts(" full, rgb_only ") == ["full", "rgb_only"]
  with pytest.raises(ValueError, match="choose from"):
    fused_probe.parse_layouts(",")
  with pytest.raises(ValueError, match="co-encoder"):
    fused_probe.with_layout(micro_config("reference"), "no_box")


def test_a_directory_that_is_no_run_is_named(tmp_path):
  with pytest.raises(ValueError, match=f"{tmp_path}: no config.json"):
    fused_probe.load_run(tmp_path)


def test_a_layout_reads_the_full_models_parameters_and_not_the_parts_it_switched_off():
  cfg, batch = micro_config(depth_summary="post_norm"), make_batch()
  params = random_params(remote.build(cfg, C, 2100), batch)
  forward = {layout: fused_probe.forward_fn(
      remote.build(fused_probe.with_layout(cfg, layout), C, 2100))
      for layout in ("full", "rgb_only")}
  full, rgb = (jax.device_get(forward[x](params, batch)) for x in ("full", "rgb_only"))
  assert full[0][-1].shape[1] // K == 2 * rgb[0][-1].shape[1] // K   # the depth tokens are gone
  assert not np.allclose(full[1], rgb[1], atol=1e-4)                  # the head's read moves
  # The parameters of what rgb_only switches off go unread: changing them changes nothing.
  bump = lambda tree: jax.tree_util.tree_map(lambda x: x + 1.0, tree)
  emb = params["vision"]["embeddings"]
  moved = {**params, "box_embed": bump(params["box_embed"]),
           "depth_embed": bump(params["depth_embed"]),
           "vision": {**params["vision"], "embeddings": {
               **emb, "depth_embedding": bump(emb["depth_embedding"])}}}
  again = jax.device_get(forward["rgb_only"](moved, batch))
  np.testing.assert_array_equal(again[1], rgb[1])
  assert not np.allclose(jax.device_get(forward["full"](moved, batch))[1], full[1], atol=1e-4)


def test_object_mass_splits_a_plan_by_the_objects_its_mass_comes_from():
  k, t, levels = 3, 2, 2
  n, m = k * t, levels * k * t
  np.testing.assert_allclose(fused_probe.object_mass(np.ones((1, n, m)), k), 1 / k)
  same = (np.arange(m)[None, :] % n == np.arange(n)[:, None]).astype(float)[None]
  np.testing.assert_allclose(fused_probe.object_mass(same, k)[0], np.eye(k))
  plan = same.copy()
  plan[0, :t] = 0.0
  plan[0, :t, n + 2 * t:n + 3 * t] = 1.0   # object 0's rows take object 2's level-1 tokens
  share = fused_probe.object_mass(plan, k)[0]
  np.testing.assert_allclose(share[0], [0.0, 0.0, 1.0])
  np.testing.assert_allclose(share[1:], np.eye(k)[1:])


def test_forward_returns_each_fused_levels_vision_plan_and_none_for_plain_runs():
  batch = make_batch()
  for variant, want in (("ot_paper", True), ("none", False)):
    cfg = micro_config(**{"mot.variant": variant, "mot.vision_scope": "image"})
    model = remote.build(cfg, C, 2100)
    _, _, plans = jax.device_get(
        fused_probe.forward_fn(model)(random_params(model, batch), batch))
    assert bool(plans) == want, variant
    for level, plan in plans.items():
      b, n, m = plan.shape
      assert (b, n % K, m) == (2, 0, level * n), level   # K objects; whole lower levels
      np.testing.assert_allclose(fused_probe.object_mass(plan, K).sum(-1)[
          np.asarray(batch["obj_mask"])], 1.0, rtol=1e-5)


def test_read_shares_split_own_cue_and_each_other_object():
  share = np.array([[0.4, 0.1, 0.3, 0.2],     # read object 0, its cue (tag) is object 2
                    [0.1, 0.7, 0.1, 0.1],     # read object 1, its own cue (the own world)
                    [0.5, 0.5, 0.0, 0.0]])    # read object 0 of an image of 2 objects
  got = fused_probe.read_shares(share, np.array([0, 1, 0]), np.array([2, 1, 0]),
                                np.array([4, 4, 2]))
  np.testing.assert_allclose(got, [[0.4, 0.3, 0.15], [0.7, 0.0, 0.1], [0.5, 0.0, 0.5]])
  with pytest.raises(ValueError, match="not image-wide over 3 objects"):
    fused_probe.object_mass(np.ones((1, 4, 8)), 3)


def test_object_features_read_a_tag_worlds_large_shapes_with_their_cue(tmp_path):
  """A tiny tag world and an untrained tiny model: two read objects per example, each
  labelled with its tag's colour, and every read object's plan mass accounted for."""
  import json

  from configs import ot_world_tag_study
  from remote_jax import task
  from remote_jax.data import attribute_world, builder, synth
  config = ot_world_tag_study.get_config("size=tiny,mot=ot_paper,moe=off,pos=false,depth=false")
  config.model.vision.pretrained_dir = ""   # an untrained tower: nothing to pretrain here
  config.data.cache_dir = str(tmp_path)
  config.data.attribute_world.update(n_train=4, n_val=4, n_test=6)
  config.eval_batch_size = 8   # a multiple of the test mesh (8 CPU devices), 2 rows padded
  s = task.setup(config)
  reader = builder.make_reader(s.config.data)
  forward = fused_probe.forward_fn(s.model)
  levels, head, labels, mass = fused_probe.object_features(
      s, forward, reader, s.state.params, "test", 6, slice(0, 4))
  assert len(head) == len(labels["colour"]) == 6 * attribute_world.NUM_LARGE
  assert all(len(x) == len(head) for x in levels["all"])
  world = json.loads((reader.root / "world.json").read_text())["images"]
  want = []
  for line in reader.path("test").read_text().splitlines():
    objects = world[json.loads(line)["img_id"]]
    want += [synth.COLOURS[objects[c][0]] for c, *_ in filter(None, (
        attribute_world.read_cue(objects, slot, "tag") for slot in range(len(objects))))]
  assert [list(synth.COLOURS.values())[i] for i in labels["colour"]] == want
  assert sorted(mass) == list(range(1, s.config.model.vision.num_layers + 1))
  for shares in mass.values():
    np.testing.assert_allclose(shares[:, 0] + shares[:, 1] + 2 * shares[:, 2], 1.0, rtol=1e-5)
    assert (shares[:, 1] > 0).all()   # the tag is another object
