"""An embedded demo world (v3, "a world that needs fusion") in UMRE's format, read by the UMRE
reader.

Each example is a scene of 2-5 coloured shapes (5 colours x 3 shapes x 2 sizes; square boxes,
coordinates as fractions of the image) with a nearness map (larger = nearer, constant over each
shape, BACKGROUND_DEPTH elsewhere) and a sentence about invented people, places and
organisations. Every split holds the three triplet types in equal numbers, each with 40%
`none` (id 0):
- entity-entity (text only): "P works for O" -> works_for, "P lives in L" -> lives_in; none for
  other verbs, or a positive sentence with head and tail swapped.
- object-object (image only; the sentence just mentions a photo). left_of(h, t): t's box
  centre is at least OO_GAP right of h's (above: lower, in image y); in_front_of(h, t): h's
  nearness exceeds t's by at least NEAR_GAP while the two boxes do not overlap (no occlusion
  cue) and neither left_of nor above holds either way, so only the depth map decides. Pairs
  of left_of/above differ in nearness by at most 0.3. none = the same layouts with head and
  tail swapped.
- entity-object (text and image together): "P holds the shape <w> the <colour> <shape> ." ->
  holds(P, target), "the shape <w> the <colour> <shape> belongs to P ." -> owned_by(target, P),
  with <w> in left of / right of / above / below. The anchor (<colour> <shape>) is the only
  object of its combination in the scene, and the scene always holds a colour distractor (same
  colour, other shape) and a shape distractor (same shape, other colour) besides the target;
  the target itself shares exactly one attribute with the anchor. The target is the unique
  object whose centre lies at least EO_MARGIN beyond the anchor's in direction <w>; every other
  object lies at most EO_CLEAR beyond it. none: the same sentences with the triplet's object
  being the anchor (1 in 4) or another non-target object. Nothing in the sentence names the
  target's attributes.
Object captions (UMRE's caption file) are partial: "a blue shape", "a square" or "a small shape",
or, for a CAPTION_ABSENT fraction of objects (the `caption_absent` field), the uninformative
"an object" (the reader requires a caption string); they never hold a position word.
Compositional bucket: HELD_OUT (colour, shape) combinations, fixed per seed, are never anchors
in train or val; COMPOSITIONAL_SHARE of the test entity-object examples use one as anchor and
form the bucket `compositional` of `buckets.json` ({"test": {"compositional": [0-based line
indices of test_set.json]}}). `world.json` keeps the ground truth (held-out combinations and,
per image in slot order, colour, shape, size and nearness of each object). Everything follows
from the seed.
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

from remote_jax.config import cfg_get, setting
from remote_jax.data import umre

RELATIONS = ("none", "works_for", "lives_in", "left_of", "above", "in_front_of", "holds",
             "owned_by")
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (215, 45, 40), "green": (45, 160, 70), "blue": (45, 85, 215),
           "yellow": (225, 195, 40), "purple": (140, 60, 180)}
SIZES = {"small": 0.2, "large": 0.3}
BACKGROUND, BACKGROUND_DEPTH = (235, 235, 235), 0.3
OO_GAP, NEAR_GAP = 0.38, 0.9        # object-object definitions (see the docstring)
EO_MARGIN, EO_CLEAR = 0.2, 0.05    # entity-object target / every other object
WORDS = ("left of", "right of", "above", "below")
HELD_OUT, COMPOSITIONAL_SHARE = 3, 0.4
ABSENT_CAPTION = "an object"
# Per triplet type, (relation, variant) recipes; each cycle of 10 is 40% none.
RECIPES = {
    "ee": [("works_for", 0)] * 3 + [("lives_in", 0)] * 3 + [("none", 0)] * 2 + [("none", 1)] * 2,
    "oo": [("left_of", 0)] * 2 + [("above", 0)] * 2 + [("in_front_of", 0)] * 2
          + [("none", 0)] * 4,
    "eo": [("holds", 0)] * 3 + [("owned_by", 0)] * 3 + [("none", 0)] * 2 + [("none", 1)] * 2,
}
TEMPLATES = {
    "works_for": ("{p} works for {o} .", "{p} is employed by {o} .", "{p} joined {o} last year ."),
    "lives_in": ("{p} lives in {l} .", "{p} has a home in {l} .", "{p} moved to {l} for good ."),
    "none_po": ("{p} wrote about {o} .", "{p} never heard of {o} .", "{p} criticised {o} ."),
    "none_pl": ("{p} flew over {l} .", "{p} read a book about {l} .", "{p} visited {l} once ."),
    "scene": ("{p} shared a photo from {l} .", "a picture posted by {o} .",
              "{p} took this picture ."),
    "holds": ("{p} holds the shape {w} the {a} .", "{p} is holding the shape {w} the {a} .",
              "{p} carries the shape {w} the {a} ."),
    "owned_by": ("the shape {w} the {a} belongs to {p} .", "the shape {w} the {a} is owned by {p} ."),
}
SYLLABLES = ("al", "vor", "ben", "ka", "ri", "mo", "tes", "lin", "dar", "su", "ne", "zo", "fa",
             "gu", "pel", "ris", "tam", "ko", "vi", "sen")
ORG_SUFFIX = ("Labs", "Group", "Union", "Works")
# The world's parameters: config.data.demo (values: configs/common.py DEMO_WORLD).
WORLD_KEYS = ("seed", "n_train", "n_val", "n_test", "image_size", "caption_absent")
# Part of the cache key of ensure_demo_dataset: bump when the generated data changes.
GENERATOR_VERSION = 3


def _word(rng, n):
  return "".join(rng.choice(SYLLABLES) for _ in range(n)).capitalize()


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
              o=unique(lambda: f"{_word(rng, 2)} {rng.choice(ORG_SUFFIX)}", orgs))


NAME_POOLS = _pools()


def pick_names(rng):
  """Person, place and organisation names from the casts, sharing no word (spans stay
  unique)."""
  while True:
    names = {k: pool[int(rng.integers(len(pool)))] for k, pool in NAME_POOLS.items()}
    words = " ".join(names.values()).split()
    if len(set(words)) == len(words):
      return names


DESCRIPTIONS = dict(p="{} is a person .", l="{} is a city .", o="{} is an organisation .")


def square_box(cx, cy, side):
  """(x0, y0, x1, y1) of the square of `side` centred on (cx, cy)."""
  h = side / 2
  return (cx - h, cy - h, cx + h, cy + h)


def draw_shape(canvas, kind, box, size, fill):
  """A circle, square or (any other kind) triangle filling `box` (fractions of the
  image) on the ImageDraw `canvas` of a `size`-pixel image."""
  l, t, r, b = (v * size for v in box)
  r, b = r - 1, b - 1
  if kind == "circle":
    canvas.ellipse((l, t, r, b), fill=fill)
  elif kind == "square":
    canvas.rectangle((l, t, r, b), fill=fill)
  else:
    canvas.polygon([((l + r) / 2, t), (l, b), (r, b)], fill=fill)


def noise_field(rng, size, sigma):
  """Sensor noise for a `size`-pixel RGB image: N(0, sigma) per pixel and channel in units of
  the full range, or None (no draw) for sigma 0."""
  if not sigma:
    return None
  return rng.normal(0.0, sigma * 255.0, (size, size, 3)).astype(np.float32)


def add_noise(image, noise):
  """The PIL RGB `image` plus a noise_field, rounded and clipped to uint8 (None: unchanged)."""
  if noise is None:
    return image
  pixels = np.asarray(image, np.float32) + noise
  return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


class Shape:
  """One object: size name, centre (cx, cy) and side (fractions of the image), nearness
  `depth` (larger = nearer, drawn later), colour and shape names ("" until coloured). The
  MI²RAGE demo generators and knowledge world draw and decode these too."""

  def __init__(self, size, cx, cy, depth=1.0, colour="", shape=""):
    self.colour, self.shape, self.size = colour, shape, size
    self.cx, self.cy, self.depth = float(cx), float(cy), float(depth)

  @property
  def side(self):
    return SIZES[self.size]

  @property
  def box(self):
    return square_box(self.cx, self.cy, self.side)

  @property
  def combo(self):
    return (self.colour, self.shape)

  @property
  def phrase(self):
    return f"a {self.size} {self.colour} {self.shape}"


def overlaps(a, b, margin=0.02):
  """Do boxes a and b (x0, y0, x1, y1) come closer than `margin` on both axes?"""
  return not (a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1]
              or b[3] + margin <= a[1])


def inside(box, margin=0.02):
  """Does `box` keep `margin` from every edge of the image?"""
  return min(box) >= margin and max(box) <= 1 - margin


def _free(shape, shapes):
  return inside(shape.box) and not any(overlaps(shape.box, s.box) for s in shapes)


def _size(rng):
  return str(rng.choice(list(SIZES)))


def _pair(rng, relation):
  """Two disjoint shapes (a, b) such that `relation`(a, b) holds and no other relation does."""
  while True:
    sa, sb = _size(rng), _size(rng)
    da = float(rng.uniform(1.0, 2.0))
    if relation == "in_front_of":  # side by side, closer than OO_GAP; a much nearer
      sep = (SIZES[sa] + SIZES[sb]) / 2 + float(rng.uniform(0.03, 0.06))
      off = (sep * float(rng.choice([-1, 1])), float(rng.uniform(-0.05, 0.05)))
      dx, dy = off if rng.random() < 0.5 else off[::-1]
      cx, cy = (float(v) for v in rng.uniform(0.2, 0.8, size=2))
      a = (cx + dx, cy + dy, da + float(rng.uniform(1.0, 1.5)))
      b = (cx, cy, da)
    else:
      a, b = apart(rng, relation, da)
    sha, shb = Shape(sa, *a), Shape(sb, *b)
    if _free(sha, []) and _free(shb, [sha]):
      return sha, shb


def apart(rng, relation, da):
  """(cx, cy, nearness) of a and b for left_of / above: a gap wider than OO_GAP along the
  relation's axis, a little jitter across it, similar nearness (a's is da)."""
  gap = float(rng.uniform(0.42, 0.55))
  u, v = float(rng.uniform(0.15, 0.85 - gap)), float(rng.uniform(0.2, 0.8))
  jitter, db = float(rng.uniform(-0.05, 0.05)), da + float(rng.uniform(-0.3, 0.3))
  if relation == "left_of":
    return (u, v, da), (u + gap, v + jitter, db)
  return (v, u, da), (v + jitter, u + gap, db)   # above: a is higher (smaller y)


def _fill(rng, shapes, n, region=(0.0, 1.0), tries=60):
  """Adds random disjoint shapes (centre x within `region`) until n; False if it gets stuck."""
  for _ in range(tries * n):
    if len(shapes) >= n:
      return True
    size = _size(rng)
    h = SIZES[size] / 2
    lo, hi = max(region[0], 0.02 + h), min(region[1], 0.98 - h)
    if lo > hi:
      continue
    cand = Shape(size, float(rng.uniform(lo, hi)), float(rng.uniform(0.02 + h, 0.98 - h)),
                 float(rng.uniform(1.0, 2.0)))
    if _free(cand, shapes):
      shapes.append(cand)
  return len(shapes) >= n


def _colour_all(rng, shapes):
  """Unique random (colour, shape) for the shapes that have none yet."""
  used = {s.combo for s in shapes if s.colour}
  free = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in used]
  blank = [s for s in shapes if not s.colour]
  for shape, k in zip(blank, rng.permutation(len(free))[:len(blank)]):
    shape.colour, shape.shape = free[k]


def _shuffled(rng, shapes):
  return [shapes[i] for i in rng.permutation(len(shapes))]  # the pair is not always slot 0, 1


def lead(word, anchor, other):
  """How far `other`'s centre lies beyond `anchor`'s in direction `word` (image y grows down)."""
  return {"left of": anchor.cx - other.cx, "right of": other.cx - anchor.cx,
          "above": anchor.cy - other.cy, "below": other.cy - anchor.cy}[word]


def _referring_scene(rng, word, anchor_combo):
  """-> (shapes, anchor, target, distractors): the target is the unique shape `word` the anchor
  (lead >= EO_MARGIN, every other <= EO_CLEAR); a colour and a shape distractor; 4-5 shapes."""
  n = int(rng.integers(4, 6))
  while True:
    # Built for "left of" (x decreasing), then mirrored / transposed into `word`'s frame.
    size = _size(rng)
    h = SIZES[size] / 2
    anchor = Shape(size, float(rng.uniform(0.42, 0.7)), float(rng.uniform(0.02 + h, 0.98 - h)),
                   float(rng.uniform(1.0, 2.0)))
    shapes = [anchor]
    # Few tries per shape: a crowded layout is cheaper to redraw than to complete.
    if not (_fill(rng, shapes, 2, (0.0, anchor.cx - EO_MARGIN - 0.02), tries=10)
            and _fill(rng, shapes, n, (anchor.cx - EO_CLEAR + 0.02, 1.0), tries=10)):
      continue
    for s in shapes:
      if word in ("above", "below"):
        s.cx, s.cy = s.cy, s.cx
      if word in ("right of", "below"):
        s.cx, s.cy = (1 - s.cx, s.cy) if word == "right of" else (s.cx, 1 - s.cy)
    target, others = shapes[1], shapes[2:]
    assert lead(word, anchor, target) >= EO_MARGIN
    assert all(lead(word, anchor, s) <= EO_CLEAR for s in others)
    colour, shape = anchor_combo
    anchor.colour, anchor.shape = colour, shape
    other_colours = [c for c in COLOURS if c != colour]
    other_shapes = [s for s in SHAPES if s != shape]
    c1, c2 = (other_colours[i] for i in rng.permutation(len(other_colours))[:2])
    s1, s2 = (other_shapes[i] for i in rng.permutation(len(other_shapes)))
    # The target shares one attribute with the anchor, as the distractors do.
    if rng.random() < 0.5:
      target.colour, target.shape = colour, s1
      others[0].colour, others[0].shape = colour, s2
    else:
      target.colour, target.shape = c1, shape
      others[0].colour, others[0].shape = colour, s1
    others[1].colour, others[1].shape = c2, shape
    _colour_all(rng, shapes)
    return _shuffled(rng, shapes), anchor, target, others


def _random_scene(rng, n, fixed=()):
  shapes = list(fixed)
  _fill(rng, shapes, n)
  _colour_all(rng, shapes)
  return _shuffled(rng, shapes)


def render(shapes, size, palette=COLOURS):
  """RGB image and nearness map; nearer shapes are drawn last, in `palette`'s colours."""
  image = Image.new("RGB", (size, size), BACKGROUND)
  index = Image.new("L", (size, size), 0)
  draw, draw_index = ImageDraw.Draw(image), ImageDraw.Draw(index)
  for i in sorted(range(len(shapes)), key=lambda i: shapes[i].depth):
    shape = shapes[i]
    for d, fill in ((draw, palette[shape.colour]), (draw_index, i + 1)):
      draw_shape(d, shape.shape, shape.box, size, fill)
  lut = np.asarray([BACKGROUND_DEPTH] + [s.depth for s in shapes], np.float32)
  return image, lut[np.asarray(index)]


