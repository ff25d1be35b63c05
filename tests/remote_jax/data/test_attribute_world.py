"""Issue 35's attribute world: deterministic, read by the UMRE reader, every relation as
defined (a triplet holds iff its object carries the named attribute), noise as configured."""
import collections
import json

import numpy as np
import pytest
from PIL import Image

from configs import ot_world
from remote_jax import config as config_lib
from remote_jax.data import DATASETS, attribute_world, synth

SMALL = dict(ot_world.ATTRIBUTE_WORLD, n_train=80, n_val=12, n_test=40, pixel_noise=0.1)
# SMALL's own world as GENERATOR_VERSION 2 wrote it before the tag world (c5a5683): sha1[:12].
GOLDEN = {"train_set.json": "6b988411a23f", "test_set.json": "d7ba084c303d",
          "pos_umke.json": "bb4c8c0b9ea2", "world.json": "86a32b64a876"}


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
  return attribute_world.write_attribute_world(tmp_path_factory.mktemp("aw") / "a", **SMALL)


def lines(root, split):
  return [json.loads(x) for x in (root / f"{split}_set.json").read_text().splitlines()]


def triplets(root):
  """(split, line, the image's world.json objects, the line's object slot, its part) of every
  line of a written world."""
  truth = json.loads((root / "world.json").read_text())["images"]
  for split in ("train", "val", "test"):
    for line in lines(root, split):
      slot = int(line["t"]["name"].removeprefix("[OBJ").removesuffix("]"))
      part = "painted" if set(line["token"]) & {"painted", "coloured"} else "drew"
      yield split, line, truth[line["img_id"]], slot, part


def test_same_seed_same_world(world_dir, tmp_path):
  again = attribute_world.write_attribute_world(tmp_path / "b", **SMALL)
  other = attribute_world.write_attribute_world(tmp_path / "c", **dict(SMALL, seed=1))
  for name in ("train_set.json", "test_set.json", "pos_umke.json", "buckets.json",
               "world.json"):
    assert (world_dir / name).read_bytes() == (again / name).read_bytes()
    assert (world_dir / name).read_bytes() != (other / name).read_bytes()
  stem = "UMKE_IMG/train_00003.png"
  assert (world_dir / stem).read_bytes() == (again / stem).read_bytes()


def test_relations_follow_the_rule_on_the_objects_own_attribute(world_dir):
  counts = collections.Counter()
  for split, line, objects, slot, part in triplets(world_dir):
    assert len(objects) == config_lib.attribute_world_objects("own")
    assert len({o[0] for o in objects}) == len({o[1] for o in objects}) == 3
    painted = [o[0] in attribute_world.PAINTED_COLOURS for o in objects]
    assert any(painted) and not all(painted)
    words = set(line["token"])
    assert not words & (set(synth.COLOURS) | set(synth.SHAPES))   # the text names nothing
    colour, shape = objects[slot][:2]
    rule = (colour in attribute_world.PAINTED_COLOURS if part == "painted"
            else shape == attribute_world.DRAWN_SHAPE)
    assert line["relation"] == (part if rule else "none")
    assert line["h"]["name"].split() == line["token"][slice(*line["h"]["pos"])]
    counts[split, line["relation"]] += 1
  assert counts["train", "painted"] == counts["train", "drew"] == 20
  assert counts["train", "none"] == 40


def test_buckets_split_the_parts_and_captions_say_nothing(world_dir):
  buckets = json.loads((world_dir / "buckets.json").read_text())
  for split in ("train", "test"):
    rows = lines(world_dir, split)
    colour, shape = buckets[split]["colour"], buckets[split]["shape"]
    assert sorted(colour + shape) == list(range(len(rows)))
    assert all(set(rows[i]["token"]) & {"painted", "coloured"} for i in colour)
    assert not any(set(rows[i]["token"]) & {"painted", "coloured"} for i in shape)
  captions = json.loads((world_dir / "cap_qwenvl_simply.json").read_text())
  assert {c for caps in captions.values() for k, c in caps.items() if k.startswith("[OBJ")} == {
      synth.ABSENT_CAPTION}


def test_sensor_noise_has_the_configured_spread(world_dir, tmp_path):
  clean = attribute_world.write_attribute_world(tmp_path / "clean", **dict(SMALL, pixel_noise=0))
  noisy = np.asarray(Image.open(world_dir / "UMKE_IMG/train_00000.png"), np.float32)
  plain = np.asarray(Image.open(clean / "UMKE_IMG/train_00000.png"), np.float32)
  background = (plain == synth.BACKGROUND).all(-1)
  assert set(map(tuple, plain.reshape(-1, 3))) <= {synth.BACKGROUND, *synth.COLOURS.values()}
  # Gaussian noise of 0.1 x 255, rounded and clipped at 255 over the background's 235.
  expected = np.clip(np.round(235 + np.random.default_rng(0).normal(0, 25.5, 10**6)), 0, 255)
  assert np.std((noisy - plain)[background]) == pytest.approx(np.std(expected), rel=0.05)


