"""The knowledge world and its demo generators: facts, error rates, determinism, learnability."""
import numpy as np
import pytest

from mi2rage_jax import demo
from mi2rage_jax.generators import seeded

F = demo.FACTS


def _seen(person, org):
  return f"{person} was seen with {org} ."


def test_facts_are_fixed_and_consistent():
  again = demo.Facts()
  assert again.orgs == F.orgs and again.people == F.people
  assert again.employer == F.employer and again.emblem == F.emblem
  assert sorted(F.emblem.values()) == sorted(demo.EMBLEMS)     # one emblem per organisation
  assert set(F.employer.values()) == set(F.orgs)


def test_real_image_shows_the_hidden_fact():
  """The world's photo of "P was seen with O" shows O's sign, and P in O's uniform if P works
  for O, else P's employer's badge; "P works for O" / "P left O" show only the badge."""
  rng = np.random.default_rng(0)
  for _ in range(20):
    for rel in ("none", "works_for"):
      _, (p, _), (o, _), image = demo._kn_example(rng, "seen", rel, 96)
      k = demo.decode_kscene(image)
      assert k.sign.key == F.emblem[o]
      if rel == "works_for":
        assert k.badge is None and k.uniform.colour == F.emblem[o][0]
      else:
        assert k.uniform is None and k.badge.key == F.emblem[F.employer[p]] != F.emblem[o]
      _, (p, _), _, stated = demo._kn_example(rng, "stated", rel, 96)
      k = demo.decode_kscene(stated)
      assert k.sign is None and k.uniform is None and k.badge.key == F.emblem[F.employer[p]]


def _draws(gen, n, seed, decode=False):
  """n renders of "P was seen with O" (O = P's employer): [(uniform colour, sign, truth,
  faithful)], read from the drawn scene (`decode`: from the image, slower)."""
  out = []
  for k in range(n):
    rng = seeded(seed, "draw", k)
    p = F.people[k % len(F.people)]
    text = _seen(p, F.employer[p])
    if decode:
      image, ok = gen.render(text, rng)
      dec = demo.decode_kscene(image)
      uniform = dec.uniform.colour if dec and dec.uniform else None
      sign = dec.sign.key if dec and dec.sign else None
    else:
      scene, ok = gen.kscene_from_text(text, rng)
      uniform, sign = scene.uniform, scene.sign
    out.append((uniform, sign, F.emblem[F.employer[p]], ok))
  return out


def test_knowledge_is_deterministic_per_seed():
  gen = demo.DemoGenerators(noise=0.3, knowledge_error=0.2, mention_rate=0.7)
  a, b = _draws(gen, 40, seed=3, decode=True), _draws(gen, 40, seed=3, decode=True)
  assert a == b
  assert a != _draws(gen, 40, seed=4, decode=True)
  assert sum(ok for *_, ok in a) >= 10      # some faithful renders, decoded as drawn
  image = gen.render(_seen(F.people[0], F.orgs[0]), seeded(1, "x"))[0]
  caps = [gen.caption(image, seeded(1, "c", k)) for k in range(20)]
  assert caps == [gen.caption(image, seeded(1, "c", k)) for k in range(20)]


@pytest.mark.parametrize("error", [0.0, 0.2, 0.5])
def test_knowledge_error_rate_matches_config(error):
  """Each look-up errs independently. "P was seen with O", O = P's employer: the sign needs
  O's emblem (one look-up), the uniform needs P's employer (another; a wrong one gives a
  badge instead); `faithful` is exactly "every look-up right"."""
  n = 1200
  draws = _draws(demo.DemoGenerators(noise=0.0, knowledge_error=error), n, seed=0)
  sign_right = np.asarray([s == t for _, s, t, _ in draws])
  uniform = np.asarray([u is not None for u, _, _, _ in draws])
  tol = 3 * np.sqrt(error * (1 - error) / n) + 1e-9
  assert abs((1 - sign_right.mean()) - error) <= tol
  assert abs((1 - uniform.mean()) - error) <= tol
  faithful = np.asarray([ok for *_, ok in draws])
  np.testing.assert_array_equal(faithful, sign_right & uniform)


