"""Procedural cross-modal generators over the remote_jax demo world (data/synth.py).

The world's images are scenes of coloured shapes (circle/square/triangle, small/
large, five colours) on a grey background. Two generators stand in for Stable
Diffusion and BLIP:

  caption(image)  decodes the shapes (colour segmentation, connected
                  components, fill ratio -> shape, extent -> size) and describes
                  1-3 random pairs: "a small red square to the left of a large
                  blue circle and ...". Like a real captioner it does not know
                  which pair the label is about, so some captions lose it.
  render(text)    parses shape mentions and spatial phrases and draws a scene
                  satisfying them (random positions, sizes, extra shapes);
                  text without a parsable shape gives a random scene.

`noise` is the rate of label-irrelevant outputs: with that probability a call
ignores its input (a random scene, or a caption of a random hallucinated scene).
Every output records in `meta.faithful` whether it and all its ancestors were
produced faithfully (no noise draw), so label information loss and its repair by
the teacher can be measured; the selection never reads it.
"""
import hashlib
import itertools
import json
import math
import pathlib
import re

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from remote_jax.data import synth

COLOURS = synth.COLOURS
SHAPES = synth.SHAPES
SIZES = synth.SIZES
BACKGROUND = synth.BACKGROUND
# Relation phrases (caption side): A <phrase> B.
PHRASES = {
    "left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
    "above": ("above", "over"), "below": ("below", "under"),
    "front": ("in front of",), "behind": ("behind",),
}
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above",
           "front": "behind", "behind": "front"}
_PHRASE_TO_REL = sorted(((p, r) for r, ps in PHRASES.items() for p in ps),
                        key=lambda x: -len(x[0]))
_MENTION = re.compile(r"(?:\b(small|large)\s+)?\b(" + "|".join(COLOURS) + r")\s+("
                      + "|".join(SHAPES) + r")\b")
_PREFIXES = ("", "", "a picture of ", "a photo showing ", "an image with ")


class Shape:
  def __init__(self, colour, shape, size, cx, cy, depth=1.0):
    self.colour, self.shape, self.size = colour, shape, size
    self.cx, self.cy, self.depth = float(cx), float(cy), float(depth)

  @property
  def side(self):
    return SIZES[self.size]

  @property
  def box(self):
    return synth.square_box(self.cx, self.cy, self.side)

  @property
  def phrase(self):
    return f"a {self.size} {self.colour} {self.shape}"

  @property
  def key(self):
    return (self.colour, self.shape)


def _inside(box):
  return min(box) >= 0.01 and max(box) <= 0.99


def _overlap(a, b, margin=0.0):
  return not (a[2] + margin <= b[0] or b[2] + margin <= a[0]
              or a[3] + margin <= b[1] or b[3] + margin <= a[1])


def draw(shapes, size=96):
  """RGB uint8 (size, size, 3); shapes with larger depth are nearer (drawn last)."""
  image = Image.new("RGB", (size, size), BACKGROUND)
  d = ImageDraw.Draw(image)
  for s in sorted(shapes, key=lambda s: s.depth):
    synth.draw_shape(d, s.shape, s.box, size, COLOURS[s.colour])
  return np.asarray(image, np.uint8)


def decode(image, tol=40, min_pixels=12):
  """Shapes seen in an image (best effort, like a detector)."""
  img = np.asarray(image, np.int32)
  n = img.shape[0]
  out = []
  for colour, rgb in COLOURS.items():
    mask = np.abs(img - np.asarray(rgb)).max(-1) <= tol
    labels, count = ndimage.label(mask)
    for k in range(1, count + 1):
      ys, xs = np.nonzero(labels == k)
      if len(ys) < min_pixels:
        continue
      w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
      fill = len(ys) / float(w * h)
      shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
      size = "large" if max(w, h) / n >= 0.25 else "small"
      s = Shape(colour, shape, size, (xs.min() + xs.max() + 1) / 2 / n,
                (ys.min() + ys.max() + 1) / 2 / n)
      s.extent = (xs.min() / n, ys.min() / n, (xs.max() + 1) / n, (ys.max() + 1) / n)
      s.pixels = (labels == k)
      out.append(s)
  return out