def _caption(rng, shape, absent):
  """Partial (one attribute) or absent: never the full description, never a position."""
  if rng.random() < absent:
    return ABSENT_CAPTION
  return (f"a {shape.colour} shape", f"a {shape.shape}", f"a {shape.size} shape")[
      int(rng.integers(3))]


def held_out_anchors(seed):
  """HELD_OUT (colour, shape) combinations, distinct in colour and in shape, so every colour
  and every shape still occurs in the anchors of train."""
  rng = np.random.default_rng([seed, 3])
  colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:HELD_OUT]]
  shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:HELD_OUT]]
  return sorted(zip(colours, shapes))


def span(tokens, words):
  """[start, end) of the first occurrence of the word list `words` in `tokens`."""
  for i in range(len(tokens) - len(words) + 1):
    if tokens[i:i + len(words)] == words:
      return [i, i + len(words)]
  raise AssertionError(f"{words} not in {tokens}")


def _example(rng, kind, relation, variant, anchors):
  """-> (line dict without img_id, shapes, captions for the line's entities)."""
  names = pick_names(rng)
  captions = {}

  def entity(key, tokens):
    captions[names[key]] = DESCRIPTIONS[key].format(names[key])
    return dict(name=names[key], pos=span(tokens, names[key].split()))

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
    shapes = _random_scene(rng, int(rng.integers(2, 6)))
  elif kind == "oo":
    positive = relation if relation != "none" else rng.choice(["left_of", "above",
                                                               "in_front_of"])
    a, b = _pair(rng, positive)
    shapes = _random_scene(rng, int(rng.integers(2, 6)), fixed=(a, b))
    template = rng.choice(TEMPLATES["scene"])
    tokens = template.format(**names).split()
    for key in "plo":
      if f"{{{key}}}" in template:
        entity(key, tokens)  # descriptions of mentioned names, like UMRE's captions
    h, t = (obj(shapes, a), obj(shapes, b)) if relation != "none" else (obj(shapes, b),
                                                                         obj(shapes, a))
  else:
    word = WORDS[int(rng.integers(len(WORDS)))]
    shapes, anchor, target, others = _referring_scene(
        rng, word, anchors[int(rng.integers(len(anchors)))])
    if relation == "none":  # the anchor itself, or another non-target shape
      target = anchor if rng.random() < 0.25 else others[int(rng.integers(len(others)))]
    form = relation if relation != "none" else ("holds", "owned_by")[variant]
    tokens = rng.choice(TEMPLATES[form]).format(
        p=names["p"], w=word, a=f"{anchor.colour} {anchor.shape}").split()
    person = entity("p", tokens)
    h, t = (person, obj(shapes, target)) if form == "holds" else (obj(shapes, target), person)
  return dict(token=tokens, h=h, t=t, relation=relation), shapes, captions