def test_noise_and_mention_rates_match_config():
  n = 600
  gen = demo.DemoGenerators(noise=0.3, knowledge_error=0.0, mention_rate=0.6)
  p = F.people[5]
  image = demo.draw_kscene(demo.KScene(badge=F.emblem[F.employer[p]]), 96)
  caps = [gen.caption(image, seeded(0, "cap", k)) for k in range(n)]
  faithful = np.asarray([ok for _, ok in caps])
  assert abs((1 - faithful.mean()) - 0.3) <= 3 * np.sqrt(0.21 / n)
  named = np.mean([f"the badge of {F.employer[p]}" in c for c, ok in caps if ok])
  assert abs(named - 0.6) <= 3 * np.sqrt(0.24 / faithful.sum())
  # Wrong knowledge in a caption: a different organisation's name, flagged unfaithful.
  wrong = demo.DemoGenerators(noise=0.0, knowledge_error=1.0, mention_rate=1.0)
  cap, ok = wrong.caption(image, seeded(0, "w"))
  assert not ok and "the badge of" in cap and F.employer[p] not in cap


def test_caption_then_render_keeps_the_knowledge():
  """Chained generation: an organisation named in a caption is drawn as its emblem."""
  gen = demo.DemoGenerators(noise=0.0, knowledge_error=0.0, mention_rate=1.0)
  for k in range(10):
    p = F.people[k]
    o = F.orgs[k] if F.orgs[k] != F.employer[p] else F.orgs[k + 1]
    image, ok = gen.render(_seen(p, o), seeded(0, "r", k))
    cap, ok2 = gen.caption(image, seeded(0, "c", k))
    assert ok and ok2 and f"the badge of {F.employer[p]} under the sign of {o}" in cap
    again, ok3 = gen.render(cap, seeded(0, "r2", k))
    dec = demo.decode_kscene(again)
    assert ok3 and dec.badge.key == F.emblem[F.employer[p]] and dec.sign.key == F.emblem[o]
    # At the employer: a uniform in its colour, kept through caption -> image.
    image, _ = gen.render(_seen(p, F.employer[p]), seeded(0, "u", k))
    cap, _ = gen.caption(image, seeded(0, "cu", k))
    colour = F.emblem[F.employer[p]][0]
    assert f"a person in a {colour} uniform under the sign of {F.employer[p]}" in cap
    assert demo.decode_kscene(gen.render(cap, seeded(0, "u2", k))[0]).uniform.colour == colour


