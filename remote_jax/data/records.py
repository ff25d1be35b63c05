"""The published per-line format shared by UMRE, MORE and MNRE, and its validation.

Each line of a split file is one Python dict literal (the reference reads it with
`ast.literal_eval`): `{'token': [...], 'h': {'name', 'pos'}, 't': {'name', 'pos'},
'img_id': str, 'relation': str}`. `pos` of length 2 is a word span [s, e) of a textual
entity; length 4 marks a visual object whose name is '[OBJk]'.

Every problem becomes a `DataError` with a one-line message naming file, line and field and
how to fix it. `Validation` either raises it (strict) or records it (skip), so nothing is
dropped without being counted and listed.
"""
import ast
import collections
import dataclasses
import json
import pathlib
import re

STRICT_MODES = ("strict", "skip")
# Checked in this order by the reference metrics (reference_remote.md section 4.4).
NEGATIVE_NAMES = ("NA", "na", "no_relation", "Other", "Others", "none", "None")
OBJECT_NAME = re.compile(r"^\[OBJ(\d+)\]$")
_SKIP_HINT = "or set data.strict='skip' to skip and list such examples"
# Boxes within this distance of [0, 1] are clamped: float noise from cxcywh conversion.
BOX_TOLERANCE = 1e-6


class DataError(ValueError):
  """A data problem located at `source:line`, field `field`; `reason` groups skip counts.

  `used_by` names the split line that needs a shared resource (a box, an image) when the
  problem sits in that resource's file.
  """

  def __init__(self, reason, source, line, field, problem, fix, used_by=None):
    self.reason, self.source, self.line, self.field = reason, str(source), line, field
    self.problem, self.fix, self.used_by = problem, fix, used_by
    where = f"{source}:{line}" if line else f"{source}"
    used = f" (used by {used_by})" if used_by else ""
    super().__init__(f"{where}: field {field}{used}: {problem}; fix: {fix}, {_SKIP_HINT}")

  def for_line(self, used_by):
    return DataError(self.reason, self.source, self.line, self.field, self.problem, self.fix,
                     used_by)


@dataclasses.dataclass(frozen=True)
class Entity:
  name: str
  pos: tuple
  is_object: bool


@dataclasses.dataclass(frozen=True)
class Record:
  tokens: tuple
  head: Entity
  tail: Entity
  img_id: str
  relation: str
  source: str
  line: int

  @property
  def triplet_type(self):
    """0 entity-entity, 1 object-object, 2 entity-object (either order)."""
    if self.head.is_object and self.tail.is_object:
      return 1
    return 2 if (self.head.is_object or self.tail.is_object) else 0


@dataclasses.dataclass(frozen=True)
class Sample:
  """A validated record with its resources resolved by a reader (input of preprocessing)."""
  record: Record
  image: str | None        # image file path; None when the dataset has no objects
  depth: str | None        # depth `.npz` path; None when depth is off or there are no objects
  objects: tuple           # ((name '[OBJk]', (l, t, r, b)), ...) in slot order
  captions: tuple | None   # (head caption, tail caption); None when captions are off

  def slot(self, entity):
    """Object slot of an object entity, -1 for a textual one."""
    if not entity.is_object:
      return -1
    return [name for name, _ in self.objects].index(entity.name)


def check_mode(mode):
  if mode not in STRICT_MODES:
    raise ValueError(f"data.strict={mode!r}; expected one of {STRICT_MODES}")
  return mode


class Validation:
  """Strict mode raises the first DataError; skip mode collects them by reason."""

  def __init__(self, mode="strict"):
    self.mode = check_mode(mode)
    self.skipped = []

  def fail(self, error):
    if self.mode == "strict":
      raise error
    self.skipped.append(dict(reason=error.reason, source=error.source, line=error.line,
                             field=error.field, message=str(error)))

  @property
  def counts(self):
    return dict(sorted(collections.Counter(s["reason"] for s in self.skipped).items()))

  def write(self, directory, name):
    """Writes `{name}.json` = {"counts": {reason: n}, "skipped": [...]} and returns its path."""
    path = pathlib.Path(directory) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(counts=self.counts, skipped=self.skipped), indent=1))
    return path