def relation(a, b):
  """Spatial relation of a to b: left/right/above/below/front/behind."""
  if _overlap(a.extent, b.extent):
    l, t = max(a.extent[0], b.extent[0]), max(a.extent[1], b.extent[1])
    r, bt = min(a.extent[2], b.extent[2]), min(a.extent[3], b.extent[3])
    n = a.pixels.shape[0]
    sl = (slice(int(t * n), max(int(bt * n), int(t * n) + 1)),
          slice(int(l * n), max(int(r * n), int(l * n) + 1)))
    return "front" if a.pixels[sl].sum() >= b.pixels[sl].sum() else "behind"
  dx, dy = b.cx - a.cx, b.cy - a.cy
  if abs(dx) >= abs(dy):
    return "left" if dx > 0 else "right"
  return "above" if dy > 0 else "below"


def describe(shapes, rng, max_pairs=3):
  """A caption of 1..max_pairs random pairs (or of the lone shape)."""
  prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
  if len(shapes) < 2:
    return prefix + (shapes[0].phrase if shapes else "an empty grey picture")
  pairs = [(i, j) for i in range(len(shapes)) for j in range(i + 1, len(shapes))]
  k = int(rng.integers(1, min(max_pairs, len(pairs)) + 1))
  chosen = rng.permutation(len(pairs))[:k]
  parts = []
  for c in chosen:
    i, j = pairs[c]
    if rng.random() < 0.5:
      i, j = j, i
    rel = relation(shapes[i], shapes[j])
    words = PHRASES[rel]
    parts.append(f"{shapes[i].phrase} {words[rng.integers(len(words))]} {shapes[j].phrase}")
  return prefix + " and ".join(parts)


def parse(text):
  """(mentions [(size|None, colour, shape)], constraints [(i, rel, j)]) from a text."""
  text = text.lower()
  mentions, index, constraints = [], {}, []
  for clause in re.split(r"\band\b|[,.;]", text):
    found = []
    for m in _MENTION.finditer(clause):
      key = (m.group(2), m.group(3))
      if key not in index:
        index[key] = len(mentions)
        mentions.append((m.group(1), key[0], key[1]))
      found.append((index[key], m.start(), m.end()))
    for (i, _, e1), (j, s2, _) in itertools.pairwise(found):
      between = clause[e1:s2]
      for phrase, rel in _PHRASE_TO_REL:
        if phrase in between:
          constraints.append((i, rel, j))
          break
  return mentions, constraints


def _place_relative(a, rel, b, rng):
  """Moves b so that `a rel b` holds (rel as seen from a)."""
  if rel in ("front", "behind"):
    b.cx = a.cx + rng.uniform(0.05, 0.12) * rng.choice([-1, 1])
    b.cy = a.cy + rng.uniform(0.05, 0.12) * rng.choice([-1, 1])
    b.depth = a.depth - rng.uniform(1.0, 1.5) if rel == "front" else a.depth + rng.uniform(1.0, 1.5)
    return
  gap, jitter = rng.uniform(0.42, 0.55), rng.uniform(-0.05, 0.05)
  sign = 1 if rel in ("left", "above") else -1
  if rel in ("left", "right"):
    b.cx, b.cy = a.cx + sign * gap, a.cy + jitter
  else:
    b.cx, b.cy = a.cx + jitter, a.cy + sign * gap


def random_shape(rng, taken=()):
  combos = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in taken]
  c, s = combos[rng.integers(len(combos))]
  size = list(SIZES)[rng.integers(len(SIZES))]
  h = SIZES[size] / 2
  return Shape(c, s, size, rng.uniform(0.01 + h, 0.99 - h), rng.uniform(0.01 + h, 0.99 - h),
               rng.uniform(1.0, 2.0))


def random_scene(rng, lo=2, hi=5):
  shapes = []
  for _ in range(int(rng.integers(lo, hi + 1))):
    for _ in range(50):
      s = random_shape(rng, {x.key for x in shapes})
      if not any(_overlap(s.box, x.box, 0.02) for x in shapes):
        shapes.append(s)
        break
  return shapes


