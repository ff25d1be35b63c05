"""The views store: synthetic views on disk, per instance and per CCG round.

Layout of a store directory (one store holds one synthetic modality):

  <root>/manifest.json
  <root>/<any relative path>.png   image views (RGB PNG)
  <root>/<any relative path>.txt   text views stored as files (UTF-8)

manifest.json:

  {
    "format": "mi2rage-views",
    "version": 1,
    "modality": "image" | "text",          # the synthetic modality
    "instances": {
      "<instance id>": [                   # rounds, in order 0, 1, ..., K
        {"round": 0, "views": [
          {"id": "r0v0",                   # unique within the instance
           "file": "train/17/r0v0.png",    # image views: a PNG file (required)
           "text": "a man holding ...",    # text views: inline text, or "file" (.txt)
           "generator": "sd2.1",           # the cross-modal generator that made it
           "parent": null,                 # round 0: null (made from the real view)
           "bridge": null,                 # optional: the intermediate real-modality
                                           #   view (U_r) as text, or a file path
           "meta": {}},                    # optional, free-form (e.g. demo "faithful")
          ...]},
        {"round": 1, "views": [
          {"id": "r1v0", ..., "parent": "r0v3"}, ...]}]}
  }

Instance ids are strings, by convention "<split>/<index in split>". A view of
round r > 0 names as `parent` a view of an earlier round of the same instance
(the kept view it was chained from: parent image -> caption -> image, or
parent caption -> image -> caption).

Validation on load (`load_store`, or `validate` on a written store) raises
`ViewsStoreError` naming the instance and the round for: an instance without
views, a round out of order (rounds must be 0, 1, 2, ... in order), an empty
round, a missing file, a view of the wrong modality (a text view in an image
store, or the reverse; a non-PNG image file), a duplicate view id, a parent
that is not an earlier view of the instance, or a round-0 view with a parent.
Nothing is silently dropped: every view in the manifest is served.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

FORMAT = "mi2rage-views"
VERSION = 1
MODALITIES = ("image", "text")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class ViewsStoreError(ValueError):
  """A malformed views store; the message names the instance and the round."""


@dataclasses.dataclass
class View:
  """One synthetic view. `data` is an (H,W,3) uint8 array or a str (loaded lazily)."""
  id: str
  round: int
  modality: str
  generator: str
  parent: str | None = None
  bridge: str | None = None
  data: Any = None
  file: str | None = None
  meta: dict | None = None

  def record(self) -> dict:
    rec = {"id": self.id, "generator": self.generator, "parent": self.parent}
    if self.bridge is not None:
      rec["bridge"] = self.bridge
    if self.meta:
      rec["meta"] = self.meta
    if self.file is not None:
      rec["file"] = self.file
    elif self.modality == "text":
      rec["text"] = self.data
    return rec


def _err(instance, rnd, msg):
  where = f"instance {instance!r}" + ("" if rnd is None else f", round {rnd}")
  return ViewsStoreError(f"views store: {where}: {msg}")


def _check_view(root, modality, inst, rnd, rec, seen_ids, earlier_ids, check_files):
  if not isinstance(rec, dict) or "id" not in rec:
    raise _err(inst, rnd, f"view record without an 'id': {rec!r}")
  vid = str(rec["id"])
  if vid in seen_ids:
    raise _err(inst, rnd, f"duplicate view id {vid!r}")
  parent = rec.get("parent")
  if rnd == 0 and parent is not None:
    raise _err(inst, rnd, f"view {vid!r}: a round-0 view has no parent (got {parent!r})")
  if rnd > 0 and parent not in earlier_ids:
    raise _err(inst, rnd, f"view {vid!r}: parent {parent!r} is not a view of an earlier round")
  f = rec.get("file")
  if modality == "image":
    if "text" in rec:
      raise _err(inst, rnd, f"view {vid!r}: a text view in an image store")
    if not f:
      raise _err(inst, rnd, f"view {vid!r}: an image view needs a 'file'")
    if not str(f).lower().endswith(".png"):
      raise _err(inst, rnd, f"view {vid!r}: wrong modality: image views are PNG files, got {f!r}")
  else:
    if f is None and not isinstance(rec.get("text"), str):
      raise _err(inst, rnd, f"view {vid!r}: a text view needs 'text' or a .txt 'file'")
    if f is not None and not str(f).lower().endswith(".txt"):
      raise _err(inst, rnd, f"view {vid!r}: wrong modality: text views are .txt files, got {f!r}")
  if f is not None and check_files:
    path = root / f
    if not path.is_file():
      raise _err(inst, rnd, f"view {vid!r}: missing file {str(path)!r}")
    if modality == "image":
      with open(path, "rb") as fh:
        if fh.read(8) != _PNG_MAGIC:
          raise _err(inst, rnd, f"view {vid!r}: wrong modality: {str(path)!r} is not a PNG image")
  return vid


def validate_manifest(manifest: dict, root, check_files: bool = True) -> None:
  """Raises ViewsStoreError (naming instance and round) on any defect."""
  root = pathlib.Path(root)
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ViewsStoreError(
        f"views store {root}: format/version {manifest.get('format')!r}/"
        f"{manifest.get('version')!r}, expected {FORMAT!r}/{VERSION}")
  modality = manifest.get("modality")
  if modality not in MODALITIES:
    raise ViewsStoreError(f"views store {root}: modality {modality!r} not in {MODALITIES}")
  instances = manifest.get("instances")
  if not isinstance(instances, dict):
    raise ViewsStoreError(f"views store {root}: 'instances' must be a dict")
  for inst, rounds in instances.items():
    if not rounds:
      raise _err(inst, None, "instance without views")
    seen: set[str] = set()
    for expect, rnd_rec in enumerate(rounds):
      rnd = rnd_rec.get("round") if isinstance(rnd_rec, dict) else None
      if rnd != expect:
        raise _err(inst, rnd, f"round out of order: expected round {expect} at position {expect}")
      views = rnd_rec.get("views")
      if not views:
        raise _err(inst, rnd, "round without views")
      earlier = set(seen)
      for rec in views:
        seen.add(_check_view(root, modality, inst, rnd, rec, seen, earlier, check_files))


class ViewsStore:
  """Reads and writes a views store. Load views with `views(instance, round)`."""

  def __init__(self, root, modality: str, instances: dict | None = None):
    if modality not in MODALITIES:
      raise ViewsStoreError(f"views store {root}: modality {modality!r} not in {MODALITIES}")
    self.root = pathlib.Path(root)
    self.modality = modality
    self._instances: dict[str, list[dict]] = instances if instances is not None else {}

  # -- reading
  @property
  def instance_ids(self) -> list[str]:
    return list(self._instances)

  def num_rounds(self, instance: str) -> int:
    return len(self._rounds(instance))

  def _rounds(self, instance):
    if instance not in self._instances:
      raise _err(instance, None, "instance not in the store")
    return self._instances[instance]

  def views(self, instance: str, rnd: int, load: bool = True) -> list[View]:
    rounds = self._rounds(instance)
    if not 0 <= rnd < len(rounds):
      raise _err(instance, rnd, f"the store has rounds 0..{len(rounds) - 1} only")
    return [self._view(instance, rnd, rec, load) for rec in rounds[rnd]["views"]]

  def _view(self, instance, rnd, rec, load):
    v = View(id=str(rec["id"]), round=rnd, modality=self.modality,
             generator=str(rec.get("generator", "")), parent=rec.get("parent"),
             bridge=rec.get("bridge"), file=rec.get("file"),
             data=rec.get("text"), meta=rec.get("meta"))
    if load and v.file is not None:
      path = self.root / v.file
      if not path.is_file():
        raise _err(instance, rnd, f"view {v.id!r}: missing file {str(path)!r}")
      if self.modality == "image":
        with Image.open(path) as im:
          v.data = np.asarray(im.convert("RGB"), dtype=np.uint8)
      else:
        v.data = path.read_text(encoding="utf-8")
    return v

  # -- writing
  def add_round(self, instance: str, rnd: int, views: list[View], write_files: bool = True):
    """Appends round `rnd` (must be the next round) for `instance`."""
    rounds = self._instances.setdefault(instance, [])
    if rnd != len(rounds):
      raise _err(instance, rnd, f"round out of order: the store has {len(rounds)} round(s)")
    if not views:
      raise _err(instance, rnd, "round without views")
    recs = []
    for v in views:
      if v.modality != self.modality:
        raise _err(instance, rnd, f"view {v.id!r}: wrong modality {v.modality!r} "
                   f"for a {self.modality} store")
      if self.modality == "image" and write_files and v.file is None:
        v.file = f"{_safe(instance)}/r{rnd}_{v.id}.png"
        path = self.root / v.file
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(np.asarray(v.data, np.uint8)).save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
      recs.append(v.record())
    rounds.append({"round": rnd, "views": recs})

  def manifest(self) -> dict:
    return {"format": FORMAT, "version": VERSION, "modality": self.modality,
            "instances": self._instances}

  def save(self):
    self.root.mkdir(parents=True, exist_ok=True)
    validate_manifest(self.manifest(), self.root)
    tmp = self.root / "manifest.json.tmp"
    tmp.write_text(json.dumps(self.manifest(), indent=1))
    os.replace(tmp, self.root / "manifest.json")


def _safe(instance: str) -> str:
  return "".join(c if c.isalnum() or c in "-_." else "_" for c in instance)


def load_store(root, check_files: bool = True) -> ViewsStore:
  """Loads and validates a store; raises ViewsStoreError on any defect."""
  root = pathlib.Path(root)
  path = root / "manifest.json"
  if not path.is_file():
    raise ViewsStoreError(f"views store {root}: no manifest.json")
  manifest = json.loads(path.read_text())
  validate_manifest(manifest, root, check_files=check_files)
  return ViewsStore(root, manifest["modality"], manifest["instances"])
