r"""Synthetic pretrained towers (issue 35): a CLIP vision tower pretrained here, on generated
object crops, so that its top layers lose an attribute the relations will need.

  python -m remote_jax.towers --config ot_world.py      # pretrains once (cached), probes
  python -m bench.attribute_probe --config ot_world.py  # the probe, other sizes or seeds

`colour_blind` (TASKS): crops of one demo-world shape (synth's shapes, colours and sizes,
drawn on an image of the world's size with the world's sensor noise, and cut by the data
pipeline's `crop_rgb`), every geometry drawn in each colour over one noise field. The tower
(`config.model.vision`'s width, depth, crop and patch size; no CLS token, RGB only) names the
shape from the mean of its top-level tokens, and the loss adds `invariance` x the squared
distance between the tokens of one geometry in two colours over the top `invariant_levels`
levels (tower_loss). The patch
projection stays at its random init (the recipe's frozen_patterns), so the colour is fully
there at level 0 and the layers are what fade it; the noise is the floor under which the
faded trace is lost to a linear probe (docs/ot_world.md).

`model.vision.pretrained_dir = "synth:colour_blind"` trains it once per recipe
(`model.vision.synth`: seed, steps, batch_size, invariance, invariant_levels, n_crops,
world_size, pixel_noise, optim;
defaults in configs/common.py synth_tower()) and tower shape, under `<data.cache_dir>/towers/`, as a
CLIPVisionModel directory (convert.save_clip_vision) that `pretrained.load_pretrained`
reads as any pretrained encoder. `probe.json` there holds `probe_levels`: per level, how
well a linear probe reads the colour and the shape from an object's tokens.
"""
import dataclasses
import json
import logging
import pathlib
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from remote_jax import engine, errors, sharding, writers
from remote_jax.data import preprocess, synth
from remote_jax.data.pipeline import clip_normalise
from remote_jax.models import convert
from remote_jax.models.encoders.clip_vit import CLIPVisionConfig, CLIPVisionTower

log = logging.getLogger(__name__)

SCHEME = "synth:"
COLOURS = tuple(synth.COLOURS)
# What each task's tower must lose (the probed attribute) and keep (its training target).
TASKS = {"colour_blind": dict(lose="colour", keep="shape")}
# Part of the cache key: bump when the crops or the objective change.
VERSION = 4
PROBE = dict(seed=10_000, n_train=2000, n_test=1000)
LAMBDAS = tuple(float(x) for x in np.logspace(-8, 1, 10))   # ridge penalties, times the rows
RECIPE_KEYS = ("seed", "steps", "batch_size", "n_crops", "invariance", "invariant_levels",
               "world_size", "pixel_noise", "optim")


def render_crops(rng, n, colours_per, crop_size, image_size, pixel_noise=0.0):
  """`n` geometries (shape, size, centre), each drawn in `colours_per(i)` (colour ids) on a
  world-sized image with the world's sensor noise (synth.add_noise; one noise field per
  geometry, shared by its colourings, so that a pair differs in colour only) and cut as the
  pipeline cuts an object: uint8 (n, k, S, S, 3), shape ids (n,), colour ids (n, k)."""
  shapes = rng.integers(len(synth.SHAPES), size=n)
  colours = np.stack([np.asarray(colours_per(i)) for i in range(n)])
  out = np.zeros((n, colours.shape[1], crop_size, crop_size, 3), np.uint8)
  for i in range(n):
    side = synth.SIZES[str(rng.choice(list(synth.SIZES)))]
    cx, cy = rng.uniform(side / 2 + 0.02, 1 - side / 2 - 0.02, 2)
    box = synth.square_box(cx, cy, side)
    noise = synth.noise_field(rng, image_size, pixel_noise)
    for j, c in enumerate(colours[i]):
      image = Image.new("RGB", (image_size, image_size), synth.BACKGROUND)
      synth.draw_shape(ImageDraw.Draw(image), synth.SHAPES[shapes[i]], box, image_size,
                       synth.COLOURS[COLOURS[c]])
      out[i, j] = preprocess.crop_rgb(synth.add_noise(image, noise), box, crop_size)
  return out, shapes, colours


def tower_config(vision):
  """The pretrained tower's shape: config.model.vision's, without CLS or depth."""
  return CLIPVisionConfig.from_config(vision, use_cls=False, use_depth=False)


class ShapeNamer(nn.Module):
  """The tower, and a linear shape classifier on the mean of its LayerNorm'd top tokens;
  returns (logits, every level's tokens)."""
  config: CLIPVisionConfig

  @nn.compact
  def __call__(self, batch, deterministic=True):
    states, _ = CLIPVisionTower(self.config, name="vision")(batch["pixels"])
    top = states[-1]
    pooled = nn.LayerNorm(use_scale=False, use_bias=False, name="head_norm")(top).mean(1)
    return nn.Dense(len(synth.SHAPES), name="shape_head")(pooled), states