def scene_from_text(text, rng, tries=30):
  """A scene satisfying the text's mentions and spatial constraints (best effort)."""
  mentions, constraints = parse(text)
  if not mentions:
    return random_scene(rng)
  for _ in range(tries):
    shapes = []
    for size, colour, shape in mentions:
      size = size or list(SIZES)[rng.integers(len(SIZES))]
      h = SIZES[size] / 2
      shapes.append(Shape(colour, shape, size, rng.uniform(0.01 + h, 0.99 - h),
                          rng.uniform(0.01 + h, 0.99 - h), rng.uniform(1.0, 2.0)))
    placed = set()
    for i, rel, j in constraints:
      if j in placed and i not in placed:
        _place_relative(shapes[j], INVERSE[rel], shapes[i], rng)
        placed.add(i)
      elif j not in placed:
        _place_relative(shapes[i], rel, shapes[j], rng)
        placed.update((i, j))
    if not all(_inside(s.box) for s in shapes):
      continue
    layered = {frozenset((i, j)) for i, rel, j in constraints if rel in ("front", "behind")}
    if any(_overlap(shapes[a].box, shapes[b].box, 0.02) and frozenset((a, b)) not in layered
           for a in range(len(shapes)) for b in range(a + 1, len(shapes))):
      continue
    break
  # Extra shapes, as a diffusion model adds unrequested content.
  for _ in range(int(rng.integers(0, 3))):
    s = random_shape(rng, {x.key for x in shapes})
    if not any(_overlap(s.box, x.box, 0.02) for x in shapes):
      shapes.append(s)
  return shapes


class DemoGenerators:
  """text->image (`render`) and image->text (`caption`) with a noise rate and, in the
  knowledge world, imperfect knowledge of its facts (`FACTS`).

  noise            rate of label-irrelevant outputs (the input is ignored)
  knowledge_error  rate at which one knowledge look-up (person -> employer's emblem,
                   organisation -> emblem, emblem -> organisation) returns a wrong
                   answer; drawn independently per look-up
  mention_rate     rate at which the captioner names the organisation of an emblem it
                   sees ("the badge of O") instead of describing it ("a red square badge")
  knowledge        False: the shape world only (no person scenes, no look-ups)
  """

  def __init__(self, noise: float = 0.0, image_size: int = 96, max_pairs: int = 3,
               knowledge_error: float = 0.0, mention_rate: float = 1.0,
               knowledge: bool = True):
    for name, v in (("noise", noise), ("knowledge_error", knowledge_error),
                    ("mention_rate", mention_rate)):
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"generator {name} {v} not in [0, 1]")
    self.noise, self.image_size, self.max_pairs = float(noise), int(image_size), int(max_pairs)
    self.knowledge_error, self.mention_rate = float(knowledge_error), float(mention_rate)
    self.knowledge = bool(knowledge)

  def know(self, truth, options, rng):
    """A knowledge look-up: (answer, correct); wrong with rate `knowledge_error`."""
    if rng.random() < self.knowledge_error:
      wrong = [o for o in options if o != truth]
      return wrong[int(rng.integers(len(wrong)))], False
    return truth, True

  def _random_image(self, rng):
    if self.knowledge and rng.random() < 0.5:
      return draw_kscene(random_kscene(rng), self.image_size)
    return draw(random_scene(rng), self.image_size)

  def render(self, text, rng):
    """-> (image uint8, faithful)."""
    if rng.random() < self.noise:
      return self._random_image(rng), False
    scene, ok = self.kscene_from_text(text, rng) if self.knowledge else (None, True)
    if scene is not None:
      return draw_kscene(scene, self.image_size), ok
    return draw(scene_from_text(text, rng), self.image_size), True

  def kscene_from_text(self, text, rng):
    """-> (KScene | None, faithful): badge, uniform and sign the text names or implies.
    Look-ups: person -> employer, organisation -> emblem (each may be wrong)."""
    ok, found = True, {}

    def emblem(org):
      nonlocal ok
      e, good = self.know(FACTS.emblem[org], EMBLEMS, rng)
      ok &= good
      return e

    for kind, org in _BADGE_OF.findall(text):
      if org in FACTS.emblem and kind not in found:
        found[kind] = emblem(org)
    for colour, shape, kind in _EMBLEM_OF.findall(text.lower()):
      found.setdefault(kind, (colour, shape))
    m = _UNIFORM_OF.search(text)
    if m and m.group(1) in FACTS.emblem:
      found["uniform"] = emblem(m.group(1))[0]
    m = _UNIFORM.search(text.lower())
    if m and "uniform" not in found:
      found["uniform"] = m.group(1)
    orgs = FACTS.orgs_in(text)
    at = orgs[-1][0] if orgs and any(v in text for v in _SIGN_VERBS) else None
    if at is not None and "sign" not in found:
      found["sign"] = emblem(at)
    person = FACTS.person_in(text)
    if person is not None and "badge" not in found and "uniform" not in found:
      employer, good = self.know(FACTS.employer[person], FACTS.orgs, rng)
      ok &= good
      if employer == at:   # at their own employer: its uniform (the sign's colour)
        found["uniform"] = found["sign"][0]
      else:
        found["badge"] = emblem(employer)
    if not found:
      return None, True
    if "badge" not in found and "uniform" not in found:
      found["badge"] = EMBLEMS[int(rng.integers(len(EMBLEMS)))]
    # No side shapes: photos that differ only in what matters give a student nothing
    # instance-specific to memorise (with them it memorised views instead of reading text).
    return KScene(found.get("badge"), found.get("sign"), uniform=found.get("uniform")), ok

  def caption(self, image, rng):
    """-> (caption, faithful)."""
    if rng.random() < self.noise:
      return self._describe(self._random_image(rng), rng)[0], False
    return self._describe(image, rng)

  def _describe(self, image, rng):
    k, shapes = _decoded(np.asarray(image, np.uint8), self.knowledge)
    if k is None:
      if not shapes:
        return "an empty grey picture", True
      return describe(shapes, rng, self.max_pairs), True
    prefix = _PREFIXES[rng.integers(len(_PREFIXES))]
    if k.uniform is not None:
      text, ok = f"a person in a {k.uniform.colour} uniform", True
    else:
      text, ok = self._emblem_phrase(k.badge, "badge", rng)
      text = "a person wearing " + text
    text = prefix + text
    if k.sign is not None:
      phrase, good = self._emblem_phrase(k.sign, "sign", rng)
      text, ok = text + " under " + phrase, ok and good
    if k.extras and rng.random() < 0.5:
      text += " next to " + k.extras[int(rng.integers(len(k.extras)))].phrase
    return text, ok

  def _emblem_phrase(self, shape, kind, rng):
    if shape is None:
      return f"a {kind}", True
    if rng.random() < self.mention_rate and shape.key in FACTS.owner:
      org, good = self.know(FACTS.owner[shape.key], FACTS.orgs, rng)
      return f"the {kind} of {org}", good
    return f"a {shape.colour} {shape.shape} {kind}", True


