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
