"""bench/fused_probe.py's layouts: a run's own parameters read with parts of the object-token
layout switched off (no trained run needed: a micro model with random parameters)."""
import jax
import numpy as np
import pytest

from bench import fused_probe
from remote_jax.models import remote
from tests.conftest import C, K, make_batch, micro_config, random_params


def test_layouts_switch_off_their_parts_and_nothing_else():
  cfg = micro_config(depth_summary="post_norm")
  rgb = fused_probe.with_layout(cfg, "rgb_only")
  assert (rgb.use_pos, rgb.vision.use_depth, rgb.depth_summary) == (False, False, "off")
  assert (cfg.use_pos, cfg.vision.use_depth, cfg.depth_summary) == (True, True, "post_norm")
  no_box = fused_probe.with_layout(cfg, "no_box")
  assert no_box.to_dict() == {**cfg.to_dict(), "use_pos": False}
  assert fused_probe.with_layout(cfg, "full").to_dict() == cfg.to_dict()
  with pytest.raises(ValueError, match="unknown layout 'rgb'.*rgb_only"):
    fused_probe.with_layout(cfg, "rgb")


def test_a_layout_reads_the_full_models_parameters():
  cfg, batch = micro_config(depth_summary="post_norm"), make_batch()
  params = random_params(remote.build(cfg, C, 2100), batch)
  read = {}
  for layout in ("full", "rgb_only"):
    forward = fused_probe.forward_fn(remote.build(fused_probe.with_layout(cfg, layout), C, 2100))
    levels, objects = jax.device_get(forward(params, batch))
    read[layout] = levels[-1], objects
  per_object = {k: v[0].shape[1] // K for k, v in read.items()}
  assert per_object["full"] == 2 * per_object["rgb_only"]   # the depth tokens are gone
  # The rgb tokens move without the depth tokens and box offsets, and so does the head's read.
  rgb_tokens = read["full"][0].reshape(2, K, 2, -1, read["full"][0].shape[-1])[:, :, 0]
  assert not np.allclose(rgb_tokens.reshape(read["rgb_only"][0].shape), read["rgb_only"][0],
                         atol=1e-4)
  assert not np.allclose(read["full"][1], read["rgb_only"][1], atol=1e-4)
