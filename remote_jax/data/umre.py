"""UMRE as REMOTE's loader expects it (reference_remote.md section 1.1); base of all readers.

Paths are relative to `root` unless absolute; each can be overridden through `data.paths`
(key -> path; "" keeps the default). A `{split}` placeholder is filled with the dataset's own split file name.
"""
import functools
import json
import os
import pathlib
from typing import ClassVar

from remote_jax.config import cfg_get, setting
from remote_jax.data import records
from remote_jax.data.records import DataError

SPLITS = ("train", "val", "test")

# Where each dataset's files come from, for the error a user sees without them.
WHERE_FROM = {
    "umre": "UMRE comes from the REMOTE authors (github.com/Nikol-coder/REMOTE): "
            "UMRE_Data.zip (images) and umke_partner.zip (train_set.json, val_set.json, "
            "test_set.json, pos_umke.json, cap_qwenvl_simply.json) from their Google Drive, "
            "plus Depth-Anything-V2 depth maps (<stem>.npz with 'depth_map').",
    "more": "MORE comes from github.com/NJUNLP/MORE (txt/, img_org/, img_dep/, "
            "caption_dict.json, rel2id.json; convert ent_*_dict.pth once with "
            "`python -m remote_jax.data.more --convert-pth`).",
    "mnre": "MNRE comes from github.com/thecharm/MNRE (mnre_txt/: mnre_train.txt, "
            "'mnre_val .txt', mnre_test.txt; images optional).",
}