def tower_loss(invariance, levels=1):
  """The engine's loss_fn: rows are pairs (the first half of the batch in one colour, the
  second half the same geometries, with the same noise, in another); shape cross-entropy on both, plus
  `invariance` x the pair's squared token distance relative to the tokens' mean square,
  averaged over the top `levels` levels (`colour_gap` logs the top level's).
  The scale is not differentiated, so the gradient also pushes every token to shrink
  (`top_rms` logs it; the top level of the default recipe ends at about a fifteenth of
  level 0's size). The raw tokens, not LayerNorm'd ones: LN removes each token's mean and
  scale, where the colour can stay."""
  def loss_fn(model, params, batch, rng, train):
    logits, states = model.apply({"params": params}, batch)
    ce, metrics = engine.classification(logits, batch)

    def gap(tokens):
      a, b = jnp.split(tokens, 2)
      scale = jax.lax.stop_gradient((a ** 2 + b ** 2).mean() / 2)
      return ((a - b) ** 2).mean() / scale, scale

    gaps = [gap(x) for x in states[-levels:]]   # the top level last
    top_gap, scale = gaps[-1]
    objective = ce + invariance * sum(g for g, _ in gaps) / len(gaps)
    return objective, {**metrics, "objective": objective, "colour_gap": top_gap,
                       "top_rms": jnp.sqrt(scale)}
  return loss_fn


def pair_rows(rng, n_geometries, k, half):
  """Rows of the (geometry, colour) crops flattened geometry-major: `half` geometries in a
  first colour, then the same geometries in another colour each."""
  idx = rng.integers(n_geometries, size=half)
  c1 = rng.integers(k, size=half)
  c2 = (c1 + rng.integers(1, k, size=half)) % k
  return np.concatenate([idx * k + c1, idx * k + c2])


