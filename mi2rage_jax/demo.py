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
import itertools
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
    h = self.side / 2
    return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

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
    l, t, r, b = (v * size for v in s.box)
    r, b = r - 1, b - 1
    fill = COLOURS[s.colour]
    if s.shape == "circle":
      d.ellipse((l, t, r, b), fill=fill)
    elif s.shape == "square":
      d.rectangle((l, t, r, b), fill=fill)
    else:
      d.polygon([((l + r) / 2, t), (l, b), (r, b)], fill=fill)
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
  """text->image (`render`) and image->text (`caption`) with a noise rate."""

  def __init__(self, noise: float = 0.0, image_size: int = 96, max_pairs: int = 3):
    if not 0.0 <= noise <= 1.0:
      raise ValueError(f"generator noise {noise} not in [0, 1]")
    self.noise, self.image_size, self.max_pairs = float(noise), int(image_size), int(max_pairs)

  def render(self, text, rng):
    """-> (image uint8, faithful)."""
    if rng.random() < self.noise:
      return draw(random_scene(rng), self.image_size), False
    return draw(scene_from_text(text, rng), self.image_size), True

  def caption(self, image, rng):
    """-> (caption, faithful)."""
    if rng.random() < self.noise:
      return describe(decode(draw(random_scene(rng), self.image_size)), rng,
                      self.max_pairs), False
    shapes = decode(image)
    if not shapes:
      return "an empty grey picture", True
    return describe(shapes, rng, self.max_pairs), True
