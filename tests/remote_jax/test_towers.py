"""Synthetic pretrained towers (remote_jax/towers.py): the crops, the objective, the probe,
the HF-layout writer that makes a tower load as any pretrained encoder, and the cache."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from remote_jax import towers
from remote_jax.data import synth
from remote_jax.models import convert
from remote_jax.models.encoders.clip_vit import CLIPVisionConfig, CLIPVisionTower
from tests.remote_jax.models.test_convert import random_like


def odd_tower():
  # Odd sizes (heads 3, intermediate 7) catch a transposed layout.
  return CLIPVisionConfig(hidden_size=12, num_layers=2, num_heads=3, intermediate_size=7,
                          image_size=8, patch_size=4, use_cls=False, use_depth=False)


def test_save_clip_vision_round_trips_through_the_loader(tmp_path):
  cfg = odd_tower()
  shapes = jax.eval_shape(lambda: nn.meta.unbox(CLIPVisionTower(cfg).init(
      jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))["params"]))
  params = random_like(shapes, seed=3)
  convert.save_clip_vision(tmp_path, cfg, params)
  loaded_cfg, loaded = convert.load_clip_vision(tmp_path, use_cls=False)
  assert loaded_cfg == cfg
  flat, back = (jax.tree_util.tree_leaves_with_path(t) for t in (params, loaded))
  assert [p for p, _ in flat] == [p for p, _ in back]
  for (path, a), (_, b) in zip(flat, back):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
  # And the same outputs, so nothing was transposed consistently wrong on both sides.
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  run = lambda p: CLIPVisionTower(cfg).apply({"params": p}, x)[0][-1]
  np.testing.assert_allclose(run(params), run(loaded), rtol=1e-6)


def test_save_clip_vision_refuses_cls_and_depth(tmp_path):
  with pytest.raises(ValueError, match="without CLS and depth"):
    convert.save_clip_vision(tmp_path, CLIPVisionConfig(12, 1, 3, 7, use_cls=True), {})


def test_crops_differ_only_in_colour_and_are_seeded():
  make = lambda: towers.render_crops(np.random.default_rng(5), 6, lambda i: np.arange(5), 32, 96)
  crops, shapes, colours = make()
  again, _, _ = make()
  np.testing.assert_array_equal(crops, again)
  assert crops.shape == (6, 5, 32, 32, 3) and set(shapes) <= {0, 1, 2}
  background = np.all(crops == synth.BACKGROUND, axis=-1)          # (n, k, S, S)
  # One geometry: the same pixels are shape in every colour (antialiasing edges aside).
  agree = (background == background[:, :1]).mean()
  assert agree > 0.97
  # Every colour's shape pixels carry that colour (the crop centre lies inside each shape).
  for j, name in enumerate(towers.COLOURS):
    centre = crops[:, j, 20, 16].astype(int)   # a little below the middle: inside triangles too
    assert np.abs(centre - synth.COLOURS[name]).max() < 40, name


def test_invariance_term_is_zero_for_equal_pairs_only():
  cfg = odd_tower()
  model = towers.ShapeNamer(cfg)
  x = np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype(np.float32)
  params = nn.meta.unbox(model.init(jax.random.key(0), {"pixels": x})["params"])
  loss = towers.tower_loss(invariance=1.0)
  same = {"pixels": np.concatenate([x[:2], x[:2]]), "label": np.array([0, 1, 0, 1])}
  other = {"pixels": x, "label": np.array([0, 1, 0, 1])}
  assert float(loss(model, params, same, None, True)[1]["colour_gap"]) < 1e-10
  assert float(loss(model, params, other, None, True)[1]["colour_gap"]) > 0.1


def test_ridge_probe_reads_a_linear_code_however_small_and_not_noise():
  rng = np.random.default_rng(0)
  y = rng.integers(5, size=600)
  signal = np.eye(5)[y] @ rng.normal(size=(5, 20)) + 0.1 * rng.normal(size=(600, 20))
  noise = rng.normal(size=(600, 20))
  assert towers.ridge_accuracy(signal[:400], y[:400], signal[400:], y[400:], 5)[0] > 0.98
  assert towers.ridge_accuracy(noise[:400], y[:400], noise[400:], y[400:], 5)[0] < 0.35
  # A consistent code 1e-4 of the features' spread is a code: the probe must find it.
  tiny = np.concatenate([noise, 1e-4 * np.eye(5)[y] @ rng.normal(size=(5, 20))], 1)
  assert towers.ridge_accuracy(tiny[:400], y[:400], tiny[400:], y[400:], 5)[0] > 0.98


def test_pairs_are_one_geometry_in_two_colours():
  rows = towers.pair_rows(np.random.default_rng(0), 50, 5, 64)
  first, second = rows[:64], rows[64:]
  np.testing.assert_array_equal(first // 5, second // 5)
  assert np.all(first % 5 != second % 5) and rows.max() < 250


def test_the_cache_key_follows_recipe_and_tower_and_a_failed_write_leaves_nothing(
    tmp_path, monkeypatch):
  from configs import common
  calls = []

  def fake_pretrain(vision, recipe, out_dir):
    calls.append(recipe["steps"])
    if recipe["steps"] == 13:
      raise RuntimeError("interrupted")
    (out_dir / "probe.json").write_text("{}")
    return {"levels": []}

  monkeypatch.setattr(towers, "pretrain", fake_pretrain)
  recipe = common.synth_tower(invariant_levels=2)
  vision = {"hidden_size": 8, "num_layers": 2, "num_heads": 2, "intermediate_size": 8,
            "image_size": 8, "patch_size": 4, "synth": recipe}
  first = towers.ensure_tower("synth:colour_blind", vision, tmp_path)
  assert towers.ensure_tower("synth:colour_blind", vision, tmp_path) == first and calls == [4000]
  other_recipe = towers.ensure_tower("synth:colour_blind",
                                     {**vision, "synth": dict(recipe, steps=5)}, tmp_path)
  other_tower = towers.ensure_tower("synth:colour_blind", {**vision, "num_layers": 3}, tmp_path)
  assert len({first, other_recipe, other_tower}) == 3
  with pytest.raises(RuntimeError):
    towers.ensure_tower("synth:colour_blind", {**vision, "synth": dict(recipe, steps=13)},
                        tmp_path)
  names = [p.name for p in (tmp_path / "towers").iterdir()]
  assert len(names) == 3 and not any(n.startswith(".") for n in names), names


def test_bad_tower_names_recipes_and_cache_dirs_are_one_line_errors():
  from configs import common
  vision = {"synth": common.synth_tower()}
  with pytest.raises(ValueError, match="not a synthetic tower; known: synth:colour_blind"):
    towers.ensure_tower("synth:nope", vision, "cache")
  with pytest.raises(ValueError, match="needs data.cache_dir"):
    towers.ensure_tower("synth:colour_blind", vision, "")
  with pytest.raises(ValueError, match=r"needs model.vision.synth, the tower's recipe"):
    towers.ensure_tower("synth:colour_blind", {}, "cache")
  with pytest.raises(ValueError, match=r"missing \['steps'\], unknown \['step'\]"):
    recipe = {k: v for k, v in common.synth_tower(step=1).items() if k != "steps"}
    towers.ensure_tower("synth:colour_blind", {"synth": recipe}, "cache")
  with pytest.raises(ValueError, match=r"invariant_levels=7: the invariance covers the top 1\.\.6"):
    towers.ensure_tower("synth:colour_blind",
                        {"num_layers": 6, "synth": common.synth_tower(invariant_levels=7)}, "cache")


@pytest.mark.slow
def test_a_short_pretraining_is_cached_and_loads_as_a_pretrained_encoder(tmp_path):
  """The whole path on a small recipe: written once under the cache, with its probe, and
  loaded into ot_world's REMOTE model by load_pretrained; a second call reuses it."""
  from configs import common
  from remote_jax import cli
  config = cli.load_config("configs/ot_world.py")
  config.model.vision.synth = common.synth_tower(steps=60, n_crops=128, batch_size=32)
  path = towers.ensure_tower("synth:colour_blind", config.model.vision, tmp_path)
  probe = json.loads((path / "probe.json").read_text())
  assert [r["level"] for r in probe["levels"]] == list(range(7))
  assert probe["levels"][0]["colour"] > 0.9          # the patch projection reads colour
  metrics = [json.loads(line) for line in (path / "train" / "metrics.jsonl").open()]
  assert metrics[-1]["colour_gap"] < metrics[0]["colour_gap"]   # the invariance term works
  assert not (path / "ckpt").exists()
  mtime = (path / "model.safetensors").stat().st_mtime
  assert towers.ensure_tower("synth:colour_blind", config.model.vision, tmp_path) == path
  assert (path / "model.safetensors").stat().st_mtime == mtime
  # Into the REMOTE model through task.setup (which passes data.cache_dir): the vision
  # tower's layers are the written ones.
  _, written = convert.load_clip_vision(path, image_size=32, patch_size=16, use_cls=False)
  from remote_jax import task
  config.data.cache_dir = str(tmp_path)
  config.data.attribute_world.update(n_train=30, n_val=15, n_test=15)   # a small world
  s = task.setup(config, pretrained=True)
  np.testing.assert_array_equal(
      jax.device_get(s.state.params["vision"]["layers_5"]["fc2"]["kernel"]),
      written["layers_5"]["fc2"]["kernel"])


