"""Instances (real views + labels) and their encoding for teachers and students.

Readers (`READERS[config.data.name](data_cfg) -> Dataset`):
  demo    the remote_jax demo world (data/synth.py) read as UMRE; an object
          entity '[OBJk]' is named by its caption without the article
          ("small red circle"); real images are the world's PNGs.
  demo_knowledge  the knowledge world (knowledge_world.py): hidden facts that real
          images show and the demo generators know imperfectly, plus the shape world's
          object-object and entity-object examples.
  mnre    MNRE txt (remote_jax MnreReader); images from data.image_dir/<img_id>
          (needed only where the real image is used).
  webnlg  text-only JSONL, one object per line:
            {"text": "Alan Bean was born in Wheeler , Texas .",
             "head": "Alan Bean", "tail": "Wheeler , Texas", "relation": "birthPlace"}
          head/tail must occur verbatim in text (first occurrence is marked);
          relation names come from data.relations (a list; its first entry or
          'none'/'None' is the negative class) or from the train file in sorted
          order with 'none' first. Files: data.root/{train,test}.jsonl (see
          data.paths). No images: only the text student (no_real_image) accepts it.
Instance ids are "<split>/<row>" (the views-store key convention).

Encodings (RelationTokenizer, markers <s1> </s1> subject, <s2> </s2> object):
  names     `[CLS] <s1> head </s1> <s2> tail </s2> [SEP]`          (image teacher)
  caption   `[CLS] caption [SEP] <s1> head </s1> <s2> tail </s2> [SEP]` (text views; with
            mark_mentions a name the caption has is marked there instead, see Encoder)
  real text `[CLS] sentence with in-place markers [SEP] (names of entities not in
            the sentence, e.g. objects, marked the same way) [SEP]`
Subject/object positions are the first <s1>/<s2>; -1 when truncated away.
"""
import dataclasses
import functools
import json
import pathlib

import numpy as np
from PIL import Image

from mi2rage_jax import batch_spec
from mi2rage_jax import knowledge_world as world
from remote_jax.data import mnre as mnre_lib
from remote_jax.data import records, synth, umre
from remote_jax.data.pipeline import CLIP_MEAN, CLIP_STD
from remote_jax.data.preprocess import clip_resize_center_crop, mark_sentence
from remote_jax.data.tokenizer import RelationTokenizer

SUBJ, SUBJ_END, OBJ, OBJ_END = "<s1>", "</s1>", "<s2>", "</s2>"


@dataclasses.dataclass(frozen=True)
class Instance:
  id: str
  split: str
  tokens: tuple | None          # the real sentence as words (None if not available)
  head: records.Entity          # name; pos = word span, or a box for an object
  tail: records.Entity
  image: str | None             # real image path (None if not available)
  label: int
  triplet_type: int = 0
  img_id: str | None = None


@dataclasses.dataclass
class Dataset:
  splits: dict                  # split -> [Instance]
  relations: list
  negative_id: int
  has_images: bool = True
  # {split: {bucket name: instance indices}}: extra score buckets of the test metrics
  # (the knowledge world's example families), as remote_jax's `compositional`.
  buckets: dict = dataclasses.field(default_factory=dict)


def _obj_name(caption, fallback):
  if not caption:
    return fallback
  words = caption.split()
  return " ".join(words[1:]) if words and words[0] in ("a", "an", "the") else caption


def _from_samples(samples, split, rel_index):
  out = []
  for row, s in enumerate(samples):
    r = s.record
    ents = []
    for k, e in enumerate((r.head, r.tail)):
      if e.is_object:
        name = _obj_name(s.captions[k] if s.captions else None, e.name)
        e = records.Entity(name, e.pos, True)
      ents.append(e)
    out.append(Instance(f"{split}/{row}", split, tuple(r.tokens), ents[0], ents[1], s.image,
                        rel_index[r.relation], r.triplet_type, r.img_id))
  return out


def _read(reader, splits):
  rel_index = {n: i for i, n in enumerate(reader.relations)}
  out = {}
  for split in splits:
    samples, _ = reader.read(split)
    out[split] = _from_samples(samples, split, rel_index)
  return out, list(reader.relations), reader.negative_id


def read_demo(cfg):
  params = synth.demo_params(cfg)
  directory = synth.ensure_demo_dataset(cfg.root or pathlib.Path(cfg.cache_dir) / "demo", params)
  reader = umre.UmreReader(directory, strict="strict", use_caption=True, use_depth=False)
  splits, relations, neg = _read(reader, (cfg.train_split, cfg.test_split))
  return Dataset(splits, relations, neg)