def test_label_consistency_of_real_and_generated_views():
  """demo.label_consistent (the bench's measure of what the paper's teacher selects for):
  every real photo and every faithful image or caption shows its label's cue; wrong
  knowledge makes some unfaithful views inconsistent and leaves others consistent (a wrong
  employer's badge still says `none`); a picture without a person shows no cue."""
  rng = np.random.default_rng(1)
  gen = demo.DemoGenerators(noise=0.3, knowledge_error=0.3, mention_rate=0.5)
  seen = {}   # (family, faithful) -> [consistent]
  for k in range(160):
    kind, rel = ("seen", "stated")[k % 2], ("none", "works_for")[(k // 2) % 2]
    tokens, _, (o, _), image = demo._kn_example(rng, kind, rel, 96)
    row = {"family": f"kn_{kind}", "relation": rel, "tail": {"name": o}}
    assert demo.label_consistent(row, image)
    view, ok = gen.render(" ".join(tokens), seeded(2, "r", k))
    cap, ok_cap = gen.caption(image, seeded(2, "c", k))
    seen.setdefault((kind, ok), []).append(demo.label_consistent(row, view))
    seen.setdefault((kind, ok_cap), []).append(demo.label_consistent(row, cap))
  for kind in ("seen", "stated"):
    assert all(seen[kind, True]) and len(seen[kind, True]) > 30
    assert 0 < sum(seen[kind, False]) < len(seen[kind, False])
  o, other = F.orgs[0], F.orgs[1]
  cases = [("kn_seen", "works_for", "a person in a red uniform under the sign of " + o, True),
           ("kn_seen", "works_for", "a person wearing a red circle badge", False),
           ("kn_seen", "none", "a person wearing the badge of " + other, True),
           ("kn_seen", "none", "a picture of a small red circle", False),
           ("kn_stated", "works_for", "a person wearing the badge of " + o, True),
           ("kn_stated", "works_for", "a person wearing the badge of " + other, False),
           ("kn_stated", "none", "a person wearing the badge of " + other, True),
           ("kn_stated", "none", "a person wearing a {} {} badge".format(*F.emblem[o]), False)]
  for family, rel, caption, expect in cases:
    row = {"family": family, "relation": rel, "tail": {"name": o}}
    assert demo.label_consistent(row, caption) is expect, (family, rel, caption)
  assert demo.label_consistent({"family": "oo", "relation": "left_of"}, "anything") is None


def test_shape_world_texts_are_rendered_as_before():
  gen = demo.DemoGenerators(noise=0.0, knowledge_error=0.5)
  image, ok = gen.render("a small red circle to the left of a large blue square", seeded(0, "s"))
  assert ok and demo.decode_kscene(image) is None
  assert {s.key for s in demo.decode(image)} >= {("red", "circle"), ("blue", "square")}


def _seen_batch(enc, rows, with_image):
  """TextStudent batch: real text + the real image as the one view slot (masked if not
  `with_image`)."""
  from mi2rage_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  b = data_lib.stack([enc.encode_real_text(inst) for inst, _ in rows])
  b["view_pixels"] = np.stack([data_lib.pixels(img, 32) for _, img in rows])[:, None]
  b["view_mask"] = np.full((len(rows), 1), with_image)
  b["label"] = np.asarray([inst.label for inst, _ in rows], np.int32)
  return b


def _seen_rows(n, seed):
  from mi2rage_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from remote_jax.data.records import Entity  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  rows = []
  for k in range(n):
    rel = ("none", "works_for")[k % 2]
    tokens, (p, ps), (o, os_), image = demo._kn_example(rng, "seen", rel, 96)
    inst = data_lib.Instance(f"x/{k}", "x", tuple(tokens), Entity(p, tuple(ps), False),
                             Entity(o, tuple(os_), False), None, int(rel == "works_for"))
    rows.append((inst, image))
  return rows


@pytest.mark.parametrize("with_image", [True, False])
def test_student_learns_the_hidden_fact_from_real_images(tmp_path, with_image):
  """'P was seen with O': the text student learns works_for vs none from the real image
  (badge == sign), and cannot without it (held-out people: the text alone is chance)."""
  from mi2rage_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from mi2rage_jax import models  # pylint: disable=import-outside-toplevel
  from remote_jax import engine  # pylint: disable=import-outside-toplevel
  from tests.conftest import mi2rage_model_cfg as model_cfg  # pylint: disable=import-outside-toplevel
  from tests.conftest import one_device
  enc = data_lib.Encoder("", 24)
  cfg = model_cfg(vocab=enc.vocab_size)
  cfg.vision.image_size = 32
  model = models.build_student("no_real_image", cfg, 2)
  train, test = _seen_rows(128, 0), _seen_rows(96, 1)
  train_b = _seen_batch(enc, train, with_image)

  s = one_device(model, train_b, 50, dict(lr=3e-3, warmup_ratio=0.1))
  params = engine.fit(s, lambda rng: rng.choice(len(train), 32),
                      lambda idx: {k: v[idx] for k, v in train_b.items()}, 50, 0,
                      tmp_path / "ckpt")
  test_b = _seen_batch(enc, test, with_image)
  logits = engine.predict(s, params, len(test), 32,
                          lambda idx: {k: v[idx] for k, v in test_b.items()})
  acc = float((logits.argmax(-1) == test_b["label"]).mean())
  print(f"with_image={with_image} acc={acc:.3f}")
  if with_image:
    assert acc >= 0.85, acc
  else:
    assert acc <= 0.65, acc


def test_teacher_selection_raises_the_faithful_fraction(tmp_path):
  """A text teacher trained on noisy captions of "seen with" photos keeps, per instance, more
  faithful captions (the generators' ground truth) than a random selection does."""
  from mi2rage_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from mi2rage_jax import models, selection  # pylint: disable=import-outside-toplevel
  from remote_jax import engine  # pylint: disable=import-outside-toplevel
  from tests.conftest import mi2rage_model_cfg as model_cfg  # pylint: disable=import-outside-toplevel
  from tests.conftest import one_device
  enc = data_lib.Encoder("", 32)
  gen = demo.DemoGenerators(noise=0.4, knowledge_error=0.2, mention_rate=0.7)
  rows, views = _seen_rows(64, 2), []
  for k, (inst, image) in enumerate(rows):
    views += [(inst, *gen.caption(image, seeded(0, "t", k, j))) for j in range(5)]
  b = data_lib.stack([enc.encode_caption(cap, inst) for inst, cap, _ in views])
  b["label"] = np.asarray([inst.label for inst, _, _ in views], np.int32)
  model = models.build_teacher("text", model_cfg(vocab=enc.vocab_size), 2)

  s = one_device(model, b, 120, dict(lr=2e-3, warmup_ratio=0.1))
  params = engine.fit(s, lambda rng: rng.choice(len(views), 32),
                      lambda idx: {k: v[idx] for k, v in b.items()}, 120, 0, tmp_path / "ckpt")
  logits = engine.predict(s, params, len(views), 64,
                          lambda idx: {k: v[idx] for k, v in b.items()})
  loss = selection.loss_score(logits, b["label"]).reshape(len(rows), 5)
  ok = np.asarray([f for _, _, f in views]).reshape(len(rows), 5)
  kept = selection.select_fraction(dict(enumerate(loss)), 0.6)
  rand = selection.select_fraction(
      {i: seeded(0, "rand", i).random(5) for i in range(len(rows))}, 0.6)
  teacher = np.mean([ok[i, kept[i]].mean() for i in kept])
  random = np.mean([ok[i, rand[i]].mean() for i in rand])
  assert 0.4 <= ok.mean() <= 0.7                  # noise 0.4 plus wrong knowledge
  print(f"faithful: all {ok.mean():.3f} teacher {teacher:.3f} random {random:.3f}")
  assert teacher >= random + 0.08, (teacher, random, ok.mean())


def test_knowledge_world_is_written_and_read(tmp_path):
  """The default config's data: every recipe family in its share; a shape the sentence or
  the label names is drawn where its box says, in its colour; in_front_of is an occlusion
  the RGB image shows (the nearer shape drawn over the farther)."""
  import collections  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel

  import ml_collections  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  n = 2 * len(demo.KN_RECIPES)
  cfg = ml_collections.ConfigDict(dict(
      root="", cache_dir=str(tmp_path), train_split="train", test_split="test",
      demo=dict(seed=0, n_train=n, n_val=2, n_test=len(demo.KN_RECIPES), image_size=96)))
  ds = demo.read_world(cfg)
  assert [len(ds.splits[s]) for s in ("train", "test")] == [n, len(demo.KN_RECIPES)]
  directory = demo.ensure_world(tmp_path / "demo", {k: dict(cfg.demo)[k]
                                                    for k in demo.WORLD_KEYS})
  rows = [json.loads(x) for x in (directory / "train.jsonl").read_text().splitlines()]
  want = collections.Counter(("kn_" + r[1] if r[0] == "kn" else r[0],
                              r[2] if r[0] == "kn" else r[1]) for r in demo.KN_RECIPES)
  assert collections.Counter((r["family"], r["relation"]) for r in rows) == \
      {k: 2 * v for k, v in want.items()}
  # The test metrics' buckets are the families, row by row (pipeline.Run.evaluate).
  assert ds.buckets["train"] == {f: [i for i, r in enumerate(rows) if r["family"] == f]
                                 for f in ("kn_seen", "kn_stated", "oo", "eo")}
  assert sum(map(len, ds.buckets["test"].values())) == len(ds.splits["test"])
  for r, inst in zip(rows, ds.splits["train"]):
    assert ds.relations[inst.label] == r["relation"]
    if r["family"] not in ("oo", "eo"):
      continue
    image = np.asarray(Image.open(directory / r["image"]).convert("RGB"), np.int32)
    objects = [e for e in (r["head"], r["tail"]) if e["is_object"]]
    for e in objects:   # the centre pixel of its box has its colour, unless occluded
      size, colour, shape = e["name"].split()
      cx, cy = ((e["pos"][0] + e["pos"][2]) / 2, (e["pos"][1] + e["pos"][3]) / 2)
      pixel = image[int(cy * 96), int(cx * 96)]
      near = r["relation"] == "in_front_of" and e is r["tail"]
      assert near or np.abs(pixel - demo.COLOURS[colour]).max() <= 2, (r, pixel)
      if r["family"] == "eo" and r["relation"] != "none":
        assert f"{colour} {shape}" in " ".join(r["tokens"])
    if r["relation"] == "in_front_of":
      a, b = (e["pos"] for e in objects)
      inter = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
      assert inter[0] < inter[2] and inter[1] < inter[3], r     # the boxes overlap