def test_named_recipes_train_the_patch_projection_as_stated_and_the_world_follows():
  from configs import common, ot_world
  from remote_jax import config as config_lib
  from remote_jax import optim
  params = {"vision": {"embeddings": {"patch_embedding": {"kernel": np.zeros(2)}},
                       "layers_0": {"fc1": {"kernel": np.zeros(2)}}}}
  stem = {name: optim.param_labels(common.synth_tower(name)["optim"], params)["vision"]
          for name in common.SYNTH_TOWERS}
  assert stem["grid"]["embeddings"]["patch_embedding"]["kernel"] == optim.FROZEN
  assert stem["slow_stem"]["embeddings"]["patch_embedding"]["kernel"] == "stem"
  assert {s["layers_0"]["fc1"]["kernel"] for s in stem.values()} == {optim.DEFAULT}
  config = ot_world.get_config("tower=slow_stem,moe=off")
  config_lib.resolve(config)
  assert (config.data.attribute_world.pixel_noise, config.model.moe.variant) == (0.08, "off")
  # The studies' recipe (docs/ot_world.md §1), pinned: its tower's cache entry must not move.
  grid = common.synth_tower()
  assert ot_world.get_config().model.vision.synth.to_dict() == grid
  assert {k: grid[k] for k in ("steps", "batch_size", "n_crops", "invariance",
                               "invariant_levels", "pixel_noise")} == dict(
      steps=4000, batch_size=128, n_crops=4096, invariance=1.0, invariant_levels=3,
      pixel_noise=0.12)
  assert (grid["optim"]["lr"], grid["optim"]["frozen_patterns"], grid["optim"]["groups"]) == (
      1e-3, (common.TOWER_STEM,), {})
  common.synth_tower("slow_stem")["optim"]["groups"]["stem"]["lr_mult"] = 9.0   # a copy
  assert common.synth_tower("slow_stem")["optim"]["groups"]["stem"]["lr_mult"] == 0.3
  with pytest.raises(ValueError, match=r"tower='nope': allowed \['grid', 'slow_stem'\]"):
    ot_world.get_config("tower=nope")