def read_mnre(cfg):
  if not cfg.root:
    raise ValueError("data.root is not set: point it at MNRE's mnre_txt/ folder "
                     "(configs/mi2rage_mnre.py:root=DIR or --config.data.root=DIR)")
  reader = mnre_lib.MnreReader(cfg.root, dict(cfg.paths), strict=cfg.strict,
                               use_caption=False, use_depth=False)
  splits, relations, neg = _read(reader, (cfg.train_split, cfg.test_split))
  image_dir = pathlib.Path(cfg.image_dir) if cfg.image_dir else None
  for split, insts in splits.items():
    splits[split] = [dataclasses.replace(i, image=str(image_dir / i.img_id) if image_dir
                                         else None) for i in insts]
  return Dataset(splits, relations, neg, has_images=image_dir is not None)


def read_webnlg(cfg):
  root = pathlib.Path(cfg.root)
  paths = {"train": "train.jsonl", "test": "test.jsonl", **dict(cfg.paths)}
  rows = {}
  for split in (cfg.train_split, cfg.test_split):
    path = root / paths[split]
    if not path.is_file():
      raise FileNotFoundError(f"webnlg split {split!r}: {path} not found (data.root/data.paths)")
    rows[split] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if not line.strip():
        continue
      try:
        d = json.loads(line)
        text, head, tail, rel = d["text"], d["head"], d["tail"], d["relation"]
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}:{n}: expected a JSON object with text, head, tail, relation "
                         f"({type(e).__name__}: {e})") from None
      rows[split].append((path, n, text, head, tail, rel))
  relations = list(cfg.relations) if cfg.relations else None
  if relations is None:
    names = sorted({r[-1] for r in rows[cfg.train_split]} - {"none", "None"})
    relations = ["none"] + names
  rel_index = {r: i for i, r in enumerate(relations)}
  splits = {}
  for split, rs in rows.items():
    insts = []
    for row, (path, n, text, head, tail, rel) in enumerate(rs):
      if rel not in rel_index:
        raise ValueError(f"{path}:{n}: relation {rel!r} not in the relation list")
      tokens = text.split()
      ents = []
      for key, name in (("head", head), ("tail", tail)):
        words = name.split()
        span = find_words(tokens, words)
        if span is None:
          raise ValueError(f"{path}:{n}: {key} {name!r} does not occur (as whole words) in "
                           "text")
        ents.append(records.Entity(name, (span, span + len(words)), False))
      insts.append(Instance(f"{split}/{row}", split, tuple(tokens), ents[0], ents[1], None,
                            rel_index[rel]))
    splits[split] = insts
  neg = records.negative_id(relations) if set(relations) & set(records.NEGATIVE_NAMES) else 0
  return Dataset(splits, relations, neg, has_images=False)


def read_demo_knowledge(cfg):
  """The knowledge world (knowledge_world.py), written under data.root (or
  <data.cache_dir>/demo) if needed; scores per family (kn_seen is where only the image
  decides)."""
  params = {k: dict(cfg.demo)[k] for k in world.WORLD_KEYS}
  root = cfg.root or pathlib.Path(cfg.cache_dir) / "demo"
  directory = world.ensure_world(root, params)
  relations = list(synth.RELATIONS)
  index = {r: i for i, r in enumerate(relations)}
  splits, buckets = {}, {}
  for split in (cfg.train_split, cfg.test_split):
    insts = []
    for row, line in enumerate((directory / f"{split}.jsonl").read_text().splitlines()):
      d = json.loads(line)
      ents = [records.Entity(e["name"], tuple(e["pos"]), e["is_object"])
              for e in (d["head"], d["tail"])]
      insts.append(Instance(f"{split}/{row}", split, tuple(d["tokens"]), ents[0], ents[1],
                            str(directory / d["image"]), index[d["relation"]],
                            d["triplet_type"], d["image"].rsplit("/", 1)[-1]))
      buckets.setdefault(split, {}).setdefault(d["family"], []).append(row)
    splits[split] = insts
  return Dataset(splits, relations, index["none"], buckets=buckets)


READERS = {"demo": read_demo, "demo_knowledge": read_demo_knowledge, "mnre": read_mnre,
           "webnlg": read_webnlg}


def load(cfg) -> Dataset:
  if cfg.name not in READERS:
    raise ValueError(f"data.name={cfg.name!r}; allowed: {sorted(READERS)}")
  return READERS[cfg.name](cfg)


# ----------------------------------------------------------------------------
# Real views


@functools.lru_cache(maxsize=65536)
def _load_rgb(path):
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB"), np.uint8)


def real_image(inst) -> np.ndarray:
  if inst.image is None:
    raise ValueError(f"instance {inst.id}: no real image (data.image_dir unset or text-only "
                     "data); this setting needs one")
  if not pathlib.Path(inst.image).is_file():
    raise FileNotFoundError(f"instance {inst.id}: real image {inst.image} not found")
  return _load_rgb(inst.image)


def real_text(inst) -> str:
  if inst.tokens is None:
    raise ValueError(f"instance {inst.id}: no real text")
  return " ".join(inst.tokens)