# ----------------------------------------------------------------------------
# The knowledge world: facts no sentence states, which real images show and the
# generators know imperfectly (the world knowledge of a pretrained generator).
#
# Every organisation has an emblem (colour, shape); every person works for one
# organisation. A photo of a person shows them wearing their employer's emblem
# as a badge, except at their own employer, where they wear its uniform (its
# colour). A photo "P was seen with O" shows O's sign above the person.
#   seen    "P was seen with O ."   works_for iff P works for O, else none: the
#           sentence cannot tell, the image can (a uniform, not a badge).
#   stated  "P works for O ." / "P left O ."   the sentence tells; the image shows
#           only the employer's badge, so the image alone needs emblem ->
#           organisation knowledge, which the captioner has ("the badge of O").
# Plus the shape world's object-object and entity-object examples (synth.py).

KN_PEOPLE, KN_ORGS = 400, 15
EMBLEMS = tuple((c, s) for c in COLOURS for s in SHAPES)   # 15: one per organisation
PERSON = (70, 70, 80)     # body and head; not a palette colour, so `decode` skips it
BODY_BOX = (0.3, 0.55, 0.7, 0.98)
BADGE_BOX = (0.35, 0.6, 0.65, 0.9)
SIGN_BOX = (0.35, 0.04, 0.65, 0.34)
KN_TEMPLATES = {
    "seen": ("{p} was seen with {o} .", "{p} was photographed with {o} .",
             "{p} showed up at {o} ."),
    "works_for": ("{p} works for {o} .", "{p} is employed by {o} ."),
    "left": ("{p} left {o} .", "{p} quit {o} last year ."),
}
# Per 26 examples: knowledge examples ("kn", kind, relation) and shape-world recipes.
KN_RECIPES = (
    [("kn", "seen", "works_for")] * 5 + [("kn", "seen", "none")] * 5
    + [("kn", "stated", "works_for")] * 4 + [("kn", "stated", "none")] * 4
    + [("oo", "left_of", 0), ("oo", "above", 0), ("oo", "in_front_of", 0)]
    + [("oo", "none", 0)] * 2
    + [("eo", "holds", 0), ("eo", "owned_by", 0), ("eo", "none", 0)])
