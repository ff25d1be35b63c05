"""The demo world v3: deterministic, read by the UMRE reader, every relation as defined."""
import collections
import json
import re

import numpy as np
import pytest
from PIL import Image

from configs import common
from remote_jax.data import DATASETS, synth, umre

SMALL = dict(common.DEMO_WORLD, n_train=150, n_val=60, n_test=150, image_size=48)
POSITION_WORDS = ("left", "right", "above", "below", "top", "bottom", "front", "behind", "near",
                  "far", "under", "over")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return synth.write_demo_dataset(tmp_path_factory.mktemp("demo") / "a", **{**SMALL, "seed": 5})


@pytest.fixture(scope="module")
def world(demo):
  return json.loads((demo / "world.json").read_text())


def test_same_seed_same_dataset(demo, tmp_path):
  again = synth.write_demo_dataset(tmp_path / "b", **{**SMALL, "seed": 5})
  other = synth.write_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 6})
  for name in ("train_set.json", "val_set.json", "test_set.json", "pos_umke.json",
               "cap_qwenvl_simply.json", "rel2id_umke_partner.json", "buckets.json",
               "world.json"):
    assert (demo / name).read_bytes() == (again / name).read_bytes()
  for name in ("train_set.json", "test_set.json", "world.json"):
    assert (demo / name).read_text() != (other / name).read_text()
  for stem in ("train_00000", "test_00011"):
    assert (demo / f"UMKE_IMG/{stem}.png").read_bytes() == (
        again / f"UMKE_IMG/{stem}.png").read_bytes()
    assert np.array_equal(np.load(demo / f"depth_data_umke/{stem}.npz")["depth_map"],
                          np.load(again / f"depth_data_umke/{stem}.npz")["depth_map"])


@pytest.fixture(scope="module")
def reader(demo):
  return umre.UmreReader(demo)


@pytest.fixture(scope="module")
def splits(reader):
  out = {}
  for split in umre.SPLITS:
    samples, validation = reader.read(split)
    assert validation.counts == {}
    out[split] = samples
  return out


