"""The attribute world (issue 35): relations that need an attribute a pretrained tower fades.

Each image holds 3 shapes of the demo world (synth's shapes, colours and sizes, square boxes,
disjoint), with 3 different colours and the 3 different shapes, random nearness, and sensor
noise (`pixel_noise`, the same floor as the synthetic tower's crops, remote_jax/towers.py).
Every triplet is entity-object, (person, one of the objects), from one sentence that names no
attribute; a rule of the world decides it from the object's own attribute:

- `painted` (the COLOUR part): "P painted a shape ." holds for the objects of a PAINTED colour
  (red or yellow), none for the others. The object's own colour is the only cue.
- `drew` (the SHAPE control): "P drew a shape ." holds for the circle, none for the others:
  the shape, which the colour-blind tower keeps at its top.

Half the triplets of each part are positive. Every object's caption is the uninformative "an
object", so the text never says which object is which. The relation ids and layout are
UMRE's, read by the very same reader as the demo world; `buckets.json` names each split's
lines of each part (PARTS), scored apart as "test/colour/f1" and "test/shape/f1".

A first version asked the head to match a named attribute ("P painted the red shape ."
holds for the red object). With `moe=off` the text and the objects meet only in the head's
MLP, and a pilot (`ot_paper`, seed 99, 1,000 examples) had learned neither part at 600
steps (docs/ot_world.md); the rule reads one object's attribute, which the head can learn
within the study's budget.

`colour_source="tag"` (H3, docs/ot_world.md §5) moves the colour part's cue to OTHER
positions than the read object's: each image holds 2 large grey shapes of 2 different shapes
and 2 small TAGS (apart from them), one of each of those shapes, one tag of a painted
colour and one not.
"P painted a shape ." holds for the large shape whose tag (the small shape of its shape) is
painted; triplets read the large shapes only. The read object's own tokens carry no colour,
so a same-position `skip` cannot find the cue and `mot=none` cannot see it; the `uniform`
plan mixes both tags into every object alike; only a plan (or attention) that matches a
large shape to its same-shaped tag by content can bring the cue to the read object.
`drew` is unchanged (the circle, among the large shapes).

What each part tests (docs/ot_world.md):
- H1, "a path to the lower levels recovers the faded attribute": on `painted`, a model whose
  head sees only the tower's top (`mot=none`, `moe=off`) can hardly tell an object's colour;
  any path to the lower levels can. `drew` is the control: every variant should solve it.
- H2, "transport finds the information where it sits": with `model.mot.vision_scope=image`
  an object's tokens are transported from every object's lower tokens. The `uniform` plan
  mixes all three colours into every object; a plan that matches each token to its own
  object's lower tokens keeps them apart, as a same-position `skip` does by construction.
"""
import json
import pathlib

import numpy as np

from remote_jax import config as config_lib
from remote_jax.config import cfg_get, setting
from remote_jax.data import synth, umre

RELATIONS = ("none", "painted", "drew")
# Objects per image, stated once in remote_jax/config.py (data.num_objects follows them).
NUM_OBJECTS = config_lib.ATTRIBUTE_WORLD_OBJECTS["own"]
PAINTED_COLOURS = ("red", "yellow")
DRAWN_SHAPE = "circle"
TEMPLATES = {
    "painted": ("{p} painted a shape .", "{p} coloured one of the shapes .",
                "a shape was painted by {p} ."),
    "drew": ("{p} drew a shape .", "{p} cut out one of the shapes .",
             "a shape was drawn by {p} ."),
}
# The test buckets (metrics "test/colour/f1", "test/shape/f1"): each relation's part.
PARTS = {"painted": "colour", "drew": "shape"}
WORLD_KEYS = ("seed", "n_train", "n_val", "n_test", "image_size", "pixel_noise",
              "colour_source")
# Where the colour part's cue sits (colour_source): the read object itself ("own"), or its
# same-shaped tag ("tag"); remote_jax/config.py ATTRIBUTE_WORLD_OBJECTS lists them.
# The tag world's large shapes are UNPAINTED grey (in no part's rule), its tags small.
UNPAINTED, UNPAINTED_RGB = "grey", (150, 150, 150)
PALETTE = dict(synth.COLOURS, **{UNPAINTED: UNPAINTED_RGB})
LARGE, TAG = "large", "small"
NUM_LARGE = config_lib.ATTRIBUTE_WORLD_OBJECTS["tag"] // 2   # one tag per large shape
# Part of the cache key: bump when the generated data changes.
GENERATOR_VERSION = 2


