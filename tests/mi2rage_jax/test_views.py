"""Views store (format, validation errors), generators (pregenerated, demo)."""
import json

import ml_collections
import numpy as np
import pytest

from mi2rage_jax import demo_generators, generators, knowledge_world, views
from mi2rage_jax.data import Instance
from remote_jax.data.records import Entity


def _image(seed):
  return np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)


def _write_image_store(root):
  store = views.ViewsStore(root, "image")
  for inst in ("train/0", "train/1"):
    r0 = [views.View(f"r0v{k}", 0, "image", "sd", data=_image(k)) for k in range(3)]
    store.add_round(inst, 0, r0)
    r1 = [views.View(f"r1v{k}", 1, "image", "blip+sd", parent=f"r0v{k}", bridge="a caption",
                     data=_image(10 + k)) for k in range(2)]
    store.add_round(inst, 1, r1)
  store.save()
  return store


def test_round_trip(tmp_path):
  _write_image_store(tmp_path)
  store = views.load_store(tmp_path)
  assert store.modality == "image" and store.instance_ids == ["train/0", "train/1"]
  assert store.num_rounds("train/0") == 2
  vs = store.views("train/0", 1)
  assert [v.parent for v in vs] == ["r0v0", "r0v1"] and vs[0].bridge == "a caption"
  np.testing.assert_array_equal(vs[1].data, _image(11))
  text = views.ViewsStore(tmp_path / "t", "text")
  text.add_round("test/3", 0, [views.View("a", 0, "text", "blip", data="a red circle",
                                          meta={"faithful": True})])
  text.save()
  (v,) = views.load_store(tmp_path / "t").views("test/3", 0)
  assert v.data == "a red circle" and v.meta == {"faithful": True}


def _manifest(tmp_path):
  _write_image_store(tmp_path)
  return json.loads((tmp_path / "manifest.json").read_text())


def _save(tmp_path, m):
  (tmp_path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case,inst,rnd,needle", [
    ("missing_file", "train/1", 1, "missing file"),
    ("no_views", "train/1", None, "instance without views"),
    ("round_order", "train/0", 2, "round out of order"),
    ("text_in_image_store", "train/1", 0, "text view in an image store"),
    ("txt_file_in_image_store", "train/0", 1, "wrong modality"),
    ("not_png", "train/0", 0, "not a PNG"),
    ("bad_parent", "train/1", 1, "parent"),
    ("empty_round", "train/0", 1, "round without views"),
])
def test_validation_errors_name_instance_and_round(tmp_path, case, inst, rnd, needle):
  m = _manifest(tmp_path)
  rounds = m["instances"].get(inst)
  if case == "missing_file":
    (tmp_path / rounds[1]["views"][0]["file"]).unlink()
  elif case == "no_views":
    m["instances"][inst] = []
  elif case == "round_order":
    rounds[1]["round"] = 2
  elif case == "text_in_image_store":
    rounds[0]["views"][2] = {"id": "x", "text": "a caption", "generator": "blip", "parent": None}
  elif case == "txt_file_in_image_store":
    rounds[1]["views"][1]["file"] = "caption.txt"
  elif case == "not_png":
    (tmp_path / rounds[0]["views"][1]["file"]).write_bytes(b"GIF89a not a png")
  elif case == "bad_parent":
    rounds[1]["views"][0]["parent"] = "r1v1"      # same round: not an earlier view
  elif case == "empty_round":
    rounds[1]["views"] = []
  _save(tmp_path, m)
  with pytest.raises(views.ViewsStoreError) as e:
    views.load_store(tmp_path)
  msg = str(e.value)
  assert f"instance {inst!r}" in msg and needle in msg
  if rnd is not None:
    assert f"round {rnd}" in msg


def test_writer_refuses_out_of_order_and_wrong_modality(tmp_path):
  store = views.ViewsStore(tmp_path, "text")
  with pytest.raises(views.ViewsStoreError, match=r"'train/5', round 1: round out of order"):
    store.add_round("train/5", 1, [views.View("a", 1, "text", "g", data="x")])
  with pytest.raises(views.ViewsStoreError, match=r"'train/5', round 0: .*wrong modality"):
    store.add_round("train/5", 0, [views.View("a", 0, "image", "g", data=_image(0))])


def _inst(split="train", row=0):
  e = Entity("small red circle", (0.1, 0.1, 0.3, 0.3), True)
  return Instance(f"{split}/{row}", split, ("a", "b"), e, e, None, 1)


def test_pregenerated_serves_every_view_and_children_of_kept_parents(tmp_path):
  _write_image_store(tmp_path)
  cfg = ml_collections.ConfigDict(dict(name="pregenerated", stores={"train": str(tmp_path)}))
  gen = generators.build(cfg, "image")
  rng = np.random.default_rng(0)
  r0 = gen.initial(_inst(), "real text", 1, rng)
  assert [v.id for v in r0] == ["r0v0", "r0v1", "r0v2"]     # n is not used: nothing dropped
  kids = gen.chain(_inst(), r0[1], 1, 1, rng)
  assert [v.id for v in kids] == ["r1v1"]
  with pytest.raises(views.ViewsStoreError, match=r"'train/0', round 1: no view chained"):
    gen.chain(_inst(), r0[2], 1, 1, rng)
  with pytest.raises(views.ViewsStoreError, match=r"'train/0', round 2: missing round"):
    gen.chain(_inst(), kids[0], 1, 2, rng)
  with pytest.raises(views.ViewsStoreError, match=r"'train/9', round 0"):
    gen.initial(_inst(row=9), "t", 1, rng)
  with pytest.raises(views.ViewsStoreError, match="modality"):
    generators.build(cfg, "text").initial(_inst(), None, 1, rng)


def test_demo_generators_keep_the_described_relation():
  g = demo_generators.DemoGenerators(noise=0.0)
  rng = np.random.default_rng(0)
  text = "a small red square to the left of a large blue circle"
  for _ in range(10):
    image, ok = g.render(text, rng)
    shapes = {s.combo: s for s in knowledge_world.decode(image)}
    a, b = shapes[("red", "square")], shapes[("blue", "circle")]
    assert ok and demo_generators.relation(a, b) == "left"
    caption, ok = g.caption(image, rng)
    assert ok and demo_generators.parse(caption)[0]          # mentions decoded shapes
  mentions, constraints = demo_generators.parse("a green triangle in front of a purple square")
  assert mentions == [(None, "green", "triangle"), (None, "purple", "square")]
  assert constraints == [(0, "front", 1)]


def test_demo_noise_rate():
  g = demo_generators.DemoGenerators(noise=0.3)
  rng = np.random.default_rng(1)
  flags = [g.render("a red circle above a blue square", rng)[1] for _ in range(400)]
  assert abs(1 - np.mean(flags) - 0.3) < 0.07
  with pytest.raises(ValueError):
    demo_generators.DemoGenerators(noise=1.5)
