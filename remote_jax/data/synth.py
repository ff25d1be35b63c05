"""An embedded demo world written in UMRE's published format, read by the UMRE reader.

Each example is a scene of 2-5 coloured shapes (circle/square/triangle) with a depth map and
a sentence about invented people, places and organisations. The relations cover the three
triplet types and need different evidence:
- entity-entity (text only): works_for, lives_in, none (other verbs, or head/tail swapped);
- object-object (image only): left_of, above (geometry), in_front_of (depth); none is the
  same layout with head and tail swapped;
- entity-object (text + image): "P is holding the red circle" -> holds, "the red circle
  belongs to P" -> owned_by (object head); none when the triplet's object is another shape.
The negative class `none` has id 0. Everything follows from the seed.
"""
import hashlib
import json
import math
import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image, ImageDraw

from remote_jax.data import umre

RELATIONS = ("none", "works_for", "lives_in", "left_of", "above", "in_front_of", "holds",
             "owned_by")
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 40), "green": (45, 160, 70), "blue": (45, 85, 215),
           "yellow": (225, 195, 40), "purple": (140, 60, 180)}
SIZES = {"small": 0.2, "large": 0.3}
BACKGROUND, BACKGROUND_DEPTH = (235, 235, 235), 0.3
# (triplet type, relation, variant) recipes; the cycle fixes the label mix (40% none).
RECIPES = (
    [("ee", "works_for", 0)] * 3 + [("ee", "lives_in", 0)] * 3
    + [("ee", "none", 0)] * 2 + [("ee", "none", 1)] * 2
    + [("oo", "left_of", 0)] * 2 + [("oo", "above", 0)] * 2 + [("oo", "in_front_of", 0)] * 2
    + [("oo", "none", 0)] * 4
    + [("eo", "holds", 0)] * 3 + [("eo", "owned_by", 0)] * 3
    + [("eo", "none", 0)] * 2 + [("eo", "none", 1)] * 2)
TEMPLATES = {
    "works_for": ("{p} works for {o} .", "{p} is employed by {o} .", "{p} joined {o} last year ."),
    "lives_in": ("{p} lives in {l} .", "{p} has a home in {l} .", "{p} moved to {l} for good ."),
    "none_po": ("{p} wrote about {o} .", "{p} never heard of {o} .", "{p} criticised {o} ."),
    "none_pl": ("{p} flew over {l} .", "{p} read a book about {l} .", "{p} visited {l} once ."),
    "scene": ("{p} shared a photo from {l} .", "a picture posted by {o} .",
              "{p} took this picture ."),
    "holds": ("{p} is holding the {d} .", "{p} carries the {d} ."),
    "owned_by": ("the {d} belongs to {p} .", "the {d} is owned by {p} ."),
}
_SYLLABLES = ("al", "vor", "ben", "ka", "ri", "mo", "tes", "lin", "dar", "su", "ne", "zo", "fa",
              "gu", "pel", "ris", "tam", "ko", "vi", "sen")
_ORG_SUFFIX = ("Labs", "Group", "Union", "Works")
DEFAULTS = dict(seed=0, n_train=600, n_val=150, n_test=150, image_size=96)
# Part of the cache key of ensure_demo_dataset: bump when the generated data changes.
GENERATOR_VERSION = 2


def _word(rng, n):
  return "".join(rng.choice(_SYLLABLES) for _ in range(n)).capitalize()


def _pools(seed=1234, people=40, places=16, orgs=16):
  """Fixed casts of invented names, shared by every split and seed: a name recurs across
  examples of every label, so it carries no label (a name unique to one example would let a
  tiny model memorise that example instead of learning the relation)."""
  rng = np.random.default_rng(seed)

  def unique(make, n):
    out = []
    while len(out) < n:
      name = make()
      if name not in out:
        out.append(name)
    return tuple(out)

  return dict(p=unique(lambda: f"{_word(rng, 2)} {_word(rng, 2)}", people),
              l=unique(lambda: _word(rng, 3), places),
              o=unique(lambda: f"{_word(rng, 2)} {rng.choice(_ORG_SUFFIX)}", orgs))


NAME_POOLS = _pools()


def _names(rng):
  """Person, place and organisation names from the casts, sharing no word (spans stay
  unique)."""
  while True:
    names = {k: pool[int(rng.integers(len(pool)))] for k, pool in NAME_POOLS.items()}
    words = " ".join(names.values()).split()
    if len(set(words)) == len(words):
      return names


DESCRIPTIONS = dict(p="{} is a person .", l="{} is a city .", o="{} is an organisation .")


class _Shape:
  """One object: attributes, centre (cx, cy), side s (fractions of the image), nearness d."""

  def __init__(self, colour, shape, size, cx, cy, d):
    self.colour, self.shape, self.size = colour, shape, size
    self.cx, self.cy, self.s, self.d = cx, cy, SIZES[size], d

  @property
  def box(self):
    h = self.s / 2
    return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

  @property
  def caption(self):
    return f"a {self.size} {self.colour} {self.shape}"

  @property
  def description(self):
    return f"{self.colour} {self.shape}"