WORLD_VERSION = 2   # part of the world's cache key: bump when the written data changes


class Facts:
  """The hidden facts, fixed (seed 4321) and shared by the world and the generators."""

  def __init__(self, seed=4321):
    rng = np.random.default_rng(seed)
    word = lambda n: "".join(rng.choice(synth._SYLLABLES) for _ in range(n)).capitalize()
    orgs, people = [], []
    while len(orgs) < KN_ORGS:
      name = f"{word(2)} {synth._ORG_SUFFIX[len(orgs) % len(synth._ORG_SUFFIX)]}"
      if name not in orgs and name.split()[0] not in {o.split()[0] for o in orgs}:
        orgs.append(name)
    org_words = {w for o in orgs for w in o.split()}
    while len(people) < KN_PEOPLE:
      name = f"{word(2)} {word(2)}"
      words = name.split()
      if name not in people and not set(words) & org_words and words[0] != words[1]:
        people.append(name)
    self.orgs, self.people = tuple(orgs), tuple(people)
    self.emblem = {o: EMBLEMS[k] for o, k in zip(orgs, rng.permutation(len(EMBLEMS)))}
    self.owner = {e: o for o, e in self.emblem.items()}
    self.employer = {p: orgs[int(rng.integers(len(orgs)))] for p in people}
    self._org_re = re.compile("|".join(re.escape(o) for o in sorted(orgs, key=len,
                                                                      reverse=True)))
    self._person_re = re.compile("|".join(re.escape(p) for p in people))

  def orgs_in(self, text):
    return [(m.group(0), m.start()) for m in self._org_re.finditer(text)]

  def person_in(self, text):
    m = self._person_re.search(text)
    return m.group(0) if m else None


FACTS = Facts()


class KScene:
  """A knowledge-world photo: a person with a badge (emblem) or in a uniform (colour),
  maybe a sign (emblem) above, side shapes."""

  def __init__(self, badge=None, sign=None, extras=(), uniform=None):
    self.badge, self.sign, self.extras, self.uniform = badge, sign, list(extras), uniform


def _emblem_shape(emblem, box):
  l, t, r, b = box
  return Shape(emblem[0], emblem[1], "large", (l + r) / 2, (t + b) / 2, depth=3.0)


def _side_shapes(rng, k):
  """k small shapes in the side columns, away from the person and the sign."""
  out = []
  for _ in range(k):
    for _ in range(20):
      s = random_shape(rng, {x.key for x in out})
      s.size = "small"
      s.cx = float(rng.choice([rng.uniform(0.1, 0.17), rng.uniform(0.83, 0.9)]))
      s.cy = float(rng.uniform(0.12, 0.88))
      if not any(_overlap(s.box, x.box, 0.02) for x in out):
        out.append(s)
        break
  return out


def draw_kscene(scene, size=96):
  image = Image.fromarray(draw(scene.extras, size))
  d = ImageDraw.Draw(image)
  px = lambda *v: [x * size for x in v]
  if scene.sign is not None:   # the pole, then the sign on top of it
    d.rectangle(px(0.48, 0.3, 0.52, 0.42), fill=PERSON)
  d.ellipse(px(0.42, 0.38, 0.58, 0.54), fill=PERSON)    # head
  body = COLOURS[scene.uniform] if scene.uniform else PERSON
  d.rectangle(px(*BODY_BOX), fill=body)
  out = np.array(image)
  shapes = []
  if scene.badge is not None and scene.uniform is None:
    shapes.append(_emblem_shape(scene.badge, BADGE_BOX))
  if scene.sign is not None:
    shapes.append(_emblem_shape(scene.sign, SIGN_BOX))
  layer = draw(shapes, size)
  mask = np.any(layer != np.asarray(BACKGROUND, np.uint8), -1)
  out[mask] = layer[mask]
  return out


def random_kscene(rng):
  pick = lambda: EMBLEMS[int(rng.integers(len(EMBLEMS)))]
  uniform = pick()[0] if rng.random() < 0.3 else None
  return KScene(pick(), pick() if rng.random() < 0.5 else None,
                _side_shapes(rng, int(rng.integers(0, 3))), uniform)