def test_registry_writes_once_and_names_bad_params(tmp_path):
  cfg = ot_world.get_config().data.to_dict()
  cfg.update(root=str(tmp_path / "aw"),
             attribute_world=dict(SMALL, n_train=8, n_val=4, n_test=4))
  reader = DATASETS["attribute_world"].make(cfg)
  samples, _ = reader.read("train")
  assert len(samples) == 8 and (reader.root / "DONE").exists()
  assert DATASETS["attribute_world"].make(cfg).root == reader.root
  with pytest.raises(ValueError, match=r"data\.attribute_world: missing \['pixel_noise'\]"):
    DATASETS["attribute_world"].make(dict(cfg, attribute_world={
        k: v for k, v in SMALL.items() if k != "pixel_noise"}))


def test_the_world_takes_the_towers_noise_and_the_tower_the_worlds_size():
  from remote_jax import config as config_lib
  config = ot_world.get_config()
  config.model.vision.synth.pixel_noise = 0.2
  config.data.attribute_world.image_size = 64
  config_lib.resolve(config)
  assert config.data.attribute_world.pixel_noise == 0.2
  assert config.model.vision.synth.world_size == 64
  config.data.attribute_world.pixel_noise = 0.3
  with pytest.raises(ValueError, match=r"follows model\.vision\.synth\.pixel_noise"):
    config_lib.resolve(config, overridden=("data.attribute_world.pixel_noise",))


@pytest.fixture(scope="module")
def tag_dir(tmp_path_factory):
  return attribute_world.write_attribute_world(tmp_path_factory.mktemp("aw") / "tag",
                                               **dict(SMALL, colour_source="tag"))


def test_tag_world_puts_the_colour_cue_in_the_same_shaped_tag(tag_dir):
  truth = json.loads((tag_dir / "world.json").read_text())["images"]
  counts = collections.Counter()
  for split, line, objects, slot, part in triplets(tag_dir):
    large = [o for o in objects if o[2] == attribute_world.LARGE]
    tags = [o for o in objects if o[2] == attribute_world.TAG]
    assert len(large) == len(tags) == attribute_world.NUM_LARGE
    assert {o[0] for o in large} == {attribute_world.UNPAINTED}   # the read shapes: no colour
    assert sorted(o[1] for o in large) == sorted(o[1] for o in tags)
    assert sum(o[0] in attribute_world.PAINTED_COLOURS for o in tags) == 1
    colour, shape, size = objects[slot][:3]
    assert size == attribute_world.LARGE   # triplets read the large shapes only
    tag_colour = next(o[0] for o in tags if o[1] == shape)
    rule = (tag_colour in attribute_world.PAINTED_COLOURS if part == "painted"
            else shape == attribute_world.DRAWN_SHAPE)
    assert line["relation"] == (part if rule else "none")
    counts[split, line["relation"]] += 1
  assert counts["train", "painted"] == counts["train", "drew"] == 20
  boxes = json.loads((tag_dir / "pos_umke.json").read_text())
  assert {len(b) for b in boxes.values()} == {config_lib.attribute_world_objects("tag")}
  # The large shapes are drawn grey: the mean over a large shape's box centre is grey.
  image = np.asarray(Image.open(tag_dir / "UMKE_IMG/train_00000.png"), np.float32)
  for name, box in boxes["train_00000.png"].items():
    obj = truth["train_00000.png"][int(name.removeprefix("[OBJ").removesuffix("]"))]
    l, t, r, b = (int(round(v * SMALL["image_size"])) for v in box)
    centre = image[(3 * t + b) // 4:(t + 3 * b) // 4, (3 * l + r) // 4:(l + 3 * r) // 4]
    want = (attribute_world.UNPAINTED_RGB if obj[2] == attribute_world.LARGE
            else synth.COLOURS[obj[0]])
    assert np.abs(centre.reshape(-1, 3).mean(0) - want).max() < 12, obj


def test_the_object_count_follows_the_colour_source_and_a_bad_source_is_named():
  from remote_jax import config as config_lib
  config = ot_world.get_config()
  config.data.attribute_world.colour_source = "tag"
  config_lib.resolve(config)
  assert config.data.num_objects == 4
  config.data.attribute_world.colour_source = "elsewhere"
  with pytest.raises(ValueError, match=r"colour_source='elsewhere': allowed \['own', 'tag'\]"):
    config_lib.resolve(config)


def test_read_cue_names_the_object_whose_colour_decides(tag_dir, world_dir):
  for root, source in ((world_dir, "own"), (tag_dir, "tag")):
    truth = json.loads((root / "world.json").read_text())["images"]
    for objects in truth.values():
      for slot, obj in enumerate(objects):
        cue = attribute_world.read_cue(objects, slot, source)
        if source == "own":
          assert cue == (slot, obj[0], obj[1])   # the object itself
        elif obj[2] == attribute_world.TAG:
          assert cue is None
        else:
          assert objects[cue[0]][1:3] == [obj[1], attribute_world.TAG] and cue[1:] == (
              objects[cue[0]][0], obj[1])


def test_the_own_world_is_the_one_the_studies_ran_on(world_dir):
  """The relations, boxes and ground truth of a small own world, pinned (sha1): a change to
  the generator must bump GENERATOR_VERSION and say so (the tag world came without one)."""
  import hashlib
  digest = {name: hashlib.sha1((world_dir / name).read_bytes()).hexdigest()[:12]
            for name in ("train_set.json", "test_set.json", "pos_umke.json", "world.json")}
  assert digest == GOLDEN, digest