def _overlaps(a, b, margin=0.02):
  return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1]
              or b[3] + margin <= a[1])


def _inside(box):
  return min(box) >= 0.02 and max(box) <= 0.98


def _pair(rng, relation):
  """Two shapes (a, b) such that `relation`(a, b) holds and no other spatial relation does."""
  while True:
    sa, sb = (rng.choice(list(SIZES)) for _ in range(2))
    da = float(rng.uniform(1.0, 2.0))
    if relation == "in_front_of":
      cx, cy = rng.uniform(0.25, 0.75, size=2)
      dx, dy = rng.uniform(0.05, 0.12, size=2) * rng.choice([-1, 1], size=2)
      b = (cx, cy, da)
      a = (cx + dx, cy + dy, da + float(rng.uniform(1.0, 1.5)))
    else:
      gap = float(rng.uniform(0.42, 0.55))
      u, v = float(rng.uniform(0.15, 0.85 - gap)), float(rng.uniform(0.2, 0.8))
      jitter, db = float(rng.uniform(-0.05, 0.05)), da + float(rng.uniform(-0.3, 0.3))
      if relation == "left_of":
        a, b = (u, v, da), (u + gap, v + jitter, db)
      else:  # above: a is higher (smaller y)
        a, b = (v, u, da), (v + jitter, u + gap, db)
    sha = _Shape("", "", sa, *a)
    shb = _Shape("", "", sb, *b)
    if _inside(sha.box) and _inside(shb.box) and (
        relation == "in_front_of" or not _overlaps(sha.box, shb.box)):
      return sha, shb


def _scene(rng, n, fixed=()):
  """`fixed` shapes plus random non-overlapping ones up to n, unique (colour, shape) each."""
  shapes = list(fixed)
  for _ in range(200):
    if len(shapes) >= n:
      break
    size = rng.choice(list(SIZES))
    h = SIZES[size] / 2
    cx, cy = rng.uniform(0.02 + h, 0.98 - h, size=2)
    cand = _Shape("", "", size, float(cx), float(cy), float(rng.uniform(1.0, 2.0)))
    if not any(_overlaps(cand.box, s.box) for s in shapes):
      shapes.append(cand)
  combos = [(c, s) for c in COLOURS for s in SHAPES]
  for shape, k in zip(shapes, rng.permutation(len(combos))[:len(shapes)]):
    shape.colour, shape.shape = combos[k]
  order = rng.permutation(len(shapes))  # slot order is random: the pair is not always 0, 1
  return [shapes[i] for i in order]


def _render(shapes, size):
  """RGB image and nearness map; nearer shapes are drawn last (they occlude)."""
  image = Image.new("RGB", (size, size), BACKGROUND)
  index = Image.new("L", (size, size), 0)
  draw, draw_index = ImageDraw.Draw(image), ImageDraw.Draw(index)
  for i in sorted(range(len(shapes)), key=lambda i: shapes[i].d):
    shape = shapes[i]
    l, t, r, b = (v * size for v in shape.box)
    r, b = r - 1, b - 1
    for d, fill in ((draw, COLOURS[shape.colour]), (draw_index, i + 1)):
      if shape.shape == "circle":
        d.ellipse((l, t, r, b), fill=fill)
      elif shape.shape == "square":
        d.rectangle((l, t, r, b), fill=fill)
      else:
        d.polygon([((l + r) / 2, t), (l, b), (r, b)], fill=fill)
  lut = np.asarray([BACKGROUND_DEPTH] + [s.d for s in shapes], np.float32)
  return image, lut[np.asarray(index)]


def _span(tokens, words):
  for i in range(len(tokens) - len(words) + 1):
    if tokens[i:i + len(words)] == words:
      return [i, i + len(words)]
  raise AssertionError(f"{words} not in {tokens}")