def pixels(image_u8, size: int) -> np.ndarray:
  """uint8 (H,W,3) -> CLIP-normalised float32 (size, size, 3)."""
  im = Image.fromarray(np.asarray(image_u8, np.uint8))
  arr = np.asarray(clip_resize_center_crop(im, size), np.float32) / 255.0
  return (arr - CLIP_MEAN) / CLIP_STD


# ----------------------------------------------------------------------------
# Token encodings


def _bare(word):
  """A caption word as the uncased tokenizer sees a name: lower case, edge punctuation off."""
  return word.strip(".,;:!?\"'()").lower()


def find_words(tokens, words, taken=frozenset()):
  """Index of the first occurrence of `words` as whole words in `tokens` that covers no
  index in `taken`, or None."""
  n = len(words)
  return next((i for i in range(len(tokens) - n + 1)
               if list(tokens[i:i + n]) == list(words) and not taken & set(range(i, i + n))),
              None)


class Encoder:
  """Token encodings of instances and text views (fixed length, int32).

  `mark_mentions` (ours, not the paper's, which appends both names to every caption): an
  entity that a caption names (whole words, case and edge punctuation ignored, the first
  occurrence that does not overlap the other entity's) is marked where it stands, as in a
  real sentence, and only the names not found are appended, as are names whose markers
  truncation to max_length would cut. A pretrained encoder links an appended name to its
  mention in the caption; a small one trained from scratch does not (mi2rage_jax/README.md,
  the knowledge world's `no_real_text`).
  """

  def __init__(self, tokenizer_dir, max_length, mark_mentions=False):
    self.tok = RelationTokenizer(tokenizer_dir or None, max_length)
    self.mark_mentions = bool(mark_mentions)
    self.subj_id = self.tok.marker_ids[SUBJ]
    self.obj_id = self.tok.marker_ids[OBJ]
    self.vocab_size = self.tok.vocab_size

  @classmethod
  def from_config(cls, config_data):
    """The encoder of a run's `config.data` (a config without mark_mentions predates it)."""
    return cls(config_data.tokenizer_dir, config_data.max_length,
               config_data.get("mark_mentions", False))

  @staticmethod
  def names(inst, only_missing=False):
    parts = []
    for e, (a, b) in ((inst.head, (SUBJ, SUBJ_END)), (inst.tail, (OBJ, OBJ_END))):
      if not only_missing or e.is_object:
        parts.append(f"{a} {e.name} {b}")
    return " ".join(parts)

  def _finish(self, enc):
    ids = enc["input_ids"]
    enc["subj_pos"] = np.int32(_first(ids, self.subj_id))
    enc["obj_pos"] = np.int32(_first(ids, self.obj_id))
    return enc

  def encode_names(self, inst):
    return self._finish(self.tok.encode(self.names(inst)))

  def encode_caption(self, caption, inst):
    if not self.mark_mentions:
      return self._finish(self.tok.encode(caption, self.names(inst)))
    words = caption.split()
    norm = [_bare(w) for w in words]
    spans, taken = [None, None], set()   # head, tail: first word index in the caption
    for j, e in enumerate((inst.head, inst.tail)):
      name = [_bare(w) for w in e.name.split()]
      spans[j] = find_words(norm, name, taken) if any(name) else None
      if spans[j] is not None:
        taken |= set(range(spans[j], spans[j] + len(name)))
    # A name whose markers truncation to max_length would cut is appended instead.
    for _ in range(3):
      enc = self._marked(words, inst, spans)
      ids = set(enc["input_ids"].tolist())
      cut = [j for j, (a, b) in enumerate(((SUBJ, SUBJ_END), (OBJ, OBJ_END)))
             if spans[j] is not None
             and not {self.tok.marker_ids[a], self.tok.marker_ids[b]} <= ids]
      if not cut:
        return enc
      for j in cut:
        spans[j] = None
    raise AssertionError("unreachable: every cut span was appended")

  def _marked(self, words, inst, spans):
    """Caption words with the head and tail marked at `spans` (word index or None); the
    others appended as the paper does."""
    opens, closes, missing = {}, {}, []
    for i, e, (a, b) in zip(spans, (inst.head, inst.tail), ((SUBJ, SUBJ_END), (OBJ, OBJ_END))):
      if i is None:
        missing.append(f"{a} {e.name} {b}")
      else:
        opens[i], closes[i + len(e.name.split())] = a, b
    out = [t for k in range(len(words) + 1)
           for t in (closes.get(k), opens.get(k), words[k] if k < len(words) else None) if t]
    return self._finish(self.tok.encode(" ".join(out), " ".join(missing) or None))

  def encode_real_text(self, inst):
    marked = mark_sentence(list(inst.tokens), inst.head, inst.tail)
    return self._finish(self.tok.encode(marked, self.names(inst, only_missing=True) or None))


def _first(ids, token):
  hits = np.nonzero(np.asarray(ids) == token)[0]
  return int(hits[0]) if len(hits) else -1


def stack(encs, keys=batch_spec.TOKENS):
  return {k: np.stack([e[k] for e in encs]) for k in keys}
