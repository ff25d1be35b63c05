"""The knowledge world of the MI²RAGE demo: facts no sentence states, which real images show
and the demo generators (demo_generators.py) know imperfectly.

Scenes are remote_jax's demo shapes (data/synth.py: `Shape`, its colours, sizes and drawing)
plus a person who wears an organisation's emblem as a badge or its colour as a uniform, under
its sign. `write_world` writes the world's examples (`<split>.jsonl` + images, read by
mi2rage_jax/data.py's `demo_knowledge` reader); `draw`, `decode` and `decode_kscene` turn
scenes into images and back, for the world and the generators alike; `label_consistent`
tells whether a view shows the cue of its example's true label (analysis only).
"""
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
# The demo generators' scenes keep this much from the image's edges (synth's world: 0.02).
MARGIN = 0.01


def draw(shapes, size=96):
  """RGB uint8 (size, size, 3) of synth Shapes; nearer (larger depth) shapes are drawn last."""
  return np.asarray(synth.render(shapes, size)[0], np.uint8)


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
      s = synth.Shape(size, (xs.min() + xs.max() + 1) / 2 / n, (ys.min() + ys.max() + 1) / 2 / n,
                      colour=colour, shape=shape)
      s.extent = (xs.min() / n, ys.min() / n, (xs.max() + 1) / n, (ys.max() + 1) / n)
      s.pixels = (labels == k)
      out.append(s)
  return out


def random_shape(rng, taken=()):
  """A random Shape whose (colour, shape) is not in `taken`, MARGIN from the edges."""
  combos = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in taken]
  c, s = combos[rng.integers(len(combos))]
  size = list(SIZES)[rng.integers(len(SIZES))]
  h = SIZES[size] / 2
  return synth.Shape(size, rng.uniform(MARGIN + h, 1 - MARGIN - h),
                     rng.uniform(MARGIN + h, 1 - MARGIN - h), rng.uniform(1.0, 2.0), c, s)


# The facts are the world knowledge of a pretrained generator.
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
    word = lambda n: "".join(rng.choice(synth.SYLLABLES) for _ in range(n)).capitalize()
    orgs, people = [], []
    while len(orgs) < KN_ORGS:
      name = f"{word(2)} {synth.ORG_SUFFIX[len(orgs) % len(synth.ORG_SUFFIX)]}"
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
  return synth.Shape("large", (l + r) / 2, (t + b) / 2, 3.0, emblem[0], emblem[1])


def _side_shapes(rng, k):
  """k small shapes in the side columns, away from the person and the sign."""
  out = []
  for _ in range(k):
    for _ in range(20):
      s = random_shape(rng, {x.combo for x in out})
      s.size = "small"
      s.cx = float(rng.choice([rng.uniform(0.1, 0.17), rng.uniform(0.83, 0.9)]))
      s.cy = float(rng.uniform(0.12, 0.88))
      if not any(synth.overlaps(s.box, x.box) for x in out):
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


# How texts name emblems, uniforms and signs (read by the generators and `_cue`).
BADGE_OF = re.compile(r"\b(badge|sign) of ([A-Z]\w+ \w+)")
EMBLEM_OF = re.compile(r"\b(" + "|".join(COLOURS) + r")\s+(" + "|".join(SHAPES)
                        + r")\s+(badge|sign)\b")
UNIFORM = re.compile(r"\b(" + "|".join(COLOURS) + r") uniform\b")
UNIFORM_OF = re.compile(r"\buniform of ([A-Z]\w+ \w+)")
SIGN_VERBS = ("seen with", "photographed with", "showed up at")


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
  span = lambda name: synth.span(tokens, name.split())
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
    sha, shb = synth.Shape(str(sa), *map(float, a)), synth.Shape(str(sb), *map(float, b))
    if synth.inside(sha.box) and synth.inside(shb.box) and (
        relation == "in_front_of" or not synth.overlaps(sha.box, shb.box)):
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
    cand = synth.Shape(size, float(cx), float(cy), float(rng.uniform(1.0, 2.0)))
    if not any(synth.overlaps(cand.box, s.box) for s in shapes):
      shapes.append(cand)
  combos = [(c, s) for c in COLOURS for s in SHAPES]
  for shape, k in zip(shapes, rng.permutation(len(combos))[:len(shapes)]):
    shape.colour, shape.shape = combos[k]
  order = rng.permutation(len(shapes))  # slot order is random: the pair is not always 0, 1
  return [shapes[i] for i in order]


def _shape_example(rng, kind, relation, variant):
  """-> (tokens, (head, tail), relation, shapes) of an "oo" or "eo" recipe; an object entity
  is {"shape": index, "pos": box}, a named one {"name", "pos"}."""
  names = synth.pick_names(rng)
  n = int(rng.integers(2, 6))
  span = lambda tokens, name: synth.span(tokens, name.split())
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
        image = np.asarray(synth.render(shapes, image_size)[0])
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
    uniform = bool(UNIFORM.search(view.lower()) or UNIFORM_OF.search(view))
    badge = next((FACTS.emblem.get(org) for kind, org in BADGE_OF.findall(view)
                  if kind == "badge"), None)
    badge = badge or next(((c, sh) for c, sh, kind in EMBLEM_OF.findall(view.lower())
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