def test_reader_round_trip_and_sizes(reader, splits):
  assert reader.relations == list(synth.RELATIONS) and reader.negative_id == 0
  for split, n in (("train", 150), ("val", 60), ("test", 150)):
    types = collections.Counter(s.record.triplet_type for s in splits[split])
    assert types == {0: n // 3, 1: n // 3, 2: n // 3}
  assert all(2 <= len(s.objects) <= 5 for s in splits["train"])


def test_default_sizes_are_per_type():
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  world = dict(demo_config.get_config().data.demo)
  assert world == common.DEMO_WORLD and set(world) == set(synth.WORLD_KEYS)
  for key, least in (("n_train", 1000), ("n_val", 500), ("n_test", 500)):
    assert world[key] // 3 >= least
  plan = synth._plan(np.random.default_rng(0), world["n_test"], "test")
  comp = sum(p[3] for p in plan)
  assert comp >= 150 and all(p[0] == "eo" for p in plan if p[3])


def test_labels_per_type_balanced(splits):
  samples = splits["train"]
  by_type = collections.defaultdict(collections.Counter)
  for s in samples:
    by_type[s.record.triplet_type][s.record.relation] += 1
  assert set(by_type[0]) == {"none", "works_for", "lives_in"}
  assert set(by_type[1]) == {"none", "left_of", "above", "in_front_of"}
  assert set(by_type[2]) == {"none", "holds", "owned_by"}
  for counts in by_type.values():
    assert counts["none"] / sum(counts.values()) == pytest.approx(0.4, abs=0.02)
  eo_orders = {(s.record.head.is_object, s.record.tail.is_object) for s in samples
               if s.record.triplet_type == 2}
  assert eo_orders == {(True, False), (False, True)}


def _centre(box):
  return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _lead(word, anchor, other):
  (ax, ay), (ox, oy) = _centre(anchor), _centre(other)
  return {"left of": ax - ox, "right of": ox - ax, "above": ay - oy, "below": oy - ay}[word]


def _overlap(a, b):
  return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def _own_depth(depth, box):
  """Nearness values at the non-background pixels inside a box."""
  n = depth.shape[0]
  patch = depth[int(round(box[1] * n)):int(round(box[3] * n)),
                int(round(box[0] * n)):int(round(box[2] * n))]
  return set(np.unique(patch).tolist()) - {float(np.float32(synth.BACKGROUND_DEPTH))}


EO = re.compile(r"the shape (left of|right of|above|below) the (\w+) (\w+)")


def _check_eo(s, objects, truth):
  r = s.record
  match = EO.search(" ".join(r.tokens))
  assert match, r.tokens
  word, colour, shape = match.groups()
  names = [n for n, _ in objects]
  anchors = [n for n, t in zip(names, truth) if (t[0], t[1]) == (colour, shape)]
  assert len(anchors) == 1
  boxes = dict(objects)
  anchor = anchors[0]
  # Both attributes are needed: other shapes share the colour or the shape.
  attrs = {n: tuple(t[:2]) for n, t in zip(names, truth)}
  leads = {n: _lead(word, boxes[anchor], boxes[n]) for n in names if n != anchor}
  beyond = [n for n, v in leads.items() if v >= synth.EO_MARGIN - 1e-3]  # boxes are rounded
  clear = [n for n, v in leads.items() if v <= synth.EO_CLEAR + 1e-3]
  assert len(beyond) == 1 and len(beyond) + len(clear) == len(names) - 1
  target = beyond[0]
  rest = [attrs[n] for n in names if n not in (anchor, target)]
  assert any(c == colour and sh != shape for c, sh in rest)
  assert any(c != colour and sh == shape for c, sh in rest)
  assert (attrs[target][0] == colour) != (attrs[target][1] == shape)
  obj = r.head if r.head.is_object else r.tail
  if r.relation == "none":
    assert obj.name != target
  else:
    assert obj.name == target
    assert r.relation == ("owned_by" if r.head.is_object else "holds")
  for c in list(synth.COLOURS) + list(synth.SHAPES):
    words = " ".join(r.tokens).split()
    assert c not in words or c in (colour, shape)  # the target is never named
  return (colour, shape)


def test_every_relation_follows_its_definition(splits, world):
  seen = collections.Counter()
  for split, samples in splits.items():
    for s in samples:
      r = s.record
      truth = world["images"][r.img_id]
      boxes = dict(s.objects)
      assert len(truth) == len(s.objects)
      if r.triplet_type == 1:
        h, t = boxes[r.head.name], boxes[r.tail.name]
        depth = np.load(s.depth)["depth_map"]
        dh, dt = _own_depth(depth, h), _own_depth(depth, t)
        assert len(dh) == len(dt) == 1  # no overlap: each box holds its own shape only
        dh, dt = dh.pop(), dt.pop()
        (hx, hy), (tx, ty) = _centre(h), _centre(t)
        rel = {"left_of": tx - hx >= 0.38, "above": ty - hy >= 0.38,
               "in_front_of": dh - dt >= 0.9 and not _overlap(h, t)}
        reverse = {"left_of": hx - tx >= 0.38, "above": hy - ty >= 0.38,
                   "in_front_of": dt - dh >= 0.9}
        if r.relation == "none":
          assert not any(rel.values()) and sum(reverse.values()) == 1
        else:
          assert [k for k, v in rel.items() if v] == [r.relation] and not any(reverse.values())
        if r.relation in ("in_front_of", "none") and (rel["in_front_of"] or
                                                      reverse["in_front_of"]):
          assert abs(tx - hx) < 0.38 and abs(ty - hy) < 0.38
          assert not _overlap(h, t)
          seen["depth-only"] += 1
      elif r.triplet_type == 2:
        anchor = _check_eo(s, s.objects, truth)
        seen[(split, anchor)] += 1
        seen[r.relation] += 1
  assert seen["depth-only"] > 20 and seen["holds"] and seen["owned_by"] and seen["none"]


def test_captions_do_not_give_the_answer(demo, world):
  captions = json.loads((demo / "cap_qwenvl_simply.json").read_text())
  absent = total = 0
  for img_id, caps in captions.items():
    truth = world["images"][img_id]
    for k, (colour, shape, size, _) in enumerate(truth):
      cap = caps[f"[OBJ{k}]"]
      words = cap.split()
      total += 1
      absent += cap == synth.ABSENT_CAPTION
      assert not any(w in words for w in POSITION_WORDS)
      assert not (colour in words and shape in words)  # partial at most
      assert cap in (synth.ABSENT_CAPTION, f"a {colour} shape", f"a {shape}", f"a {size} shape")
  assert absent / total == pytest.approx(SMALL["caption_absent"], abs=0.05)


def test_compositional_bucket(demo, reader, splits, world):
  held = {tuple(c) for c in world["held_out_anchors"]}
  assert len(held) == synth.HELD_OUT
  assert len({c for c, _ in held}) == len({s for _, s in held}) == synth.HELD_OUT
  anchors = {}
  for split, samples in splits.items():
    anchors[split] = [_check_eo(s, s.objects, world["images"][s.record.img_id])
                      if s.record.triplet_type == 2 else None for s in samples]
  assert not held & set(anchors["train"]) and not held & set(anchors["val"])
  bucket = json.loads((demo / "buckets.json").read_text())["test"]["compositional"]
  assert bucket == sorted(set(bucket))
  assert bucket == [i for i, a in enumerate(anchors["test"]) if a in held]
  assert len(bucket) == round(synth.COMPOSITIONAL_SHARE * SMALL["n_test"] // 3)
  assert reader.buckets("test") == {"compositional": bucket}
  assert reader.buckets("train") == {} and reader.buckets("val") == {}


def test_reader_buckets_errors(demo, tmp_path):
  assert umre.UmreReader(tmp_path).buckets("test") == {}
  for bad in ("[1]", '{"test": [1]}', '{"test": {"c": [1, -2]}}', '{"test": {"c": "x"}}',
              "not json"):
    (tmp_path / "buckets.json").write_text(bad)
    with pytest.raises(umre.DataError, match="buckets.json") as e:
      umre.UmreReader(tmp_path).buckets("test")
    assert "\n" not in str(e.value)


def test_images_render_the_world(demo, world):
  """Pixels at each object's box centre (drawn nearest-last, disjoint) have its colour."""
  boxes = json.loads((demo / "pos_umke.json").read_text())
  for img_id in list(boxes)[:40]:
    image = np.asarray(Image.open(demo / "UMKE_IMG" / img_id))
    n = image.shape[0]
    for k, (colour, shape, _, _) in enumerate(world["images"][img_id]):
      box = boxes[img_id][f"[OBJ{k}]"]
      cx, cy = _centre(box)
      y = int((cy + (box[3] - box[1]) / 4 if shape == "triangle" else cy) * n)
      assert tuple(image[y, int(cx * n)]) == synth.COLOURS[colour]


def test_demo_registry_writes_once(tmp_path):
  small = dict(n_train=30, n_val=9, n_test=9, image_size=48)
  cfg = common.data_config("demo", root=str(tmp_path / "demo")).to_dict()
  cfg["demo"] = dict(common.DEMO_WORLD, seed=1, **small)
  reader = DATASETS["demo"].make(cfg)
  assert (reader.root / "DONE").exists()
  stamp = (reader.root / "train_set.json").stat().st_mtime_ns
  assert DATASETS["demo"].make(cfg).root == reader.root
  assert (reader.root / "train_set.json").stat().st_mtime_ns == stamp
  assert json.loads((reader.root / "DONE").read_text())["seed"] == 1
  other = DATASETS["demo"].make(dict(cfg, demo=dict(cfg["demo"], seed=2)))
  assert other.root != reader.root
  with pytest.raises(ValueError, match=r"data\.demo: missing \['caption_absent'\]"):
    DATASETS["demo"].make(dict(cfg, demo=dict(seed=2, **small)))
