"""MI2RAGE data: WebNLG-style JSONL, MNRE, encodings, and a text-only run on pre-generated views."""
import dataclasses
import json

import ml_collections
import numpy as np
import pytest

from configs import mi2rage_mnre
from mi2rage_jax import data as data_lib
from mi2rage_jax import train, views
from remote_jax.data.records import Entity

ROWS = [
    {"text": "Alan Bean was born in Wheeler , Texas .", "head": "Alan Bean",
     "tail": "Wheeler , Texas", "relation": "birthPlace"},
    {"text": "Aarhus Airport serves the city of Aarhus .", "head": "Aarhus Airport",
     "tail": "Aarhus", "relation": "cityServed"},
    {"text": "Alan Bean met Buzz Aldrin .", "head": "Alan Bean", "tail": "Buzz Aldrin",
     "relation": "none"},
]


def _webnlg(tmp_path, n_train=6, n_test=3):
  root = tmp_path / "webnlg"
  root.mkdir()
  for split, n in (("train", n_train), ("test", n_test)):
    (root / f"{split}.jsonl").write_text(
        "\n".join(json.dumps(ROWS[i % 3]) for i in range(n)) + "\n")
  return root


def _cfg(root, **kw):
  return ml_collections.ConfigDict(dict(name="webnlg", root=str(root), paths={},
                                        train_split="train", test_split="test",
                                        relations=(), **kw))


def test_webnlg_reader_and_encoding(tmp_path):
  ds = data_lib.load(_cfg(_webnlg(tmp_path)))
  assert ds.relations == ["none", "birthPlace", "cityServed"] and ds.negative_id == 0
  assert not ds.has_images
  inst = ds.splits["train"][0]
  assert inst.id == "train/0" and inst.head.pos == (0, 2) and inst.tail.pos == (5, 8)
  assert inst.label == 1 and inst.image is None
  enc = data_lib.Encoder("", 32)
  e = enc.encode_real_text(inst)
  toks = enc.tok.decode_ids(e["input_ids"][:e["attention_mask"].sum()])
  assert toks[e["subj_pos"]] == "<s1>" and toks[e["obj_pos"]] == "<s2>"
  assert toks[e["subj_pos"] + 1:e["subj_pos"] + 3] == ["alan", "bean"]
  cap = enc.encode_caption("a man in a space suit", inst)
  assert cap["subj_pos"] > 0 and cap["obj_pos"] > cap["subj_pos"]
  assert (cap["token_type_ids"][cap["subj_pos"]] == 1)          # names in the pair segment


def test_mark_mentions_marks_named_entities_in_place(tmp_path):
  inst = data_lib.load(_cfg(_webnlg(tmp_path))).splits["train"][0]   # Alan Bean / ...
  enc = data_lib.Encoder("", 48, mark_mentions=True)
  words = lambda e: enc.tok.decode_ids(e["input_ids"][:e["attention_mask"].sum()])
  head, tail = inst.head.name.lower().split(), inst.tail.name.lower().split()
  # The head is named in the caption: marked there; the tail is not: appended alone.
  e = enc.encode_caption(f"a photo of {inst.head.name} in a suit", inst)
  toks = words(e)
  assert toks[e["subj_pos"] - 2:e["subj_pos"]] == ["photo", "of"]
  assert toks[e["subj_pos"]:e["subj_pos"] + len(head) + 2] == ["<s1>", *head, "</s1>"]
  assert e["token_type_ids"][e["subj_pos"]] == 0 and e["token_type_ids"][e["obj_pos"]] == 1
  assert toks[e["obj_pos"]:e["obj_pos"] + len(tail) + 2] == ["<s2>", *tail, "</s2>"]
  assert toks.count("<s1>") == 1 and toks.count("<s2>") == 1
  # Both named: nothing appended (one segment). Neither: the paper's encoding.
  both = enc.encode_caption(f"{inst.tail.name} and {inst.head.name}", inst)
  assert both["token_type_ids"].max() == 0 and both["obj_pos"] < both["subj_pos"]
  paper = data_lib.Encoder("", 48)
  np.testing.assert_array_equal(enc.encode_caption("a man", inst)["input_ids"],
                                paper.encode_caption("a man", inst)["input_ids"])
  # Off, a caption that names the head still gets both names appended.
  off = paper.encode_caption(f"a photo of {inst.head.name}", inst)
  assert off["token_type_ids"][off["subj_pos"]] == 1


