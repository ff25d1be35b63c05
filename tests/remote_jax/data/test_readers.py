"""Readers of the published formats (UMRE, MORE, MNRE) and every validation failure."""
import ast
import json
import pathlib
import shutil

import numpy as np
import pytest

from configs import common
from remote_jax.data import DATASETS, mnre, more, preprocess, records, umre
from remote_jax.data.records import DataError
from tests.conftest import FIXTURES


def copy_fixture(name, tmp_path):
  return pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def edit_line(path, number, fn):
  lines = path.read_text().splitlines()
  value = fn(ast.literal_eval(lines[number - 1]))
  lines[number - 1] = value if isinstance(value, str) else repr(value)
  path.write_text("\n".join(lines) + "\n")


def edit_json(path, fn):
  data = json.loads(path.read_text())
  fn(data)
  path.write_text(json.dumps(data))


def test_parse_line_types_and_list_names():
  line = ("{'token': ['Bob', 'Stone', 'car'], 'h': {'name': ['Bob', 'Stone'], 'pos': [0, 2]}, "
          "'t': {'name': '[OBJ1]', 'pos': [0, 0, 1, 1]}, 'img_id': 'x.jpg', 'relation': 'none'}")
  r = records.parse_line(line, "f.json", 7)
  assert r.head == records.Entity("Bob Stone", (0, 2), False)
  assert r.tail.is_object and r.tail.name == "[OBJ1]"
  assert (r.source, r.line, r.triplet_type) == ("f.json", 7, 2)


def test_umre_reads_fixture():
  reader = umre.UmreReader(FIXTURES / "umre")
  assert reader.relations[0] == "none" and reader.negative_id == 0
  samples, validation = reader.read("train")
  assert len(samples) == 4 and validation.counts == {}
  assert [s.record.triplet_type for s in samples] == [0, 1, 2, 0]
  oo = samples[1]
  assert [n for n, _ in oo.objects] == ["[OBJ0]", "[OBJ1]"]
  assert oo.slot(oo.record.head) == 0 and oo.slot(oo.record.tail) == 1
  assert oo.captions == ("a man in a red coat", "a tall tower")
  assert oo.depth.endswith("img_a.npz") and oo.image.endswith("img_a.png")
  eo = samples[2]  # key order of pos_umke.json sets the slots: [OBJ1] comes first for img_b
  assert [n for n, _ in eo.objects] == ["[OBJ1]", "[OBJ0]"] and eo.slot(eo.record.tail) == 0
  assert samples[3].objects == () and samples[3].captions == ("the capital of France .",
                                                             "Alice is a singer .")


def test_readers_registry_and_paths_override(tmp_path):
  root = copy_fixture("umre", tmp_path)
  (root / "pos_umke.json").rename(root / "boxes.json")
  cfg = common.data_config("umre", root=str(root)).to_dict()
  cfg["paths"]["boxes"] = "boxes.json"
  reader = DATASETS["umre"].make(cfg)
  assert len(reader.read("val")[0]) == 3
  with pytest.raises(ValueError, match="unknown keys"):
    umre.UmreReader(root, dict(boxs="x"))
  with pytest.raises(FileNotFoundError, match="data.paths.boxes"):
    umre.UmreReader(root).read("val")


def _drop_img_id(d):
  del d["img_id"]
  return d


def _set(path_keys, value):
  def fn(d):
    node = d
    for k in path_keys[:-1]:
      node = node[k]
    node[path_keys[-1]] = value
    return d
  return fn


def _box(img, obj, box):
  return lambda root: edit_json(root / "pos_umke.json", lambda d: d[img].__setitem__(obj, box))


def _unlink(rel):
  return lambda root: (root / rel).unlink()


