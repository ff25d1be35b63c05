"""Preprocessing golden values, the tfds cache, and the grain pipeline (padding, state, shards)."""
import dataclasses
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import common
from remote_jax.data import batch_spec, pipeline, preprocess, umre
from remote_jax.data import builder as builder_lib
from remote_jax.data.records import Entity
from remote_jax.data.tokenizer import RelationTokenizer
from tests.conftest import FIXTURES, REPO

TOKENS = ["Alice", "met", "Bob", "in", "Paris"]


def ent(s, e):
  return Entity(" ".join(TOKENS[s:e]), (s, e), False)


OBJ = Entity("[OBJ0]", (0, 0, 1, 1), True)


# ---------------------------------------------------------------- golden values
@pytest.mark.parametrize("head,tail,expected", [
    ((0, 1), (2, 3), "<s1> Alice </s1> met <s2> Bob </s2> in Paris"),
    ((0, 1), (1, 2), "<s1> Alice </s1> <s2> met </s2> Bob in Paris"),
    # quirk: the tail ends where the head starts -> `<s1> </s2>` (head checks first)
    ((2, 3), (0, 2), "<s2> Alice met <s1> </s2> Bob </s1> in Paris"),
    ((4, 5), (0, 1), "<s2> Alice </s2> met Bob in <s1> Paris </s1>"),
])
def test_marker_placement(head, tail, expected):
  assert preprocess.mark_sentence(TOKENS, ent(*head), ent(*tail)) == expected


def test_objects_get_no_sentence_marker_and_caption_parts():
  assert preprocess.mark_sentence(TOKENS, OBJ, ent(4, 5)) == "Alice met Bob in <s2> Paris </s2>"

  class R:
    head, tail = OBJ, ent(0, 1)
  assert preprocess.caption_text(R, ("a dog", "a singer")) == "<o1> a dog </o1> <k2> a singer </k2>"


def test_crop_coordinates_and_clip_resize():
  image = Image.open(FIXTURES / "umre/UMKE_IMG/img_a.png").convert("RGB")  # 20 x 16
  pixels = np.asarray(image)
  box = (0.1, 0.2, 0.5, 0.9)  # (2, 3.2, 10, 14.4) -> PIL rounds to (2, 3, 10, 14): 8 x 11
  assert preprocess.crop_box_pixels(box, 20, 16) == (2, 3, 10, 14)
  # S = 8 = shorter side: no resize; centre crop top = int((11 - 8 + 1) / 2) = 2
  np.testing.assert_array_equal(preprocess.crop_rgb(image, box, 8), pixels[5:13, 2:10])
  # S = 4: bicubic to 4 x int(4 * 11 / 8) = 4 x 5, then top = int((5 - 4 + 1) / 2) = 1
  crop = preprocess.crop_rgb(image, box, 4)
  assert crop.shape == (4, 4, 3) and crop.dtype == np.uint8
  np.testing.assert_array_equal(crop[0, :2], [[31, 86, 42], [54, 86, 51]])
  np.testing.assert_array_equal(crop, np.asarray(
      image.crop((2, 3, 10, 14)).resize((4, 5), Image.BICUBIC))[1:5])
  # A box thinner than a pixel still yields one pixel column.
  assert preprocess.crop_box_pixels((0.5, 0.0, 0.51, 1.0), 20, 16) == (10, 0, 11, 16)


def test_depth_slice_nearest_and_norms():
  depth = np.load(FIXTURES / "umre/depth_data_umke/img_a.npz")["depth_map"]  # 8 x 10
  box = (0.1, 0.2, 0.5, 0.9)  # rows int(1.6):int(7.2) = 1:7, cols int(1.0):int(5.0) = 1:5
  out = preprocess.crop_depth(depth, box, 3)
  assert out.shape == (3, 3, 1) and out.dtype == np.float32
  # cv2 nearest: rows floor(i * 6/3) = 0, 2, 4; cols floor(i * 4/3) = 0, 1, 2
  np.testing.assert_array_equal(out[..., 0], depth[1:7, 1:5][[0, 2, 4]][:, [0, 1, 2]])
  np.testing.assert_array_equal(preprocess.nearest_indices(2, 5), [0, 0, 0, 1, 1])
  assert preprocess.depth_slice((8, 10), (0.5, 0.5, 0.55, 0.55)) == (slice(4, 5), slice(5, 6))
  np.testing.assert_allclose(preprocess.normalise_depth(depth, "more"), 255 - 100 * depth,
                             rtol=1e-6)
  mm = preprocess.normalise_depth(depth, "minmax")
  assert mm.min() == 0 and mm.max() == 1
  with pytest.raises(ValueError, match="depth_norm"):
    preprocess.normalise_depth(depth, "log")


