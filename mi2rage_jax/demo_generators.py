"""Procedural cross-modal generators over the demo worlds (remote_jax data/synth.py and
knowledge_world.py).

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
import re

import numpy as np

from mi2rage_jax import knowledge_world as world
from remote_jax.data import synth

COLOURS, SHAPES, SIZES = synth.COLOURS, synth.SHAPES, synth.SIZES
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


def relation(a, b):
  """Spatial relation of a to b: left/right/above/below/front/behind."""
  if synth.overlaps(a.extent, b.extent, 0.0):
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


def random_scene(rng, lo=2, hi=5):
  shapes = []
  for _ in range(int(rng.integers(lo, hi + 1))):
    for _ in range(50):
      s = world.random_shape(rng, {x.combo for x in shapes})
      if not any(synth.overlaps(s.box, x.box) for x in shapes):
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
      shapes.append(synth.Shape(size, rng.uniform(world.MARGIN + h, 1 - world.MARGIN - h),
                                rng.uniform(world.MARGIN + h, 1 - world.MARGIN - h),
                                rng.uniform(1.0, 2.0), colour, shape))
    placed = set()
    for i, rel, j in constraints:
      if j in placed and i not in placed:
        _place_relative(shapes[j], INVERSE[rel], shapes[i], rng)
        placed.add(i)
      elif j not in placed:
        _place_relative(shapes[i], rel, shapes[j], rng)
        placed.update((i, j))
    if not all(synth.inside(s.box, world.MARGIN) for s in shapes):
      continue
    layered = {frozenset((i, j)) for i, rel, j in constraints if rel in ("front", "behind")}
    if any(synth.overlaps(shapes[a].box, shapes[b].box) and frozenset((a, b)) not in layered
           for a in range(len(shapes)) for b in range(a + 1, len(shapes))):
      continue
    break
  # Extra shapes, as a diffusion model adds unrequested content.
  for _ in range(int(rng.integers(0, 3))):
    s = world.random_shape(rng, {x.combo for x in shapes})
    if not any(synth.overlaps(s.box, x.box) for x in shapes):
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
      return world.draw_kscene(world.random_kscene(rng), self.image_size)
    return world.draw(random_scene(rng), self.image_size)

  def render(self, text, rng):
    """-> (image uint8, faithful)."""
    if rng.random() < self.noise:
      return self._random_image(rng), False
    scene, ok = self.kscene_from_text(text, rng) if self.knowledge else (None, True)
    if scene is not None:
      return world.draw_kscene(scene, self.image_size), ok
    return world.draw(scene_from_text(text, rng), self.image_size), True

  def kscene_from_text(self, text, rng):
    """-> (KScene | None, faithful): badge, uniform and sign the text names or implies.
    Look-ups: person -> employer, organisation -> emblem (each may be wrong)."""
    ok, found = True, {}

    def emblem(org):
      nonlocal ok
      e, good = self.know(world.FACTS.emblem[org], world.EMBLEMS, rng)
      ok &= good
      return e

    for kind, org in world.BADGE_OF.findall(text):
      if org in world.FACTS.emblem and kind not in found:
        found[kind] = emblem(org)
    for colour, shape, kind in world.EMBLEM_OF.findall(text.lower()):
      found.setdefault(kind, (colour, shape))
    m = world.UNIFORM_OF.search(text)
    if m and m.group(1) in world.FACTS.emblem:
      found["uniform"] = emblem(m.group(1))[0]
    m = world.UNIFORM.search(text.lower())
    if m and "uniform" not in found:
      found["uniform"] = m.group(1)
    orgs = world.FACTS.orgs_in(text)
    at = orgs[-1][0] if orgs and any(v in text for v in world.SIGN_VERBS) else None
    if at is not None and "sign" not in found:
      found["sign"] = emblem(at)
    person = world.FACTS.person_in(text)
    if person is not None and "badge" not in found and "uniform" not in found:
      employer, good = self.know(world.FACTS.employer[person], world.FACTS.orgs, rng)
      ok &= good
      if employer == at:   # at their own employer: its uniform (the sign's colour)
        found["uniform"] = found["sign"][0]
      else:
        found["badge"] = emblem(employer)
    if not found:
      return None, True
    if "badge" not in found and "uniform" not in found:
      found["badge"] = world.EMBLEMS[int(rng.integers(len(world.EMBLEMS)))]
    # No side shapes: photos that differ only in what matters give a student nothing
    # instance-specific to memorise (with them it memorised views instead of reading text).
    return world.KScene(found.get("badge"), found.get("sign"), uniform=found.get("uniform")), ok

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
    if rng.random() < self.mention_rate and shape.combo in world.FACTS.owner:
      org, good = self.know(world.FACTS.owner[shape.combo], world.FACTS.orgs, rng)
      return f"the {kind} of {org}", good
    return f"a {shape.colour} {shape.shape} {kind}", True


def _decoded(image, knowledge):
  """(decode_kscene or None, decode) of an image, cached: a view is captioned many times."""
  key = (hashlib.sha1(image.tobytes()).digest(), image.shape, knowledge)
  if key not in _DECODED:
    if len(_DECODED) > 4096:
      _DECODED.clear()
    k = world.decode_kscene(image) if knowledge else None
    _DECODED[key] = (k, None if k is not None else world.decode(image))
  return _DECODED[key]




_DECODED = {}