def _in_box(s, box):
  return box[0] <= s.cx <= box[2] and box[1] <= s.cy <= box[3]


def decode_kscene(image):
  """KScene-like (badge, sign, uniform as decoded Shapes, `others`) if the image shows a
  person (their head), else None."""
  img = np.asarray(image, np.int32)
  person = np.abs(img - np.asarray(PERSON)).max(-1) <= 20
  if person.mean() < 0.01:
    return None
  shapes = decode(image)
  uniform = next((s for s in shapes if _in_box(s, BODY_BOX)
                  and s.extent[2] - s.extent[0] >= 0.36), None)
  rest = [s for s in shapes if s is not uniform]
  badge = next((s for s in rest if _in_box(s, BADGE_BOX)), None) if uniform is None else None
  sign = next((s for s in rest if _in_box(s, SIGN_BOX)), None)
  return KScene(badge, sign, [s for s in rest if s is not badge and s is not sign], uniform)


def _decoded(image, knowledge):
  """(decode_kscene or None, decode) of an image, cached: a view is captioned many times."""
  key = (hashlib.sha1(image.tobytes()).digest(), image.shape, knowledge)
  if key not in _DECODED:
    if len(_DECODED) > 4096:
      _DECODED.clear()
    k = decode_kscene(image) if knowledge else None
    _DECODED[key] = (k, None if k is not None else decode(image))
  return _DECODED[key]


_DECODED = {}
_BADGE_OF = re.compile(r"\b(badge|sign) of ([A-Z]\w+ \w+)")
_EMBLEM_OF = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES)
                        + r")\s+(badge|sign)\b")
_UNIFORM = re.compile(r"\b(" + "|".join(COLOURS) + r") uniform\b")
_UNIFORM_OF = re.compile(r"\buniform of ([A-Z]\w+ \w+)")
_SIGN_VERBS = ("seen with", "photographed with", "showed up at")


def _kn_example(rng, kind, relation, image_size):
  """-> (tokens, head, tail, image): a knowledge-world example."""
  person = FACTS.people[int(rng.integers(len(FACTS.people)))]
  employer = FACTS.employer[person]
  others = [o for o in FACTS.orgs if o != employer]
  org = employer if relation == "works_for" else others[int(rng.integers(len(others)))]
  key = "seen" if kind == "seen" else ("works_for" if relation == "works_for" else "left")
  templates = KN_TEMPLATES[key]
  tokens = templates[int(rng.integers(len(templates)))].format(p=person, o=org).split()
  uniform = FACTS.emblem[org][0] if kind == "seen" and org == employer else None
  scene = KScene(FACTS.emblem[employer], FACTS.emblem[org] if kind == "seen" else None,
                 uniform=uniform)
  span = lambda name: synth._span(tokens, name.split())
  return tokens, (person, span(person)), (org, span(org)), draw_kscene(scene, image_size)


# The knowledge world's object-object and entity-object examples: the shape world as it was
# when the knowledge world was built (remote_jax/data/synth.py before its v3, whose
# in_front_of is seen in depth only and whose e-o examples are referring expressions). Here
# in_front_of is an occlusion the RGB image shows and an e-o sentence names its shape.
_SHAPE_TEMPLATES = {
    "holds": ("{p} is holding the {d} .", "{p} carries the {d} ."),
    "owned_by": ("the {d} belongs to {p} .", "the {d} is owned by {p} ."),
}


def _shape_name(shape):
  return f"{shape.size} {shape.colour} {shape.shape}"


def _shape_pair(rng, relation):
  """Two shapes (a, b) such that `relation`(a, b) holds and no other spatial relation does."""
  while True:
    sa, sb = (rng.choice(list(SIZES)) for _ in range(2))
    da = float(rng.uniform(1.0, 2.0))
    if relation == "in_front_of":   # overlapping: a is nearer and drawn over b
      cx, cy = rng.uniform(0.25, 0.75, size=2)
      dx, dy = rng.uniform(0.05, 0.12, size=2) * rng.choice([-1, 1], size=2)
      b = (cx, cy, da)
      a = (cx + dx, cy + dy, da + float(rng.uniform(1.0, 1.5)))
    else:
      a, b = synth.apart(rng, relation, da)
    sha, shb = synth._Shape(str(sa), *map(float, a)), synth._Shape(str(sb), *map(float, b))
    if synth._inside(sha.box) and synth._inside(shb.box) and (
        relation == "in_front_of" or not synth._overlaps(sha.box, shb.box)):
      return sha, shb