def test_box_features():
  np.testing.assert_allclose(preprocess.box_features((0.1, 0.2, 0.5, 0.9)),
                             [0.1, 0.2, 0.5, 0.9, 0.28], rtol=1e-6)


@pytest.fixture(scope="module")
def tok(minilm_dir):
  return RelationTokenizer(minilm_dir, max_length=40)


@pytest.fixture(scope="module")
def umre_train():
  reader = umre.UmreReader(FIXTURES / "umre")
  return reader, reader.read("train")[0]


def make_pre(tok, reader, **kw):
  args = dict(num_objects=3, crop_size=4, use_caption=True, use_depth=True, depth_norm="none",
              modalities="both")
  args.update(kw)
  return preprocess.Preprocessor(tok, reader.relations, **args)


def test_preprocess_example_positions(tok, umre_train):
  reader, samples = umre_train
  ex = make_pre(tok, reader)(samples[0], 0)  # Alice -> Paris, entity-entity
  ids, m = ex["input_ids"], tok.marker_ids
  assert ids[ex["head_marker"]] == m["<s1>"] and ids[ex["tail_marker"]] == m["<s2>"]
  assert ids[ex["head_desc"]] == m["<k1>"] and ids[ex["tail_desc"]] == m["<k2>"]
  assert ex["head_obj"] == ex["tail_obj"] == -1 and ex["triplet_type"] == 0
  assert ex["label"] == reader.relations.index("/per/loc/place_of_residence")
  assert ex["token_type_ids"][ex["head_desc"]] == 1 and ex["mask"]
  oo = make_pre(tok, reader)(samples[1], 1)
  assert ids_at(oo, "head_marker") == m["<o1>"] and ids_at(oo, "tail_marker") == m["<o2>"]
  assert (oo["head_obj"], oo["tail_obj"], oo["head_desc"], oo["triplet_type"]) == (0, 1, -1, 1)
  np.testing.assert_array_equal(oo["obj_mask"], [True, True, False])
  np.testing.assert_allclose(oo["obj_boxes"][0], [0.1, 0.2, 0.5, 0.9, 0.28], rtol=1e-6)
  assert not oo["obj_boxes"][2].any() and not oo["obj_pixels_u8"][2].any()
  eo = make_pre(tok, reader)(samples[2], 2)  # img_b: [OBJ1] is slot 0 (key order)
  assert (eo["tail_obj"], eo["triplet_type"]) == (0, 2)
  np.testing.assert_allclose(eo["obj_boxes"][0, :4], [0.25, 0.25, 0.75, 1.0])
  spec = batch_spec.example_spec(40, 3, 4)
  assert {k: (v.shape, v.dtype) for k, v in eo.items()} == spec


def ids_at(ex, key):
  return ex["input_ids"][ex[key]]


def test_preprocess_without_captions_and_truncation(minilm_dir, tok, umre_train):
  reader, samples = umre_train
  plain = make_pre(tok, reader, use_caption=False)(samples[1], 0)
  assert plain["head_marker"] == plain["tail_marker"] == -1  # objects: no <o> without captions
  assert plain["token_type_ids"].sum() == 0
  short = RelationTokenizer(minilm_dir, max_length=14)
  ex = make_pre(short, reader)(samples[0], 0)  # caption part truncated away
  assert ex["head_marker"] > 0 and ex["head_desc"] > 0 and ex["tail_desc"] == -1