def _example(rng, recipe):
  """-> (line dict without img_id, shapes, captions for the line's entities)."""
  kind, relation, variant = recipe
  names = _names(rng)
  n = int(rng.integers(2, 6))
  captions = {}

  def entity(key, tokens):
    captions[names[key]] = DESCRIPTIONS[key].format(names[key])
    return dict(name=names[key], pos=_span(tokens, names[key].split()))

  def obj(shapes, shape):
    return dict(name=f"[OBJ{shapes.index(shape)}]", pos=[round(v, 4) for v in shape.box])

  if kind == "ee":
    if relation != "none":
      template, tail = rng.choice(TEMPLATES[relation]), "o" if relation == "works_for" else "l"
    else:
      tail = rng.choice(["o", "l"])
      template = rng.choice(TEMPLATES["none_po" if tail == "o" else "none_pl"])
      if variant == 1:  # a positive sentence read in the wrong direction
        template = rng.choice(TEMPLATES["works_for" if tail == "o" else "lives_in"])
    tokens = template.format(**names).split()
    h, t = entity("p", tokens), entity(tail, tokens)
    if relation == "none" and variant == 1:
      h, t = t, h
    shapes = _scene(rng, n)
  elif kind == "oo":
    positive = relation if relation != "none" else rng.choice(["left_of", "above",
                                                               "in_front_of"])
    a, b = _pair(rng, positive)
    shapes = _scene(rng, max(n, 2), fixed=(a, b))
    template = rng.choice(TEMPLATES["scene"])
    tokens = template.format(**names).split()
    for key in "plo":
      if f"{{{key}}}" in template:
        entity(key, tokens)  # descriptions of mentioned names, like UMRE's captions
    h, t = (obj(shapes, a), obj(shapes, b)) if relation != "none" else (obj(shapes, b),
                                                                         obj(shapes, a))
  else:
    shapes = _scene(rng, n)
    while len(shapes) < 2:
      shapes = _scene(rng, n)
    described = shapes[int(rng.integers(len(shapes)))]
    target = described
    if relation == "none":
      target = [s for s in shapes if s is not described][int(rng.integers(len(shapes) - 1))]
    kind_key = relation if relation != "none" else ("holds", "owned_by")[variant]
    tokens = rng.choice(TEMPLATES[kind_key]).format(p=names["p"], d=described.description).split()
    person = entity("p", tokens)
    h, t = (person, obj(shapes, target)) if kind_key == "holds" else (obj(shapes, target), person)
  return dict(token=tokens, h=h, t=t, relation=relation), shapes, captions


def write_demo_dataset(out_dir, seed=0, n_train=600, n_val=150, n_test=150, image_size=96):
  """Writes the demo world in UMRE layout under `out_dir` (UmreReader's default paths)."""
  out = pathlib.Path(out_dir)
  paths = umre.UmreReader.DEFAULT_PATHS
  (out / paths["images"]).mkdir(parents=True, exist_ok=True)
  (out / paths["depth"]).mkdir(parents=True, exist_ok=True)
  boxes, captions = {}, {}
  for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val),
                                                ("test", n_test))):
    rng = np.random.default_rng([seed, split_index])
    recipes = (RECIPES * math.ceil(count / len(RECIPES)))[:count]
    order = rng.permutation(count)
    lines = []
    for i in range(count):
      line, shapes, caps = _example(rng, recipes[order[i]])
      img_id = f"{split}_{i:05d}.png"
      line["img_id"] = img_id
      image, depth = _render(shapes, image_size)
      image.save(out / paths["images"] / img_id)
      np.savez_compressed(out / paths["depth"] / f"{split}_{i:05d}.npz", depth_map=depth)
      boxes[img_id] = {f"[OBJ{k}]": [round(v, 4) for v in s.box] for k, s in enumerate(shapes)}
      caps.update({f"[OBJ{k}]": s.caption for k, s in enumerate(shapes)})
      captions[img_id] = caps
      lines.append(json.dumps(line))
    (out / paths[split]).write_text("\n".join(lines) + "\n")
  (out / paths["boxes"]).write_text(json.dumps(boxes))
  (out / paths["captions"]).write_text(json.dumps(captions))
  (out / paths["relations"]).write_text(json.dumps({r: i for i, r in enumerate(RELATIONS)}))
  return out


def demo_params(cfg):
  params = dict(DEFAULTS)
  params.update({k: v for k, v in dict(umre.cfg_get(cfg, "demo", None) or {}).items()
                 if k in DEFAULTS})
  return params


def ensure_demo_dataset(root, params):
  """`root/demo-<hash of params and GENERATOR_VERSION>`, written once (atomically, safe with parallel writers)."""
  key = hashlib.sha1(json.dumps(dict(params, generator=GENERATOR_VERSION),
                                sort_keys=True).encode()).hexdigest()[:10]
  final = pathlib.Path(root) / f"demo-{key}"
  if (final / "DONE").exists():
    return final
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".demo-", dir=final.parent))
  write_demo_dataset(tmp, **params)
  (tmp / "DONE").write_text(json.dumps(params))
  try:
    os.rename(tmp, final)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def demo_reader(cfg):
  """DATASETS["demo"]: writes the demo world if needed, then reads it as UMRE."""
  from remote_jax.data import builder
  root = umre.cfg_get(cfg, "root") or pathlib.Path(builder.setting(cfg, "cache_dir")) / "demo"
  directory = ensure_demo_dataset(root, demo_params(cfg))
  return umre.UmreReader(directory, umre.cfg_get(cfg, "paths"),
                         strict=builder.setting(cfg, "strict"),
                         use_caption=builder.setting(cfg, "use_caption"),
                         use_depth=builder.setting(cfg, "use_depth"),
                         num_objects=builder.setting(cfg, "num_objects"))
