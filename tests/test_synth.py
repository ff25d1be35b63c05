"""The demo world: deterministic, read by the UMRE reader, all triplet types, sane labels."""
import collections
import json

import numpy as np
import pytest
from PIL import Image

from remote_jax.data import DATASETS, synth, umre

SMALL = dict(n_train=60, n_val=12, n_test=12, image_size=48)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
  return synth.write_demo_dataset(tmp_path_factory.mktemp("demo") / "a", seed=5, **SMALL)


def test_same_seed_same_dataset(demo, tmp_path):
  again = synth.write_demo_dataset(tmp_path / "b", seed=5, **SMALL)
  other = synth.write_demo_dataset(tmp_path / "c", seed=6, **SMALL)
  for name in ("train_set.json", "val_set.json", "pos_umke.json", "cap_qwenvl_simply.json",
               "rel2id_umke_partner.json"):
    assert (demo / name).read_text() == (again / name).read_text()
  assert (demo / "train_set.json").read_text() != (other / "train_set.json").read_text()
  for stem in ("train_00000", "test_00011"):
    assert np.array_equal(np.asarray(Image.open(demo / f"UMKE_IMG/{stem}.png")),
                          np.asarray(Image.open(again / f"UMKE_IMG/{stem}.png")))
    assert np.array_equal(np.load(demo / f"depth_data_umke/{stem}.npz")["depth_map"],
                          np.load(again / f"depth_data_umke/{stem}.npz")["depth_map"])


@pytest.fixture(scope="module")
def train(demo):
  reader = umre.UmreReader(demo)
  samples, validation = reader.read("train")
  assert validation.counts == {}
  return reader, samples


def test_reader_round_trip(demo, train):
  reader, samples = train
  assert reader.relations == list(synth.RELATIONS) and reader.negative_id == 0
  assert len(samples) == 60
  for split, n in (("val", 12), ("test", 12)):
    rows, validation = reader.read(split)
    assert len(rows) == n and validation.counts == {}
  assert all(2 <= len(s.objects) <= 5 for s in samples)


def test_triplet_types_and_label_balance(train):
  _, samples = train
  types = collections.Counter(s.record.triplet_type for s in samples)
  assert types == {0: 20, 1: 20, 2: 20}
  labels = collections.Counter(s.record.relation for s in samples)
  assert set(labels) == set(synth.RELATIONS)
  assert 0.3 <= labels["none"] / len(samples) <= 0.5
  assert min(labels.values()) >= 4
  by_type = collections.defaultdict(set)
  for s in samples:
    by_type[s.record.triplet_type].add(s.record.relation)
  assert by_type[0] == {"none", "works_for", "lives_in"}
  assert by_type[1] == {"none", "left_of", "above", "in_front_of"}
  assert by_type[2] == {"none", "holds", "owned_by"}
  eo_orders = {(s.record.head.is_object, s.record.tail.is_object) for s in samples
               if s.record.triplet_type == 2}
  assert eo_orders == {(True, False), (False, True)}


def _centre(box):
  return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_labels_follow_the_scene(train):
  _, samples = train
  for s in samples:
    r = s.record
    boxes = dict(s.objects)
    if r.relation in ("left_of", "above"):
      (hx, hy), (tx, ty) = _centre(boxes[r.head.name]), _centre(boxes[r.tail.name])
      assert (hx < tx - 0.3) if r.relation == "left_of" else (hy < ty - 0.3)
    if r.relation == "in_front_of":
      depth = np.load(s.depth)["depth_map"]
      n = depth.shape[0]
      (hx, hy), tb = _centre(boxes[r.head.name]), boxes[r.tail.name]
      head = depth[int(hy * n), int(hx * n)]  # the nearer shape is drawn on top
      tail = set(np.unique(depth[int(tb[1] * n):int(tb[3] * n), int(tb[0] * n):int(tb[2] * n)]))
      tail -= {np.float32(synth.BACKGROUND_DEPTH), head}
      assert len(tail) == 1 and tail.pop() < head - 0.9
    if r.triplet_type == 2:
      obj = r.head if r.head.is_object else r.tail
      caption = s.captions[0] if r.head.is_object else s.captions[1]
      described = " ".join(r.tokens)
      matches = caption.split(" ", 2)[-1] in described  # "a small red circle" -> "red circle"
      assert matches == (r.relation != "none"), (described, caption, obj)


def test_demo_registry_writes_once(tmp_path):
  cfg = dict(name="demo", root=str(tmp_path / "demo"), demo=dict(seed=1, **SMALL))
  reader = DATASETS["demo"](cfg)
  assert (reader.root / "DONE").exists()
  stamp = (reader.root / "train_set.json").stat().st_mtime_ns
  assert DATASETS["demo"](cfg).root == reader.root
  assert (reader.root / "train_set.json").stat().st_mtime_ns == stamp
  assert json.loads((reader.root / "DONE").read_text())["seed"] == 1
  other = DATASETS["demo"](dict(cfg, demo=dict(seed=2, **SMALL)))
  assert other.root != reader.root