def pretrain(vision, recipe, out_dir):
  """Trains the tower of `vision` by `recipe` (model.vision.synth); writes it to `out_dir`
  (CLIPVisionModel files, probe.json) and returns the probe."""
  cfg = tower_config(vision)
  rng = np.random.default_rng(recipe["seed"])
  k = len(COLOURS)
  crops, shapes, _ = render_crops(rng, recipe["n_crops"], lambda i: np.arange(k),
                                  cfg.image_size, recipe["world_size"], recipe["pixel_noise"])
  crops = clip_normalise(crops)
  half = recipe["batch_size"] // 2
  draw = lambda r: pair_rows(r, len(shapes), k, half)

  def make(rows):
    rows = np.asarray(rows)
    flat = crops.reshape((-1,) + crops.shape[2:])
    return {"pixels": flat[rows], "label": shapes[rows // k].astype(np.int32)}

  model = ShapeNamer(cfg)
  mesh = sharding.make_mesh([("data", -1)])   # data parallel over every device
  s = engine.build(model, make(draw(np.random.default_rng(0))), dict(recipe["optim"]),
                   recipe["steps"], mesh, seed=recipe["seed"],
                   loss_fn=tower_loss(recipe["invariance"], recipe["invariant_levels"]))
  ckpt = pathlib.Path(out_dir) / "ckpt"
  writer = writers.MetricWriter(pathlib.Path(out_dir) / "train")
  try:
    params = jax.device_get(engine.fit(s, draw, make, recipe["steps"], recipe["seed"], ckpt,
                                       writer=writer, name="tower",
                                       log_every=min(250, max(1, recipe["steps"] // 4))))
  finally:
    writer.close()
  shutil.rmtree(ckpt)   # the written weights are the tower; a new write starts afresh
  convert.save_clip_vision(out_dir, cfg, params["vision"])
  probe = probe_levels(params["vision"], cfg, recipe["world_size"], recipe["pixel_noise"])
  (pathlib.Path(out_dir) / "probe.json").write_text(json.dumps(probe, indent=1))
  return probe


def level_tokens(params, cfg, pixels, batch_size=500):
  """Each level's tokens of normalised crops, flattened per crop: [(N, T*D)] * (L + 1)."""
  tower = CLIPVisionTower(cfg)
  fn = jax.jit(lambda x: tower.apply({"params": params}, x)[0])
  outs = [jax.device_get(fn(pixels[i:i + batch_size])) for i in range(0, len(pixels), batch_size)]
  return [np.concatenate([o[l] for o in outs]).reshape(len(pixels), -1)
          for l in range(len(outs[0]))]


def ridge_accuracy(x_train, y_train, x_test, y_test, classes, lambdas=LAMBDAS):
  """(test accuracy, penalty) of a ridge classifier on one-hot targets over standardised
  features, its penalty (times the rows) picked on the last fifth of the training rows,
  then refit on all of them. The grid reaches 1e-8: a consistent code far smaller than the
  features' spread is still a code a trained layer can amplify, and the probe must find it."""
  mu, sd = x_train.mean(0), x_train.std(0) + 1e-12
  z = lambda x: np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], 1)

  def fit(x, y, lam):
    a = z(x)
    penalty = lam * len(a) * np.eye(a.shape[1])
    penalty[-1, -1] = 0.0   # the intercept is not penalised
    return np.linalg.solve(a.T @ a + penalty, a.T @ np.eye(classes)[y])

  cut = len(x_train) * 4 // 5
  best = max(lambdas, key=lambda lam: np.mean(
      (z(x_train[cut:]) @ fit(x_train[:cut], y_train[:cut], lam)).argmax(1) == y_train[cut:]))
  return float(np.mean((z(x_test) @ fit(x_train, y_train, best)).argmax(1) == y_test)), best


def probe_levels(params, cfg, image_size, pixel_noise, *, seed=PROBE["seed"],
                 n_train=PROBE["n_train"], n_test=PROBE["n_test"]):
  """Per level of the tower `params`: linear-probe test accuracy of each crop's colour
  (chance 1/5) and shape (chance 1/3) from its tokens, on fresh crops in one random colour,
  with the penalty ridge_accuracy picked (`colour_lambda`, `shape_lambda`)."""
  rng = np.random.default_rng(seed)
  n = n_train + n_test
  crops, shapes, colours = render_crops(rng, n, lambda i: [rng.integers(len(COLOURS))],
                                        cfg.image_size, image_size, pixel_noise)
  pixels, colours = clip_normalise(crops[:, 0]), colours[:, 0]
  levels = level_tokens(params, cfg, pixels)
  out = []
  for level, x in enumerate(levels):
    row = {"level": level}
    for name, y, classes in (("colour", colours, len(COLOURS)),
                             ("shape", shapes, len(synth.SHAPES))):
      row[name], row[f"{name}_lambda"] = ridge_accuracy(
          x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes)
    out.append(row)
  return {"chance": {"colour": 1 / len(COLOURS), "shape": 1 / len(synth.SHAPES)},
          "n_train": n_train, "n_test": n_test, "levels": out}


def check_recipe(spec, vision):
  """model.vision.synth as a plain dict, or a one-line error naming what is missing."""
  recipe = writers.jsonable(vision["synth"]) if "synth" in vision else None
  where = f"model.vision.pretrained_dir={spec!r} needs model.vision.synth"
  if not isinstance(recipe, dict):
    raise ValueError(f"{where}, the tower's recipe (configs/common.py synth_tower())")
  missing = [k for k in RECIPE_KEYS if k not in recipe]
  unknown = sorted(set(recipe) - set(RECIPE_KEYS))
  if missing or unknown:
    raise ValueError(f"{where} with {list(RECIPE_KEYS)}: missing {missing}, unknown {unknown}")
  if not 1 <= recipe["invariant_levels"] <= vision["num_layers"]:
    raise ValueError(f"model.vision.synth.invariant_levels={recipe['invariant_levels']}: the "
                     f"invariance covers the top 1..{vision['num_layers']} levels (num_layers)")
  if recipe["batch_size"] % 2:
    raise ValueError(f"model.vision.synth.batch_size={recipe['batch_size']}: even (pairs)")
  return recipe


def ensure_tower(spec, vision, cache_dir):
  """`spec` "synth:NAME" -> the directory of that tower, trained once by the recipe
  `vision["synth"]` (see the module docstring)."""
  name = str(spec).removeprefix(SCHEME)
  if not str(spec).startswith(SCHEME) or name not in TASKS:
    raise ValueError(f"model.vision.pretrained_dir={spec!r}: not a synthetic tower; known: "
                     + ", ".join(SCHEME + t for t in TASKS))
  if not cache_dir:
    raise ValueError(f"model.vision.pretrained_dir={spec!r} needs data.cache_dir (where the "
                     "tower is written once)")
  recipe = check_recipe(spec, vision)
  # Everything that changes the weights: the recipe, the whole tower shape, the world's
  # drawing (its generator version) and this module's objective (VERSION).
  params = {"task": name, "recipe": recipe,
            "tower": writers.jsonable(dataclasses.asdict(tower_config(vision)))}

  def write(out_dir, **_):
    if jax.process_count() > 1:
      raise ValueError(f"{spec}: pretrain the tower once in one process (python -m "
                       "remote_jax.towers --config ...) before a multi-process run")
    log.info("pretraining the synthetic tower %s (%d steps) into %s", spec, recipe["steps"],
             out_dir)
    probe = pretrain(vision, recipe, out_dir)
    log.info("tower probe (linear, test accuracy per level): %s", format_probe(probe))

  return synth.ensure_written(pathlib.Path(cache_dir) / "towers", name, params, write,
                              version=VERSION, generator=synth.GENERATOR_VERSION)


def format_probe(probe):
  return "; ".join(f"L{r['level']} colour {100 * r['colour']:.1f} shape {100 * r['shape']:.1f}"
                   for r in probe["levels"])


def main(argv):
  del argv
  writers.setup_cli_logging()
  config = _CONFIG.value
  with errors.user_errors():
    path = ensure_tower(config.model.vision.pretrained_dir, config.model.vision,
                        config.data.cache_dir)
  print(json.dumps({"tower": str(path), **json.loads((path / "probe.json").read_text())}))


if __name__ == "__main__":
  from remote_jax import cli
  _CONFIG = cli.define_config_flag()
  cli.run(main)