def test_mark_mentions_edge_cases(tmp_path):
  base = data_lib.load(_cfg(_webnlg(tmp_path))).splits["train"][0]
  pair = lambda h, t: dataclasses.replace(base, head=Entity(h, (0, 1), False),
                                          tail=Entity(t, (0, 1), False))
  enc = data_lib.Encoder("", 24, mark_mentions=True)
  text = lambda e: " ".join(enc.tok.decode_ids(e["input_ids"][:e["attention_mask"].sum()]))
  # Adjacent spans, a tail inside the head's words then on its own, repeated names, case and
  # edge punctuation: each name marked once, in place.
  assert text(enc.encode_caption("Mira Tosu Kalo Labs", pair("Mira Tosu", "Kalo Labs"))) == (
      "[CLS] <s1> mira to ##su </s1> <s2> ka ##lo labs </s2> [SEP]")
  assert text(enc.encode_caption("Texas Rangers in Texas", pair("Texas Rangers", "Texas"))) == (
      "[CLS] <s1> texas rangers </s1> in <s2> texas </s2> [SEP]")
  assert text(enc.encode_caption("red circle and red circle", pair("red circle", "red circle"))) \
      == "[CLS] <s1> red circle </s1> and <s2> red circle </s2> [SEP]"
  assert text(enc.encode_caption("a photo of kalo labs.", pair("Mira Tosu", "Kalo Labs"))) == (
      "[CLS] a photo of <s2> ka ##lo labs . </s2> [SEP] <s1> mira to ##su </s1> [SEP]")
  # A mention that truncation to max_length would cut is appended instead, never lost.
  e = enc.encode_caption(" ".join("abcdefghijklmnopqrstuv") + " Kalo Labs",
                         pair("Mira Tosu", "Kalo Labs"))
  assert text(e).endswith("[SEP] <s1> mira to ##su </s1> <s2> ka ##lo labs </s2> [SEP]")
  assert e["subj_pos"] > 0 and e["obj_pos"] > e["subj_pos"]


def test_webnlg_errors(tmp_path):
  root = tmp_path / "bad"
  root.mkdir()
  (root / "train.jsonl").write_text(json.dumps(dict(ROWS[0], tail="Houston")) + "\n")
  (root / "test.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
  with pytest.raises(ValueError, match=r"train.jsonl:1: tail 'Houston' does not occur"):
    data_lib.load(_cfg(root))
  (root / "train.jsonl").write_text('{"text": "x"}\n')
  with pytest.raises(ValueError, match=r"train.jsonl:1: expected a JSON object"):
    data_lib.load(_cfg(root))


def test_mnre_reader(mnre_dir):
  cfg = mi2rage_mnre.get_config(f"views=/nonexistent,root={mnre_dir}").data
  ds = data_lib.load(cfg)
  assert ds.relations[0] == "None" and len(ds.relations) == 23
  assert len(ds.splits["train"]) == 12247 and len(ds.splits["val"]) == 1624
  enc = data_lib.Encoder("", 128)
  for inst in ds.splits["train"][:200]:
    e = enc.encode_real_text(inst)
    assert e["subj_pos"] >= 0 and e["obj_pos"] >= 0
  with pytest.raises(ValueError, match="no real image"):
    data_lib.real_image(ds.splits["train"][0])


def _text_only_config(tmp_path):
  """WebNLG-style data with pre-generated image views served from stores."""
  root = _webnlg(tmp_path, n_train=4, n_test=2)
  ds = data_lib.load(_cfg(root))
  stores = {}
  rng = np.random.default_rng(0)
  for split, insts in ds.splits.items():
    store = views.ViewsStore(tmp_path / "views" / split, "image")
    for inst in insts:
      store.add_round(inst.id, 0, [views.View(f"v{k}", 0, "image", "sd", data=rng.integers(
          0, 255, (20, 20, 3), dtype=np.uint8)) for k in range(3)])
    store.save()
    stores[split] = str(store.root)
  from configs import mi2rage_demo
  config = mi2rage_demo.get_config("fast,size=micro,setting=no_real_image,rounds=0")
  config.data = dict(config.data.to_dict(), name="webnlg", root=str(root))
  config.generator = dict(name="pregenerated", stores=stores)
  config.model.vision.image_size = 16
  config.data.image_size = 16
  config.teacher.test_criterion = "maxprob"   # the demo's "real" needs real images
  # The tests' 8 CPU devices: the smallest batch (4) splits over data, tensor holds the rest.
  config.mesh = [("data", 4), ("tensor", 2)]
  return config


@pytest.mark.slow   # a whole sharded MI2RAGE run (~1 min); test_train.py runs one in the fast suite
def test_text_only_data_with_pregenerated_views(tmp_path):
  """WebNLG-style data through the text student, views served from stores."""
  config = _text_only_config(tmp_path)
  summary = train.run(config, tmp_path / "run")["no_real_image"]
  assert summary["test"]["append_real"] is False           # no real image to append
  assert set(summary["stages"].values()) == {"ran"}
  sel = json.loads((tmp_path / "run" / "no_real_image" / "selections" /
                    "test_round0.json").read_text())
  assert sel["criterion"] == "maxprob" and len(sel["instances"]["test/0"]["kept"]) == 3


def test_text_only_data_refuses_ranking_test_views_by_the_real_image(tmp_path):
  config = _text_only_config(tmp_path)
  config.teacher.test_criterion = "real"
  with pytest.raises(ValueError, match="test_criterion='real' .* this dataset has none"):
    train.run(config, tmp_path / "run")


def test_text_only_data_refuses_the_no_real_text_setting(tmp_path):
  config = _text_only_config(tmp_path)
  config.settings = ("no_real_text",)
  with pytest.raises(ValueError, match="needs real images"):
    train.run(config, tmp_path / "run")