def _scene(rng):
  """3 disjoint shapes: a permutation of the 3 shapes, 3 different colours of which at least
  one is a PAINTED colour and one is not, random nearness."""
  while True:
    shapes = []
    if synth._fill(rng, shapes, NUM_OBJECTS, tries=30):
      break
  while True:
    colours = [list(synth.COLOURS)[i]
               for i in rng.permutation(len(synth.COLOURS))[:NUM_OBJECTS]]
    if 0 < sum(c in PAINTED_COLOURS for c in colours) < NUM_OBJECTS:
      break
  for s, colour, k in zip(shapes, colours, rng.permutation(len(synth.SHAPES))):
    s.colour, s.shape, s.depth = colour, synth.SHAPES[k], float(rng.uniform(1.0, 2.0))
  return shapes


def _tag_scene(rng):
  """2 large grey shapes of 2 different shapes and 2 small tags, one of each of those shapes,
  one tag of a PAINTED colour and one of another colour; disjoint, in random slots."""
  kinds = [synth.SHAPES[k] for k in rng.permutation(len(synth.SHAPES))[:NUM_LARGE]]
  others = [c for c in synth.COLOURS if c not in PAINTED_COLOURS]
  tag_colours = [str(rng.choice(PAINTED_COLOURS)), str(rng.choice(others))]
  tag_colours = [tag_colours[i] for i in rng.permutation(NUM_LARGE)]
  specs = ([(LARGE, UNPAINTED, kind) for kind in kinds]
           + [(TAG, colour, kind) for colour, kind in zip(tag_colours, kinds)])
  while True:
    shapes = []
    for size, colour, kind in specs:
      h = synth.SIZES[size] / 2
      for _ in range(200):
        cand = synth.Shape(size, float(rng.uniform(0.02 + h, 0.98 - h)),
                           float(rng.uniform(0.02 + h, 0.98 - h)), float(rng.uniform(1.0, 2.0)),
                           colour, kind)
        if synth._free(cand, shapes):
          shapes.append(cand)
          break
    if len(shapes) == len(specs):
      return [shapes[i] for i in rng.permutation(len(shapes))]


def tag_of(shape, shapes):
  """The small tag of a large shape's shape in a tag scene."""
  return shapes[_tag_index([(s.size, s.shape) for s in shapes], shape.shape)]


def _tag_index(objects, kind):
  """The index of the tag of shape `kind` among (size, shape) pairs; ValueError if none."""
  for i, (size, shape) in enumerate(objects):
    if size == TAG and shape == kind:
      return i
  raise ValueError(f"the tag scene has no {TAG} {kind} (a world written by another version?)")


def holds(relation, shape, shapes, colour_source="own"):
  """The world's rule: does `relation` hold between the sentence's person and `shape` (one of
  the image's `shapes`)? With `colour_source="tag"` the colour is the shape's tag's."""
  if relation == "painted":
    cue = tag_of(shape, shapes) if colour_source == "tag" else shape
    return cue.colour in PAINTED_COLOURS
  return shape.shape == DRAWN_SHAPE


def _example(rng, relation, positive, colour_source):
  """-> (line without img_id, shapes, captions). Triplets read the large shapes only in a
  tag scene; a scene without a fitting target (no large circle) is drawn again."""
  names = synth.pick_names(rng)
  while True:
    shapes = _tag_scene(rng) if colour_source == "tag" else _scene(rng)
    readable = [s for s in shapes if colour_source == "own" or s.size == LARGE]
    options = [s for s in readable if holds(relation, s, shapes, colour_source) == positive]
    if options:
      break
  tokens = str(rng.choice(TEMPLATES[relation])).format(p=names["p"]).split()
  target = options[int(rng.integers(len(options)))]
  person = dict(name=names["p"], pos=synth.span(tokens, names["p"].split()))
  obj = dict(name=f"[OBJ{shapes.index(target)}]", pos=[round(v, 4) for v in target.box])
  captions = {names["p"]: synth.DESCRIPTIONS["p"].format(names["p"])}
  captions.update({f"[OBJ{k}]": synth.ABSENT_CAPTION for k in range(len(shapes))})
  line = dict(token=tokens, h=person, t=obj, relation=relation if positive else "none")
  return line, shapes, captions