# (mutation of the copied UMRE fixture, reason, file, line, field, examples skipped of 4)
CASES = {
    "syntax": (lambda r: edit_line(r / "train_set.json", 1, lambda d: "{'token': ['a'"),
               "malformed", "train_set.json", 1, "<line>", 1),
    "not_a_dict": (lambda r: edit_line(r / "train_set.json", 1, lambda d: "[1, 2]"),
                   "malformed", "train_set.json", 1, "<line>", 1),
    "missing_field": (lambda r: edit_line(r / "train_set.json", 1, _drop_img_id),
                      "malformed", "train_set.json", 1, "img_id", 1),
    "bad_object_name": (lambda r: edit_line(r / "train_set.json", 2, _set(["h", "name"], "OBJ0")),
                        "malformed", "train_set.json", 2, "h.name", 1),
    "unknown_relation": (lambda r: edit_line(r / "train_set.json", 4, _set(["relation"], "foo")),
                         "unknown_relation", "train_set.json", 4, "relation", 1),
    "span_out_of_range": (lambda r: edit_line(r / "train_set.json", 1, _set(["h", "pos"], [0, 9])),
                          "span", "train_set.json", 1, "h.pos", 1),
    "span_name_mismatch": (lambda r: edit_line(r / "train_set.json", 1,
                                               _set(["t", "name"], "London")),
                           "span", "train_set.json", 1, "t.pos", 1),
    "box_outside_unit": (_box("img_a.png", "[OBJ1]", [0.5, 0.1, 1.2, 0.6]), "box",
                         "pos_umke.json", 1, "['img_a.png']['[OBJ1]']", 2),
    "box_r_le_l": (_box("img_a.png", "[OBJ1]", [0.5, 0.1, 0.5, 0.6]), "box",
                   "pos_umke.json", 1, "['img_a.png']['[OBJ1]']", 2),
    "box_b_le_t": (_box("img_b.png", "[OBJ0]", [0.0, 0.5, 0.5, 0.4]), "box",
                   "pos_umke.json", 3, "['img_b.png']['[OBJ0]']", 1),
    "object_without_box": (lambda r: edit_line(r / "train_set.json", 3,
                                               _set(["t", "name"], "[OBJ5]")),
                           "missing_box", "train_set.json", 3, "t.name", 1),
    "image_without_box_entry": (lambda r: edit_json(r / "pos_umke.json",
                                                    lambda d: d.pop("img_c.png")),
                                "missing_box", "pos_umke.json", 4, "['img_c.png']", 1),
    "missing_image": (_unlink("UMKE_IMG/img_c.png"), "missing_image", "train_set.json", 4,
                      "img_id", 1),
    "missing_depth": (_unlink("depth_data_umke/img_b.npz"), "missing_depth", "train_set.json", 3,
                      "img_id", 1),
    "missing_caption": (lambda r: edit_json(r / "cap_qwenvl_simply.json",
                                            lambda d: d["img_c.png"].pop("Paris")),
                        "missing_caption", "train_set.json", 4, "['img_c.png']['Paris']", 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_umre_strict_error_names_file_line_field(case, tmp_path):
  mutate, reason, source, line, field, _ = CASES[case]
  root = copy_fixture("umre", tmp_path)
  mutate(root)
  with pytest.raises(DataError) as e:
    umre.UmreReader(root).read("train")
  message = str(e.value)
  assert "\n" not in message and e.value.reason == reason
  assert source in message and field in message and "fix:" in message
  assert f"train_set.json:{line}" in message  # the line that needs the broken thing


@pytest.mark.parametrize("case", sorted(CASES))
def test_umre_skip_mode_counts_and_lists(case, tmp_path):
  mutate, reason, _, _, _, skipped = CASES[case]
  root = copy_fixture("umre", tmp_path)
  mutate(root)
  samples, validation = umre.UmreReader(root, strict="skip").read("train")
  assert validation.counts == {reason: skipped}
  assert len(samples) == 4 - skipped
  report = json.loads(validation.write(tmp_path / "reports", "skipped_train").read_text())
  assert report["counts"] == {reason: skipped} and len(report["skipped"]) == skipped
  assert {"reason", "source", "line", "field", "message"} <= set(report["skipped"][0])


def test_too_many_objects(tmp_path):
  reader = umre.UmreReader(FIXTURES / "umre", num_objects=1)
  with pytest.raises(DataError, match=r"pos_umke\.json: field \['img_a\.png'\] \(used by "
                     r".*train_set\.json:1\): 2 boxes > data\.num_objects=1"):
    reader.read("train")
  reader = umre.UmreReader(FIXTURES / "umre", num_objects=1, strict="skip")
  samples, validation = reader.read("train")
  assert validation.counts == {"too_many_objects": 3} and len(samples) == 1


def test_options_relax_requirements(tmp_path):
  root = copy_fixture("umre", tmp_path)
  shutil.rmtree(root / "depth_data_umke")
  (root / "cap_qwenvl_simply.json").unlink()
  samples, _ = umre.UmreReader(root, use_depth=False, use_caption=False).read("train")
  assert len(samples) == 4 and samples[1].depth is None and samples[1].captions is None


def test_bad_mode_and_blank_lines(tmp_path):
  with pytest.raises(ValueError, match="data.strict"):
    umre.UmreReader(FIXTURES / "umre", strict="lenient")
  root = copy_fixture("umre", tmp_path)
  path = root / "val_set.json"
  path.write_text(path.read_text() + "\n  \n")
  assert len(umre.UmreReader(root).read("val")[0]) == 3


def test_more_converts_centre_boxes_and_uses_split_dirs():
  reader = more.MoreReader(FIXTURES / "more", use_caption=False)
  assert reader.relations == ["none", "/per/misc/present_in", "/org/misc/present_in"]
  samples, validation = reader.read("train")
  assert len(samples) == 3 and validation.counts == {}
  np.testing.assert_allclose(samples[0].objects[0][1], (0.25, 0.25, 0.75, 0.75))
  np.testing.assert_allclose(samples[0].objects[1][1], (0.0, 0.5, 0.5, 1.0))
  assert all(s.record.triplet_type == 2 for s in samples)
  val, _ = reader.read("val")
  assert "img_org/valid/m3.png" in val[0].image and val[0].depth.endswith("img_dep/m3.npz")


def test_more_captions_are_object_only(tmp_path):
  samples, _ = more.MoreReader(FIXTURES / "more").read("train")
  assert samples[0].captions == (None, "a player")  # no <k> part for the text entity
  assert preprocess.caption_text(samples[0].record, samples[0].captions) == "<o2> a player </o2>"
  root = copy_fixture("more", tmp_path)
  edit_json(root / "caption_dict.json", lambda d: d["m1.png"].pop("[OBJ1]"))
  with pytest.raises(DataError,
                     match=r"txt/train\.txt:2: field captions\['m1\.png'\]\['\[OBJ1\]'\]"):
    more.MoreReader(root).read("train")


def test_more_limits_and_pth(tmp_path):
  root = copy_fixture("more", tmp_path)
  edit_json(root / "ent_train_dict.json", lambda d: d["m1.png"].update(
      {f"[OBJ{k}]": [0.5, 0.5, 0.1, 0.1] for k in range(2, 11)}))
  with pytest.raises(DataError, match="11 boxes > data.num_objects=10"):
    more.MoreReader(root, use_caption=False).read("train")
  (root / "ent_test_dict.pth").write_bytes(b"")
  reader = more.MoreReader(root, dict(boxes="ent_{split}_dict.pth"), use_caption=False)
  with pytest.raises(DataError, match="convert_more_pth"):
    reader.read("test")


def test_convert_more_pth_needs_torch_only_there(tmp_path):
  try:
    import torch  # noqa: F401
    pytest.skip("torch is installed")
  except ImportError:
    pass
  with pytest.raises(ImportError, match="needs torch, only for this one-off conversion"):
    more.convert_more_pth(tmp_path / "ent_train_dict.pth", tmp_path / "out.json")


def test_mnre_fixture_val_name_with_space():
  reader = mnre.MnreReader(FIXTURES / "mnre", use_caption=False)
  assert reader.split_file("val").name == "mnre_val .txt"
  assert reader.relations == ["None", "/per/loc/place_of_residence", "/per/per/couple"]
  assert reader.negative_id == 0
  samples, validation = reader.read("train")
  assert len(samples) == 3 and validation.counts == {}
  assert samples[0].objects == () and samples[0].image is None and samples[0].depth is None


def test_mnre_captions_and_objects_are_errors(tmp_path):
  with pytest.raises(ValueError, match="use_caption=False"):
    mnre.MnreReader(FIXTURES / "mnre")
  root = copy_fixture("mnre", tmp_path)
  edit_line(root / "mnre_train.txt", 2, _set(["t"], {"name": "[OBJ0]", "pos": [0, 0, 1, 1]}))
  with pytest.raises(DataError, match=r"mnre_train\.txt:2: field t\.pos: MNRE has no visual"):
    mnre.MnreReader(root, use_caption=False).read("train")


def test_mnre_optional_images_fill_one_slot(tmp_path):
  reader = mnre.MnreReader(FIXTURES / "mnre", dict(images="img_org/{split}"), use_caption=False)
  samples, _ = reader.read("train")
  assert samples[0].objects == (mnre.WHOLE_IMAGE,) and samples[0].image.endswith("twitter_1.jpg")
  assert samples[0].depth is None and samples[0].slot(samples[0].record.head) == -1
  with pytest.raises(DataError, match=r"mnre_val \.txt:1: field img_id: images file "):
    reader.read("val")


def test_mnre_real_annotations(mnre_dir):
  reader = mnre.MnreReader(mnre_dir, use_caption=False)
  assert len(reader.relations) == 23 and reader.relations[reader.negative_id] == "None"
  samples, validation = reader.read("val")
  assert validation.counts == {} and len(samples) == 1624
  assert all(s.record.triplet_type == 0 for s in samples)