def test_preprocess_is_deterministic(tok, umre_train):
  reader, samples = umre_train
  a, b = make_pre(tok, reader)(samples[1], 5), make_pre(tok, reader)(samples[1], 5)
  assert all(np.array_equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- tfds cache
def fixture_cfg(cache, root, name="umre", **kw):
  sizes = dict(max_length=32, num_objects=3, crop_size=4)
  return common.data_config(name, root=str(root), cache_dir=str(cache),
                            **{**sizes, **kw}).to_dict()


def test_builder_rows_meta_and_rebuild_on_change(tmp_path, tok):
  cfg = fixture_cfg(tmp_path / "cache", FIXTURES / "umre")
  builder = builder_lib.prepare(cfg)
  src = builder.as_data_source("train")
  assert len(src) == 4 and [int(src[i]["index"]) for i in range(4)] == [0, 1, 2, 3]
  stored = src[1]
  reader = umre.UmreReader(FIXTURES / "umre")
  direct = make_pre(RelationTokenizer(None, 32), reader)(reader.read("train")[0][1], 1)
  for key, value in direct.items():
    np.testing.assert_array_equal(np.asarray(stored[key]).astype(value.dtype), value)
  meta = pipeline.dataset_meta(cfg)
  assert meta["num_classes"] == 5 and meta["negative_id"] == 0 and meta["vocab_size"] == 30534
  assert meta["splits"] == {"train": 4, "val": 3, "test": 2}
  again = builder_lib.RemoteData(cfg)
  assert again.is_prepared() and again.builder_config.name == builder.builder_config.name
  changed = builder_lib.RemoteData(dict(cfg, depth_norm="minmax"))
  assert changed.builder_config.name != builder.builder_config.name
  assert not changed.is_prepared()


def test_parallel_processes_build_one_cache(tmp_path):
  """Two processes asking for the same missing cache at once both get it (one builds)."""
  cfg = fixture_cfg(tmp_path / "cache", FIXTURES / "umre")
  code = ("import json, sys; from remote_jax.data import builder; "
          "b = builder.prepare(json.loads(sys.argv[1])); "
          "print(len(b.as_data_source('train')))")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", code, json.dumps(cfg)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for _, e in outs]
  assert [o.split()[-1] for o, _ in outs] == ["4", "4"]
  assert len(list((tmp_path / "cache" / "remote_data").iterdir())) == 1


def test_builder_skip_mode_counts_preprocessing_failures(tmp_path):
  root = pathlib.Path(shutil.copytree(FIXTURES / "umre", tmp_path / "umre"))
  np.savez(root / "depth_data_umke/img_a.npz", other=np.zeros((2, 2)))  # no 'depth_map'
  cfg = fixture_cfg(tmp_path / "cache", root)
  with pytest.raises(Exception, match=r"img_a\.npz: field depth_map \(used by .*train_set"):
    builder_lib.prepare(cfg)
  cfg["strict"] = "skip"
  meta = builder_lib.meta_from_builder(builder_lib.prepare(cfg), cfg)
  assert meta["skipped"]["train"] == {"missing_depth": 2} and meta["splits"]["train"] == 2
  reports = list((tmp_path / "cache/reports").glob("*/skipped_train.json"))
  assert len(reports) == 1 and json.loads(reports[0].read_text())["counts"] == {
      "missing_depth": 2}


# ---------------------------------------------------------------- grain pipeline
@pytest.fixture(scope="module")
def demo_cfg(tmp_path_factory):
  cache = tmp_path_factory.mktemp("demo_cache")
  cfg = common.data_config("demo", cache_dir=str(cache), max_length=32, num_objects=5,
                           crop_size=8).to_dict()
  cfg["demo"] = dict(cfg["demo"], seed=3, n_train=23, n_val=11, n_test=5, image_size=32)
  pipeline.get_builder(cfg)
  return cfg


def collect(ds):
  return list(iter(ds))


def test_batches_match_contract(demo_cfg):
  batch = next(iter(pipeline.build_dataset(demo_cfg, "train", batch_size=4, shuffle=True,
                                           shard_index=0, shard_count=1)))
  shapes = {k: (v.shape, v.dtype.name) for k, v in batch.items()}
  assert shapes["obj_pixels"] == ((4, 5, 8, 8, 3), "float32")
  assert shapes["obj_depth"] == ((4, 5, 8, 8, 1), "float32")
  assert shapes["obj_boxes"] == ((4, 5, 5), "float32") and shapes["obj_mask"][1] == "bool"
  for key in ("input_ids", "token_type_ids", "attention_mask"):
    assert shapes[key] == ((4, 32), "int32")
  for key in batch_spec.SCALAR_INTS:
    assert shapes[key] == ((4,), "int32")
  assert shapes["mask"] == ((4,), "bool") and "obj_pixels_u8" not in batch
  empty = ~batch["obj_mask"]
  assert not batch["obj_pixels"][empty].any()  # padded slots stay zero after normalising
  assert batch["obj_pixels"][batch["obj_mask"]].min() < -1.0  # CLIP-normalised values


def test_eval_padding_counts_every_example_once(demo_cfg):
  batches = collect(pipeline.build_dataset(demo_cfg, "val", batch_size=4, shard_index=0,
                                           shard_count=1))
  assert len(batches) == 3 and all(b["mask"].shape == (4,) for b in batches)
  index = np.concatenate([b["index"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(np.sort(index), np.arange(11))
  assert np.concatenate([b["mask"] for b in batches]).sum() == 11


def test_shards_partition_the_split(demo_cfg):
  seen = []
  for shard in range(2):
    batches = collect(pipeline.build_dataset(demo_cfg, "val", batch_size=2, shard_index=shard,
                                             shard_count=2))
    assert len(batches) == 3  # ceil(ceil(11 / 2) / 2): the same on both hosts
    seen.append(np.concatenate([b["index"][b["mask"]] for b in batches]))
  assert not set(seen[0]) & set(seen[1])
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(11))
  # Training: each epoch is one global permutation split between hosts.
  epochs = [pipeline.build_map_dataset(demo_cfg, "train", batch_size=1, shuffle=True, seed=7,
                                       num_epochs=2, shard_index=s, shard_count=2)
            for s in range(2)]
  per_host = [[int(ds[i]["index"][0]) for i in range(len(ds))] for ds in epochs]
  assert all(len(p) == 22 for p in per_host)  # 23 trimmed to 22 so hosts step together
  for e in range(2):
    rows = per_host[0][11 * e:11 * (e + 1)] + per_host[1][11 * e:11 * (e + 1)]
    assert len(set(rows)) == 22
  assert per_host[0][:11] != per_host[0][11:]  # reshuffled each epoch


def test_cut_batches_hold_every_token_in_the_same_order(demo_cfg):
  """data.pad_to_multiple_of only drops padding: the same rows, cut to the batch's longest
  example rounded up to the multiple."""
  long_cfg = dict(demo_cfg, max_length=64)   # at 32 the demo's captions fill every batch
  cut_cfg = dict(long_cfg, pad_to_multiple_of=8)
  for split, kw in (("val", {}), ("train", dict(shuffle=True, seed=2, num_epochs=2))):
    full, cut = (collect(pipeline.build_dataset(c, split, batch_size=4, shard_index=0,
                                                shard_count=1, **kw))
                 for c in (long_cfg, cut_cfg))
    assert len(full) == len(cut) > 1
    lengths = set()
    for a, b in zip(full, cut):
      length = b["input_ids"].shape[1]
      lengths.add(length)
      assert length == min(-(-a["attention_mask"].sum(1).max() // 8) * 8, 64)
      assert not a["attention_mask"][:, length:].any()
      assert a.keys() == b.keys()
      for k in a:
        np.testing.assert_array_equal(a[k][:, :length] if k in pipeline.TOKEN_FIELDS else a[k],
                                      b[k])
    assert max(lengths) < 64


def test_group_by_length_batches_similar_lengths_on_every_host(demo_cfg):
  """Each epoch stays one permutation split between hosts; a global batch is cut to one
  length on every host; grouped batches spread less in length than shuffled ones."""
  long_cfg = dict(demo_cfg, max_length=64, pad_to_multiple_of=2)   # lengths 18-40
  cfg = dict(long_cfg, group_by_length=3)
  lengths = pipeline.example_lengths(cfg, "train")
  assert len(lengths) == 23 and lengths.min() > 0

  def hosts(c, seed=7):
    return [collect(pipeline.build_dataset(c, "train", batch_size=2, shuffle=True, seed=seed,
                                           num_epochs=2, shard_index=s, shard_count=2))
            for s in range(2)]
  grouped = hosts(cfg)
  # Grouped epochs hold whole global batches (of 4): 20 of the 23 rows, 5 batches a host.
  assert len(grouped[0]) == len(grouped[1]) == 10
  for b0, b1 in zip(*grouped):
    assert b0["input_ids"].shape == b1["input_ids"].shape
    longest = max(b0["attention_mask"].sum(1).max(), b1["attention_mask"].sum(1).max())
    assert b0["input_ids"].shape[1] == -(-longest // 2) * 2
  rows = [np.concatenate([b["index"] for b in h]) for h in grouped]
  for e in range(2):
    assert len(set(rows[0][10 * e:10 * (e + 1)]) | set(rows[1][10 * e:10 * (e + 1)])) == 20

  def spread(per_host, epoch, per_epoch):   # mean length range within a global batch
    pairs = list(zip(*per_host))[per_epoch * epoch:per_epoch * (epoch + 1)]
    return np.mean([np.ptp(lengths[np.concatenate([b0["index"], b1["index"]])])
                    for b0, b1 in pairs])
  shuffled = hosts(long_cfg)
  for e in range(2):   # in every epoch, not just the first
    assert spread(grouped, e, 5) < 0.6 * spread(shuffled, e, 5)
  with pytest.raises(ValueError, match="saves nothing unless batches are cut"):
    pipeline.build_map_dataset(dict(demo_cfg, group_by_length=2), "train", batch_size=2,
                               shuffle=True)
  again = hosts(cfg)
  assert all(np.array_equal(a["index"], b["index"]) for a, b in zip(grouped[0], again[0]))
  other = hosts(cfg, seed=8)
  assert not all(np.array_equal(a["index"], b["index"]) for a, b in zip(grouped[0], other[0]))


@pytest.mark.parametrize("plan", [{}, dict(max_length=64, pad_to_multiple_of=8,
                                            group_by_length=2)])
def test_iterator_state_round_trip(demo_cfg, plan):
  def make():
    return iter(pipeline.build_dataset(dict(demo_cfg, **plan), "train", batch_size=3,
                                       shuffle=True, seed=1, num_epochs=None, shard_index=0,
                                       shard_count=1))
  it = make()
  for _ in range(4):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(6)]  # crosses the epoch boundary (23 // 3 = 7)
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(6)]):
    assert all(np.array_equal(a[k], b[k]) for k in a)
  fresh = make()
  first = next(fresh)
  assert not np.array_equal(first["index"], expected[0]["index"])


def test_more_and_mnre_build(tmp_path):
  cfg = fixture_cfg(tmp_path / "cache", FIXTURES / "more", name="more")
  ex = builder_lib.prepare(cfg).as_data_source("train")[0]
  assert ex["head_desc"] == -1 and ex["tail_marker"] > 0  # MORE: no <k1>, object gets <o2>
  np.testing.assert_allclose(ex["obj_boxes"][0], [0.25, 0.25, 0.75, 0.75, 0.25])
  root = pathlib.Path(shutil.copytree(FIXTURES / "mnre", tmp_path / "mnre"))
  cfg = fixture_cfg(tmp_path / "cache", root, name="mnre", num_objects=1, use_caption=False,
                    paths=dict(images="img_org/{split}"), strict="skip")
  with pytest.raises(ValueError, match=r"mnre split 'val': every example was skipped "
                     r"\{'missing_image': 1\}; see .*skipped_val\.json"):
    builder_lib.prepare(cfg)
  for split, name in (("val", "twitter_3.jpg"), ("test", "twitter_4.jpg")):
    (root / "img_org" / split).mkdir()
    shutil.copy(root / "img_org/train/twitter_1.jpg", root / "img_org" / split / name)
  (root / "img_org/train/twitter_2.jpg").unlink()
  builder = builder_lib.prepare(cfg)
  meta = builder_lib.meta_from_builder(builder, cfg)
  assert meta["relations"][0] == "None" and meta["splits"]["train"] == 2
  assert meta["skipped"]["train"] == {"missing_image": 1}
  ex = builder.as_data_source("train")[0]
  assert ex["obj_mask"].tolist() == [True] and ex["head_obj"] == ex["tail_obj"] == -1
  np.testing.assert_allclose(ex["obj_boxes"][0], [0, 0, 1, 1, 1])


def _reworded(sample):
  """The same entities in a longer sentence: three extra words before the head."""
  r = sample.record
  shift = lambda e: e if e.is_object else dataclasses.replace(
      e, pos=(e.pos[0] + 3, e.pos[1] + 3))
  record = dataclasses.replace(r, tokens=("so", "it", "seems") + tuple(r.tokens),
                               head=shift(r.head), tail=shift(r.tail))
  return dataclasses.replace(sample, record=record)


def test_modalities_ablation_hides_one_side(tok, umre_train):
  """text: object slots stay but carry no pixels, depth, box or caption; vision: the
  sentence is the markers around one [MASK] per entity (nothing of its shape is left) and
  entity descriptions go."""
  reader, samples = umre_train
  both = make_pre(tok, reader)(samples[1], 1)         # object-object, with captions
  text = make_pre(tok, reader, modalities="text")(samples[1], 1)
  np.testing.assert_array_equal(text["obj_mask"], both["obj_mask"])
  assert both["obj_pixels_u8"].any() and both["obj_boxes"].any()
  for key in ("obj_pixels_u8", "obj_depth", "obj_boxes"):
    assert not text[key].any(), key
  assert both["head_marker"] > 0 and text["head_marker"] == text["tail_marker"] == -1
  ee_both = make_pre(tok, reader)(samples[0], 0)      # entity-entity: names in the sentence
  ee_text = make_pre(tok, reader, modalities="text")(samples[0], 0)
  np.testing.assert_array_equal(ee_text["input_ids"], ee_both["input_ids"])
  vision = make_pre(tok, reader, modalities="vision")(samples[0], 0)
  m = tok.marker_ids
  mask_id = tok.word_ids("[MASK]")[0]
  special = {0, *tok.word_ids("[CLS] [SEP]"), mask_id, *m.values()}
  kept = set(vision["input_ids"][vision["attention_mask"] == 1].tolist())
  assert kept <= special and mask_id in kept
  assert vision["head_marker"] > 0 and vision["head_desc"] == vision["tail_desc"] == -1
  words = vision["input_ids"][vision["attention_mask"] == 1].tolist()
  assert words.count(mask_id) == 2, words   # one per entity: no word count survives
  other = make_pre(tok, reader, modalities="vision")(_reworded(samples[0]), 0)
  np.testing.assert_array_equal(other["input_ids"], vision["input_ids"])
  r = samples[0].record     # the tail before the head in the sentence: the same input
  swapped = dataclasses.replace(samples[0], record=dataclasses.replace(
      r, head=dataclasses.replace(r.head, pos=r.tail.pos),
      tail=dataclasses.replace(r.tail, pos=r.head.pos)))
  assert make_pre(tok, reader)(swapped, 0)["input_ids"].tolist() != ee_both["input_ids"].tolist()
  np.testing.assert_array_equal(
      make_pre(tok, reader, modalities="vision")(swapped, 0)["input_ids"], vision["input_ids"])
  oo_vision = make_pre(tok, reader, modalities="vision")(samples[1], 1)
  assert oo_vision["head_marker"] > 0 and oo_vision["obj_boxes"].any()
  with pytest.raises(ValueError, match="data.modalities"):
    make_pre(tok, reader, modalities="image")

def test_buckets_reach_the_meta_as_rows(tmp_path):
  """buckets.json names lines of the split file; the meta names pipeline rows (`index`), which
  differ from lines once an example is skipped."""
  from remote_jax.data import synth  # pylint: disable=import-outside-toplevel
  root = synth.write_demo_dataset(tmp_path / "demo", seed=2, n_train=6, n_val=3, n_test=30,
                                  image_size=32, caption_absent=0.3)
  lines = umre.UmreReader(root).buckets("test")["compositional"]
  assert len(lines) == 4
  cfg = common.data_config("umre", root=str(root), cache_dir=str(tmp_path / "cache"),
                           max_length=32, num_objects=5, crop_size=8, strict="skip").to_dict()
  meta = builder_lib.meta_from_builder(builder_lib.prepare(cfg), cfg)
  assert meta["buckets"]["test"] == {"compositional": lines}
  assert meta["buckets"]["train"] == {} and meta["buckets"]["val"] == {}
  # Drop the depth of the line before the second bucket line: later rows move up by one.
  (root / f"depth_data_umke/test_{lines[1] - 1:05d}.npz").unlink()
  cfg["cache_dir"] = str(tmp_path / "cache2")
  meta = builder_lib.meta_from_builder(builder_lib.prepare(cfg), cfg)
  assert meta["skipped"]["test"] == {"missing_depth": 1}
  assert meta["buckets"]["test"] == {"compositional": [lines[0]] + [i - 1 for i in lines[1:]]}
