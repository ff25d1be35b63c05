"""MNRE txt files (thecharm/MNRE `mnre_txt/`, reference_remote.md section 1.3).

Entity-entity only: no object boxes. Images are optional: with `data.paths.images` set
(a `{split}` placeholder is allowed), each example gets the whole image as its one object
slot '[IMG]' (box 0,0,1,1; depth from `data.paths.depth` when set); otherwise every slot is
empty. The published validation file is named `mnre_val .txt` (with a space); both
spellings are accepted.
Relation names come from the data ('None' = negative, id 0, then sorted) unless
`data.paths.relations` names a relation map. No captions are published, so
`data.use_caption` needs `data.paths.captions`.
"""
import functools
from typing import ClassVar

from remote_jax.data import records, umre
from remote_jax.data.records import DataError

NEGATIVE = "None"
WHOLE_IMAGE = ("[IMG]", (0.0, 0.0, 1.0, 1.0))


class MnreReader(umre.UmreReader):
  name = "mnre"
  DEFAULT_PATHS: ClassVar[dict] = dict(
      train="mnre_train.txt", val="mnre_val.txt", test="mnre_test.txt",
      boxes=None, captions=None, images=None, depth=None, relations=None)
  ALIASES: ClassVar[dict] = {"val": ("mnre_val .txt",)}

  def split_file(self, split):
    path = self.path(split, split)
    if split in self.ALIASES and path is not None and not path.is_file() \
        and self.paths[split] == self.DEFAULT_PATHS[split]:
      for alias in self.ALIASES[split]:
        if (self.root / alias).is_file():
          return self.root / alias
    return super().split_file(split)

  @functools.cached_property
  def relations(self):
    if self.path("relations") is not None:
      return records.load_relations(self._required("relations"))
    names = set()
    for split in umre.SPLITS:
      try:
        path = self.split_file(split)
      except FileNotFoundError:
        continue
      # Bad lines are reported by read(); here they only must not add names.
      names.update(r.relation for r in records.read_split(path, None, records.Validation("skip")))
    if not names:
      raise FileNotFoundError(f"mnre: no split file under {self.root}; set data.root")
    names.discard(NEGATIVE)
    return [NEGATIVE] + sorted(names)

  def _context(self, split):
    return dict(split=split, images=self.path("images", split), depth=self.path("depth", split))

  def resolve(self, record, ctx):
    for key, entity in (("h", record.head), ("t", record.tail)):
      if entity.is_object:
        raise DataError("malformed", record.source, record.line, f"{key}.pos",
                        "MNRE has no visual objects but pos has 4 numbers",
                        "use a [start, end) word span")
    image = depth = None
    if ctx["images"] is not None:
      image = self._file("images", ctx["images"], record.img_id, record, "missing_image")
      if self.use_depth and ctx["depth"] is not None:
        depth = self._file("depth", ctx["depth"], record.img_id.split(".")[0] + ".npz", record,
                           "missing_depth")
    captions = self._captions_for(record) if self.use_caption else None
    return records.Sample(record, image, depth, (WHOLE_IMAGE,) if image else (), captions)