class UmreReader:
  """Reads one split into validated `records.Sample`s: `read(split) -> (samples, validation)`."""
  name = "umre"
  SPLIT_NAMES: ClassVar[dict] = {"train": "train", "val": "val", "test": "test"}
  DEFAULT_PATHS: ClassVar[dict] = dict(
      train="train_set.json", val="val_set.json", test="test_set.json",
      boxes="pos_umke.json", captions="cap_qwenvl_simply.json",
      images="UMKE_IMG", depth="depth_data_umke", relations="rel2id_umke_partner.json",
      buckets="buckets.json")
  MAX_OBJECTS = 12
  descriptions_required = True  # `<k>` texts for textual entities ([DS] 176-178)

  def __init__(self, root, paths=None, *, strict="strict", use_caption=True, use_depth=True,
               num_objects=None):
    self.root = pathlib.Path(root)
    self.paths = dict(self.DEFAULT_PATHS)
    # "" (the config's value for every key) keeps the default.
    self.paths.update({k: v for k, v in dict(paths or {}).items() if v != ""})
    unknown = set(self.paths) - set(self.DEFAULT_PATHS)
    if unknown:
      raise ValueError(f"data.paths for {self.name}: unknown keys {sorted(unknown)}; "
                       f"known: {sorted(self.DEFAULT_PATHS)}")
    self.strict = records.check_mode(strict)
    self.use_caption = bool(use_caption)
    self.use_depth = bool(use_depth)
    self.num_objects = int(num_objects or self.MAX_OBJECTS)
    if self.use_caption and not self.paths.get("captions"):
      raise ValueError(f"{self.name} has no captions file configured: set data.use_caption=False "
                       "or data.paths.captions")

  @classmethod
  def from_config(cls, cfg):
    root = cfg_get(cfg, "root")
    if not root:
      raise ValueError(f"data.root is not set for dataset {cls.name!r}. "
                       f"{WHERE_FROM.get(cls.name, '')} Then pass "
                       "--config.data.root=DIR (and data.paths.<key> for files elsewhere).")
    return cls(root, cfg_get(cfg, "paths"), strict=setting(cfg, "strict"),
               use_caption=setting(cfg, "use_caption"), use_depth=setting(cfg, "use_depth"),
               num_objects=setting(cfg, "num_objects"))

  # Paths.
  def path(self, key, split=None):
    value = self.paths.get(key)
    if not value:
      return None
    value = str(value).format(split=self.SPLIT_NAMES.get(split, split))
    return pathlib.Path(value) if os.path.isabs(value) else self.root / value

  def split_file(self, split):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return self._required(split, split)

  def source_files(self, split):
    """Text files whose content defines this split's examples (hashed into the cache key)."""
    keys = [split, "boxes", "relations", "buckets"] + (["captions"] if self.use_caption else [])
    return [p for p in (self.split_file(split) if k == split else self.path(k, split)
                        for k in keys) if p is not None and p.is_file()]

  def resource_dirs(self, split):
    """Image/depth directories; their listings (name, size, mtime) join the cache key."""
    keys = ["images"] + (["depth"] if self.use_depth else [])
    return [p for p in (self.path(k, split) for k in keys) if p is not None and p.is_dir()]

  # Tables.
  @functools.cached_property
  def relations(self):
    return records.load_relations(self._required("relations"))

  @property
  def negative_id(self):
    return records.negative_id(self.relations)

  def _required(self, key, split=None):
    path = self.path(key, split)
    if path is None or not path.is_file():
      raise FileNotFoundError(f"{self.name}: {key} {path} not found; set data.root or "
                              f"data.paths.{key}")
    return path

  def _json(self, key, split=None):
    path = self._required(key, split)
    try:
      return path, json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise DataError("malformed", path, None, "<file>", f"not JSON ({str(e)[:60]})",
                      "write the file as JSON") from None

  def load_boxes(self, split):
    """{img_id: {'[OBJk]': (l, t, r, b)}} as published (key order = slot order)."""
    return self._json("boxes", split)

  def buckets(self, split):
    """{name: sorted 0-based line indices of the split file} from the optional buckets file
    ({split: {name: [index, ...]}}), e.g. the demo world's `compositional` test examples; {}
    when the file or the split's entry is absent."""
    path = self.path("buckets", split)
    if path is None or not path.is_file():
      return {}
    path, table = self._json("buckets", split)
    if not isinstance(table, dict):
      raise DataError("malformed", path, None, "<file>", "not a JSON object",
                      'write {"<split>": {"<bucket>": [line index, ...]}}')
    entry = table.get(split, {})
    if not isinstance(entry, dict):
      raise DataError("malformed", path, None, f"[{split!r}]", "not a JSON object",
                      'write {"<bucket>": [line index, ...]}')
    out = {}
    for name, indices in entry.items():
      if not isinstance(indices, list) or not all(
          isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
        raise DataError("malformed", path, None, f"[{split!r}][{name!r}]",
                        "not a list of non-negative integers",
                        "list the 0-based line indices of the split file")
      out[name] = sorted(set(indices))
    return out

  @functools.cached_property
  def _captions(self):
    return self._json("captions")

  def _listing(self, directory):
    """File names of a directory, listed once (existence checks for every line)."""
    listings = self.__dict__.setdefault("_listings", {})
    if directory not in listings:
      listings[directory] = (frozenset(os.listdir(directory)) if os.path.isdir(directory)
                             else frozenset())
    return listings[directory]

  # Reading.
  def read(self, split):
    validation = records.Validation(self.strict)
    rows = records.read_split(self.split_file(split), self.relations, validation)
    context = self._context(split)
    samples = []
    for record in rows:
      try:
        samples.append(self.resolve(record, context))
      except DataError as e:
        validation.fail(e)
    return samples, validation

  def _context(self, split):
    boxes_path, boxes = self.load_boxes(split)
    return dict(split=split, boxes_path=boxes_path, boxes=boxes, image_cache={},
                images=self.path("images", split), depth=self.path("depth", split))

  def _objects(self, record, ctx):
    """Validated boxes of the record's image, cached per image (value or error)."""
    cache = ctx["image_cache"]
    if record.img_id not in cache:
      try:
        cache[record.img_id] = self._image_objects(record.img_id, ctx)
      except DataError as e:
        cache[record.img_id] = e
    value = cache[record.img_id]
    if isinstance(value, DataError):  # reported for every line that uses the image
      raise value.for_line(f"{record.source}:{record.line}")
    return value

  def _image_objects(self, img_id, ctx):
    raw = ctx["boxes"].get(img_id) if isinstance(ctx["boxes"], dict) else None
    if not isinstance(raw, dict):
      raise DataError("missing_box", ctx["boxes_path"], None, f"[{img_id!r}]",
                      "the image has no box entry",
                      "add the image to the box file ({} when it has no objects)")
    if len(raw) > self.num_objects:
      raise DataError("too_many_objects", ctx["boxes_path"], None, f"[{img_id!r}]",
                      f"{len(raw)} boxes > data.num_objects={self.num_objects}",
                      "raise data.num_objects or drop boxes")
    return tuple((name, records.check_box(self.to_ltrb(box), ctx["boxes_path"],
                                          f"[{img_id!r}][{name!r}]"))
                 for name, box in raw.items())

  def to_ltrb(self, box):
    return box  # UMRE stores (l, t, r, b) already

  def resolve(self, record, ctx):
    """Record -> Sample: image, depth, boxes and captions present and valid, or DataError."""
    objects = self._objects(record, ctx)
    names = [n for n, _ in objects]
    for key, entity in (("h", record.head), ("t", record.tail)):
      if entity.is_object and entity.name not in names:
        raise DataError("missing_box", record.source, record.line, f"{key}.name",
                        f"object {entity.name} has no box for image {record.img_id!r} in "
                        f"{ctx['boxes_path']}", "add its box or correct the object name")
    # The reference opens the image (and depth) for every triplet, objects or not.
    image = self._file("images", ctx["images"], record.img_id, record, "missing_image")
    depth = None
    if self.use_depth:
      depth = self._file("depth", ctx["depth"], record.img_id.split(".")[0] + ".npz", record,
                         "missing_depth")
    captions = self._captions_for(record) if self.use_caption else None
    return records.Sample(record, image, depth, objects, captions)

  def _file(self, key, directory, name, record, reason):
    if directory is None or name not in self._listing(str(directory)):
      raise DataError(reason, record.source, record.line, "img_id", f"{key} file {name!r} not "
                      f"found in {directory}", f"add it or set data.paths.{key}"
                      + (" / data.use_depth=False" if key == "depth" else ""))
    return str(pathlib.Path(directory) / name)

  def _captions_for(self, record):
    path, table = self._captions
    per_image = table.get(record.img_id) if isinstance(table, dict) else None
    out = []
    for entity in (record.head, record.tail):
      caption = per_image.get(entity.name) if isinstance(per_image, dict) else None
      if not entity.is_object and not self.descriptions_required and not caption:
        out.append(None)  # no description published: the `<k>` part is left out
        continue
      if not isinstance(caption, str) or not caption.strip():
        raise DataError("missing_caption", record.source, record.line,
                        f"captions[{record.img_id!r}][{entity.name!r}]",
                        f"no caption in {path}", "add the caption/description or set "
                        "data.use_caption=False")
      out.append(caption)
    return tuple(out)