def _plan(rng, count):
  """(relation part, positive) per line: parts and labels balanced, order shuffled."""
  cycle = [(r, p) for r in ("painted", "drew") for p in (True, False)]
  plan = (cycle * (count // len(cycle) + 1))[:count]
  return [plan[i] for i in rng.permutation(count)]


def read_cue(objects, slot, colour_source):
  """(cue slot, cue colour, shape) of world.json's `objects[slot]`: the object whose colour
  decides the colour part for it (itself, or its same-shaped tag), or None for an object no
  triplet reads (a tag)."""
  colour, shape, size = objects[slot][:3]
  if colour_source != "tag":
    return slot, colour, shape
  if size != LARGE:
    return None
  cue = _tag_index([(o[2], o[1]) for o in objects], shape)
  return cue, objects[cue][0], shape


def write_attribute_world(out_dir, *, seed, n_train, n_val, n_test, image_size, pixel_noise,
                          colour_source="own"):
  """Writes the world in UMRE layout under `out_dir` (UmreReader's default paths), with the
  buckets of PARTS per split ({split: {part: 0-based line indices}}) and the ground truth
  `world.json` (per image in slot order: colour, shape, size, nearness)."""
  config_lib.attribute_world_objects(colour_source)   # a bad source is a one-line error
  out = pathlib.Path(out_dir)
  paths = umre.UmreReader.DEFAULT_PATHS
  (out / paths["images"]).mkdir(parents=True, exist_ok=True)
  (out / paths["depth"]).mkdir(parents=True, exist_ok=True)
  boxes, captions, world, buckets = {}, {}, {}, {}
  for split_index, (split, count) in enumerate((("train", n_train), ("val", n_val),
                                                ("test", n_test))):
    rng = np.random.default_rng([seed, split_index])
    noise_rng = np.random.default_rng([seed, split_index, 1])
    lines, parts = [], {part: [] for part in PARTS.values()}
    for i, (relation, positive) in enumerate(_plan(rng, count)):
      line, shapes, caps = _example(rng, relation, positive, colour_source)
      parts[PARTS[relation]].append(i)
      stem = f"{split}_{i:05d}"
      line["img_id"] = img_id = f"{stem}.png"
      image, depth = synth.render(shapes, image_size, PALETTE)
      synth.add_noise(image, synth.noise_field(noise_rng, image_size, pixel_noise)).save(
          out / paths["images"] / img_id)
      np.savez_compressed(out / paths["depth"] / f"{stem}.npz", depth_map=depth)
      boxes[img_id] = {f"[OBJ{k}]": [round(v, 4) for v in s.box] for k, s in enumerate(shapes)}
      captions[img_id] = caps
      world[img_id] = [[s.colour, s.shape, s.size, round(s.depth, 4)] for s in shapes]
      lines.append(json.dumps(line))
    (out / paths[split]).write_text("\n".join(lines) + "\n")
    buckets[split] = parts
  (out / paths["boxes"]).write_text(json.dumps(boxes))
  (out / paths["captions"]).write_text(json.dumps(captions))
  (out / paths["relations"]).write_text(json.dumps({r: i for i, r in enumerate(RELATIONS)}))
  (out / paths["buckets"]).write_text(json.dumps(buckets))
  (out / "world.json").write_text(json.dumps(dict(images=world)))
  return out


def reader(cfg):
  """DATASETS["attribute_world"]: writes the world once (under data.cache_dir), reads it as
  UMRE."""
  params = synth.world_params(cfg, "attribute_world", WORLD_KEYS, "attribute world",
                              "configs/ot_world.py")
  root = cfg_get(cfg, "root") or pathlib.Path(setting(cfg, "cache_dir")) / "attribute_world"
  return synth.umre_reader(synth.ensure_written(root, "attribute", params, write_attribute_world,
                                                generator=GENERATOR_VERSION), cfg)