def _shape_scene(rng, n, fixed=()):
  """`fixed` shapes plus random non-overlapping ones up to n, unique (colour, shape) each."""
  shapes = list(fixed)
  for _ in range(200):
    if len(shapes) >= n:
      break
    size = str(rng.choice(list(SIZES)))
    h = SIZES[size] / 2
    cx, cy = rng.uniform(0.02 + h, 0.98 - h, size=2)
    cand = synth._Shape(size, float(cx), float(cy), float(rng.uniform(1.0, 2.0)))
    if not any(synth._overlaps(cand.box, s.box) for s in shapes):
      shapes.append(cand)
  combos = [(c, s) for c in COLOURS for s in SHAPES]
  for shape, k in zip(shapes, rng.permutation(len(combos))[:len(shapes)]):
    shape.colour, shape.shape = combos[k]
  order = rng.permutation(len(shapes))  # slot order is random: the pair is not always 0, 1
  return [shapes[i] for i in order]


def _shape_example(rng, kind, relation, variant):
  """-> (tokens, (head, tail), relation, shapes) of an "oo" or "eo" recipe; an object entity
  is {"shape": index, "pos": box}, a named one {"name", "pos"}."""
  names = synth._names(rng)
  n = int(rng.integers(2, 6))
  span = lambda tokens, name: synth._span(tokens, name.split())
  obj = lambda shapes, s: dict(shape=shapes.index(s), pos=[round(v, 4) for v in s.box])
  if kind == "oo":
    positive = relation if relation != "none" else rng.choice(["left_of", "above",
                                                               "in_front_of"])
    a, b = _shape_pair(rng, positive)
    shapes = _shape_scene(rng, max(n, 2), fixed=(a, b))
    tokens = rng.choice(synth.TEMPLATES["scene"]).format(**names).split()
    ends = (obj(shapes, a), obj(shapes, b)) if relation != "none" else (obj(shapes, b),
                                                                         obj(shapes, a))
    return tokens, ends, relation, shapes
  shapes = _shape_scene(rng, n)
  while len(shapes) < 2:
    shapes = _shape_scene(rng, n)
  described = shapes[int(rng.integers(len(shapes)))]
  target = described
  if relation == "none":
    target = [s for s in shapes if s is not described][int(rng.integers(len(shapes) - 1))]
  form = relation if relation != "none" else ("holds", "owned_by")[variant]
  tokens = rng.choice(_SHAPE_TEMPLATES[form]).format(
      p=names["p"], d=f"{described.colour} {described.shape}").split()
  person = dict(name=names["p"], pos=span(tokens, names["p"]))
  ends = (person, obj(shapes, target)) if form == "holds" else (obj(shapes, target), person)
  return tokens, ends, relation, shapes


# The knowledge world's parameters: those of config.data.demo it uses.
WORLD_KEYS = ("seed", "n_train", "n_val", "n_test", "image_size")