def _plan(rng, count, split):
  """(kind, relation, variant, compositional) per line: types balanced, order shuffled."""
  plan = []
  for k, kind in enumerate(RECIPES):
    n = count // 3 + (k < count % 3)
    recipes = (RECIPES[kind] * math.ceil(n / len(RECIPES[kind])))[:n]
    comp = np.zeros(n, bool)
    if kind == "eo" and split == "test":
      comp[rng.permutation(n)[:round(COMPOSITIONAL_SHARE * n)]] = True
    plan += [(kind, r, v, bool(c)) for (r, v), c in zip(recipes, comp)]
  return [plan[i] for i in rng.permutation(len(plan))]


def write_demo_dataset(out_dir, *, seed, n_train, n_val, n_test, image_size, caption_absent):
  """Writes the demo world in UMRE layout under `out_dir` (UmreReader's default paths), plus
  `buckets.json` and the ground truth `world.json`."""
  out = pathlib.Path(out_dir)
  paths = umre.UmreReader.DEFAULT_PATHS
  (out / paths["images"]).mkdir(parents=True, exist_ok=True)
  (out / paths["depth"]).mkdir(parents=True, exist_ok=True)
  held = held_out_anchors(seed)
  seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in held]
  boxes, captions, world, buckets = {}, {}, {}, {"test": {"compositional": []}}
  for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val),
                                                ("test", n_test))):
    rng = np.random.default_rng([seed, split_index])
    lines = []
    for i, (kind, relation, variant, comp) in enumerate(_plan(rng, count, split)):
      line, shapes, caps = _example(rng, kind, relation, variant, held if comp else seen)
      if comp:
        buckets[split]["compositional"].append(i)
      stem = f"{split}_{i:05d}"
      line["img_id"] = img_id = f"{stem}.png"
      image, depth = render(shapes, image_size)
      image.save(out / paths["images"] / img_id)
      np.savez_compressed(out / paths["depth"] / f"{stem}.npz", depth_map=depth)
      boxes[img_id] = {f"[OBJ{k}]": [round(v, 4) for v in s.box] for k, s in enumerate(shapes)}
      caps.update({f"[OBJ{k}]": _caption(rng, s, caption_absent) for k, s in enumerate(shapes)})
      captions[img_id] = caps
      world[img_id] = [[s.colour, s.shape, s.size, round(s.depth, 4)] for s in shapes]
      lines.append(json.dumps(line))
    (out / paths[split]).write_text("\n".join(lines) + "\n")
  (out / paths["boxes"]).write_text(json.dumps(boxes))
  (out / paths["captions"]).write_text(json.dumps(captions))
  (out / paths["relations"]).write_text(json.dumps({r: i for i, r in enumerate(RELATIONS)}))
  (out / "buckets.json").write_text(json.dumps(buckets))
  (out / "world.json").write_text(json.dumps(dict(held_out_anchors=held, images=world)))
  return out