def _entity(raw, key, tokens, source, line):
  fix = (f"give '{key}' a dict with 'name' (str) and 'pos' ([start, end) word span, or a "
         "4-number box for an '[OBJk]' object)")
  if not isinstance(raw, dict) or "name" not in raw or "pos" not in raw:
    raise DataError("malformed", source, line, key, f"expected a dict with 'name' and 'pos', got "
                    f"{str(raw)[:80]!r}", fix)
  name, pos = raw["name"], raw["pos"]
  if isinstance(name, (list, tuple)):  # [DS] 168 joins a token-list name with spaces
    name = " ".join(str(n) for n in name)
  if not isinstance(name, str) or not isinstance(pos, (list, tuple)) or len(pos) not in (2, 4) \
      or not all(isinstance(p, (int, float)) and not isinstance(p, bool) for p in pos):
    raise DataError("malformed", source, line, f"{key}.pos", f"name {name!r} pos {pos!r} is not "
                    "a string with a list of 2 or 4 numbers", fix)
  if len(pos) == 4:
    if not OBJECT_NAME.match(name):
      raise DataError("malformed", source, line, f"{key}.name", f"object (4-number pos) named "
                      f"{name!r}, expected '[OBJk]'", "name visual objects '[OBJ0]', '[OBJ1]', ...")
    return Entity(name, tuple(pos), True)
  s, e = pos
  if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(tokens)):
    raise DataError("span", source, line, f"{key}.pos", f"span {list(pos)} is out of range for "
                    f"{len(tokens)} tokens", "use an exclusive-end word span [start, end) inside "
                    "'token'")
  if " ".join(tokens[s:e]) != name:
    raise DataError("span", source, line, f"{key}.pos", f"' '.join(token[{s}:{e}]) = "
                    f"{' '.join(tokens[s:e])!r} != name {name!r}", "make 'pos' cover exactly the "
                    "words of 'name' (exclusive end)")
  return Entity(name, (s, e), False)


def parse_line(text, source, line):
  """One split-file line -> Record; raises DataError("malformed"/"span") on problems."""
  try:
    raw = ast.literal_eval(text.strip())
  except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
    raise DataError("malformed", source, line, "<line>", f"not a Python/JSON dict literal "
                    f"({type(e).__name__}: {str(e)[:60]})", "write one dict per line") from None
  if not isinstance(raw, dict):
    raise DataError("malformed", source, line, "<line>", f"a {type(raw).__name__}, not a dict",
                    "write one dict per line")
  for key, kind in (("token", list), ("h", dict), ("t", dict), ("img_id", str),
                    ("relation", str)):
    if not isinstance(raw.get(key), kind):
      raise DataError("malformed", source, line, key, f"missing or not a {kind.__name__} "
                      f"(got {type(raw.get(key)).__name__})", f"add '{key}' as a {kind.__name__}")
  tokens = raw["token"]
  if not tokens or not all(isinstance(t, str) for t in tokens):
    raise DataError("malformed", source, line, "token", "must be a non-empty list of strings",
                    "store the sentence as a list of words")
  tokens = tuple(tokens)
  head = _entity(raw["h"], "h", tokens, source, line)
  tail = _entity(raw["t"], "t", tokens, source, line)
  return Record(tokens, head, tail, raw["img_id"], raw["relation"], str(source), line)


def read_split(path, relations, validation):
  """All records of one split file; bad lines go through `validation`. Blank lines are not
  records (trailing newlines). `relations=None` accepts any label."""
  path = pathlib.Path(path)
  records, known = [], None if relations is None else set(relations)
  with open(path, encoding="utf-8") as f:
    for number, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        record = parse_line(text, path, number)
        if known is not None and record.relation not in known:
          raise DataError("unknown_relation", path, number, "relation",
                          f"{record.relation!r} is not in the relation map ({len(known)} names)",
                          "add it to the relation map or correct the label")
      except DataError as e:
        validation.fail(e)
        continue
      records.append(record)
  return records


def load_relations(path):
  """The reference relation map (one JSON dict name -> id) -> names ordered by id."""
  path = pathlib.Path(path)
  try:
    mapping = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError) as e:
    raise DataError("malformed", path, None, "<file>", f"cannot read a JSON relation map "
                    f"({type(e).__name__})", "write {name: id} as JSON") from None
  ids = sorted(mapping.values()) if isinstance(mapping, dict) else None
  if ids != list(range(len(ids or ()))) or not ids:
    raise DataError("malformed", path, None, "<ids>", "relation ids must be 0..n-1, each once",
                    "renumber the relation map")
  return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]


def negative_id(relations):
  """Id of the negative class, chosen like the reference metrics ([MET])."""
  for name in NEGATIVE_NAMES:
    if name in relations:
      return relations.index(name)
  raise ValueError(f"no negative class among {NEGATIVE_NAMES} in relations {relations}")


def check_box(box, source, where):
  """A normalised (l, t, r, b) box -> float tuple clamped to [0,1]; DataError("box") if bad."""
  fix = "store boxes as normalised [left, top, right, bottom] with 0 <= l < r <= 1, 0 <= t < b <= 1"
  if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
    raise DataError("box", source, None, where, f"box {box!r} is not 4 numbers", fix)
  l, t, r, b = (float(v) for v in box)
  if min(l, t, r, b) < -BOX_TOLERANCE or max(l, t, r, b) > 1 + BOX_TOLERANCE:
    raise DataError("box", source, None, where, f"box {list(box)} leaves [0, 1]", fix)
  if r <= l or b <= t:
    raise DataError("box", source, None, where, f"box {list(box)} has r <= l or b <= t", fix)
  clamp = lambda v: min(max(v, 0.0), 1.0)
  return (clamp(l), clamp(t), clamp(r), clamp(b))