def write_world(out_dir, *, seed, n_train, n_val, n_test, image_size):
  """The knowledge world: `<split>.jsonl` (one instance a line) + `images/*.png`."""
  out = pathlib.Path(out_dir)
  (out / "images").mkdir(parents=True, exist_ok=True)
  for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val),
                                                ("test", n_test))):
    rng = np.random.default_rng([seed, 7, split_index])
    recipes = (KN_RECIPES * math.ceil(count / len(KN_RECIPES)))[:count]
    order = rng.permutation(count)
    lines = []
    for i in range(count):
      recipe = recipes[order[i]]
      img = f"images/{split}_{i:05d}.png"
      if recipe[0] == "kn":
        tokens, (h, hp), (t, tp), image = _kn_example(rng, recipe[1], recipe[2], image_size)
        head = dict(name=h, pos=hp, is_object=False)
        tail = dict(name=t, pos=tp, is_object=False)
        rel, ttype, family = recipe[2], 0, f"kn_{recipe[1]}"
      else:
        tokens, ents, rel, shapes = _shape_example(rng, *recipe)
        image = np.asarray(synth._render(shapes, image_size)[0])
        head, tail = (dict(name=e["name"], pos=e["pos"], is_object=False) if "shape" not in e
                      # an object is named by its caption without the article
                      else dict(name=_shape_name(shapes[e["shape"]]), pos=e["pos"],
                                is_object=True) for e in ents)
        ttype, family = ("oo", "eo").index(recipe[0]) + 1, recipe[0]
      Image.fromarray(image).save(out / img)
      lines.append(json.dumps(dict(tokens=tokens, head=head, tail=tail, relation=rel,
                                   triplet_type=ttype, family=family, image=img)))
    (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
  return out


def ensure_world(root, params):
  """`root/knowledge-<hash of params and WORLD_VERSION>`, written once."""
  return synth.ensure_written(root, "knowledge", params, write_world, version=WORLD_VERSION)


def read_world(cfg):
  """data.READERS["demo_knowledge"]: writes the knowledge world if needed, then reads it."""
  from mi2rage_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from remote_jax.data import records  # pylint: disable=import-outside-toplevel
  params = {k: dict(cfg.demo)[k] for k in WORLD_KEYS}
  root = cfg.root or pathlib.Path(cfg.cache_dir or "data_cache") / "demo"
  directory = ensure_world(root, params)
  relations = list(synth.RELATIONS)
  index = {r: i for i, r in enumerate(relations)}
  splits, buckets = {}, {}
  for split in (cfg.train_split, cfg.test_split):
    insts = []
    for row, line in enumerate((directory / f"{split}.jsonl").read_text().splitlines()):
      d = json.loads(line)
      ents = [records.Entity(e["name"], tuple(e["pos"]), e["is_object"])
              for e in (d["head"], d["tail"])]
      insts.append(data_lib.Instance(f"{split}/{row}", split, tuple(d["tokens"]), ents[0],
                                     ents[1], str(directory / d["image"]),
                                     index[d["relation"]], d["triplet_type"],
                                     d["image"].rsplit("/", 1)[-1]))
      buckets.setdefault(split, {}).setdefault(d["family"], []).append(row)
    splits[split] = insts
  # Scores per family: kn_seen is where only the image decides (KN_RECIPES).
  return data_lib.Dataset(splits, relations, index["none"], buckets=buckets)


def examples(root, params):
  """{instance id: its jsonl row} of the world `params` under `root`."""
  directory = ensure_world(root, {k: dict(params)[k] for k in WORLD_KEYS})
  out = {}
  for split in ("train", "val", "test"):
    for row, line in enumerate((directory / f"{split}.jsonl").read_text().splitlines()):
      out[f"{split}/{row}"] = json.loads(line)
  return out


def families(root, params):
  """{instance id: family} (kn_seen, kn_stated, oo, eo) of the world `params` under `root`."""
  return {i: row["family"] for i, row in examples(root, params).items()}


def _cue(view):
  """(uniform shown, badge emblem or None) of an image (array) or a caption; None when it
  shows no person."""
  if isinstance(view, str):
    if "person" not in view:
      return None
    uniform = bool(_UNIFORM.search(view.lower()) or _UNIFORM_OF.search(view))
    badge = next((FACTS.emblem.get(org) for kind, org in _BADGE_OF.findall(view)
                  if kind == "badge"), None)
    badge = badge or next(((c, sh) for c, sh, kind in _EMBLEM_OF.findall(view.lower())
                           if kind == "badge"), None)
    return uniform, badge
  k = decode_kscene(view)
  if k is None:
    return None
  return k.uniform is not None, (k.badge.colour, k.badge.shape) if k.badge else None


def label_consistent(row, view):
  """Does a view (image array or caption) of the example `row` show the cue of its true
  label? kn_seen: a uniform iff works_for; kn_stated: the badge of the organisation (the
  tail) iff works_for. None for the other families. The paper's teacher selects for this
  (information about the label), which a generator's wrong knowledge can keep: an
  unfaithful view can be consistent, a faithful one always is (tests/mi2rage_jax)."""
  if row["family"] not in ("kn_seen", "kn_stated"):
    return None
  cue = _cue(view)
  if cue is None:
    return False
  uniform, badge = cue
  works = row["relation"] == "works_for"
  if row["family"] == "kn_seen":
    return uniform == works
  return badge is not None and (badge == FACTS.emblem[row["tail"]["name"]]) == works