def world_params(cfg, field, keys, name, source):
  """config.data.<field>: every parameter of the generated world `name` (`keys`), or a
  one-line error naming what is missing or unknown and where the values are (`source`)."""
  params = dict(cfg_get(cfg, field) or {})
  missing = [k for k in keys if k not in params]
  unknown = sorted(set(params) - set(keys))
  if missing or unknown:
    raise ValueError(f"data.{field}: missing {missing}, unknown {unknown}; the {name} takes "
                     f"{list(keys)} ({source})")
  return params


def demo_params(cfg):
  """config.data.demo: every parameter of the world (WORLD_KEYS)."""
  return world_params(cfg, "demo", WORLD_KEYS, "demo world", "configs/common.py DEMO_WORLD")


def umre_reader(directory, cfg):
  """A generated world's directory, read as UMRE with config.data's settings."""
  return umre.UmreReader(directory, cfg_get(cfg, "paths"),
                         strict=setting(cfg, "strict"),
                         use_caption=setting(cfg, "use_caption"),
                         use_depth=setting(cfg, "use_depth"),
                         num_objects=setting(cfg, "num_objects"))


def ensure_written(root, prefix, params, write, **version):
  """`root/<prefix>-<hash of params and version>`, filled once by `write(dir, **params)`
  (atomically: written to a temporary directory, then renamed; safe with parallel writers)."""
  key = hashlib.sha1(json.dumps(dict(params, **version), sort_keys=True).encode()).hexdigest()[:10]
  final = pathlib.Path(root) / f"{prefix}-{key}"
  if (final / "DONE").exists():
    return final
  final.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=final.parent))
  try:
    write(tmp, **params)
  except BaseException:   # a failed or interrupted write leaves nothing behind
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  (tmp / "DONE").write_text(json.dumps(params))
  try:
    os.rename(tmp, final)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def ensure_demo_dataset(root, params):
  """`root/demo-<hash of params and GENERATOR_VERSION>`, written once."""
  return ensure_written(root, "demo", params, write_demo_dataset, generator=GENERATOR_VERSION)


def demo_reader(cfg):
  """DATASETS["demo"]: writes the demo world if needed, then reads it as UMRE."""
  root = cfg_get(cfg, "root") or pathlib.Path(setting(cfg, "cache_dir")) / "demo"
  return umre_reader(ensure_demo_dataset(root, demo_params(cfg)), cfg)
