r"""What does the head see of an object's colour and shape, level by level? A linear probe on
the fused features of trained runs (issue 35; a diagnostic, not a test).

  python -m bench.fused_probe runs/ot_world_study/n1000_moe_off/runs/*/seed_0 [--examples 600]
  python -m bench.fused_probe RUN --layouts full,no_box,no_depth_summary,no_depth,rgb_only

For each run (a remote_jax.train workdir on the attribute world; its config.json and newest
checkpoint), every valid object of the train and test splits is read as the mean of its
tokens at each vision level. Each level is taken after its fusion, so a `mot=none` run gives
the unfused levels of the same towers. The object feature the head reads (`object_features`,
after the MMoE) is read as well. A ridge classifier (remote_jax.towers.ridge_accuracy, the
tower probe's) is fitted from each to the object's colour and to its shape (the world's
ground truth, world.json) on train, and scored on test. On the tag world
(`colour_source="tag"`) the objects read are the large shapes, and their "colour" is their
cue's, the same-shaped tag's (attribute_world.read_cue): does the cue reach the read object?

Where a run's image-wide vision fusion (`model.mot.vision_scope="image"`) has a plan
(ot_paper and the variants built on it), the plan's mass is read too (`plan_mass`, per fused
level): the share of a read object's transported mass, at every source level together, that
comes from its own tokens (`own`), from its cue object's (`cue`: the tag, on the tag world;
0 where the cue is the object itself) and from each other object on average (`each_other`);
`uniform_share` is what a uniform plan gives each object. A per-object scope moves no mass
between objects, so there is nothing to read. The run's newest checkpoint is read
(a study run keeps its last two evaluations), not necessarily its best-dev step. One JSON
line per run and layout: per attribute, the accuracy per level (`*_per_level`; of the mean of
its RGB tokens alone, without the depth tokens, in `*_per_level_rgb_tokens`) and at the head
(chance 0.2 for the colour, 1/3 for the shape).

`--layouts` reads the same run with parts of the object-token layout switched off (LAYOUTS:
the box offsets, the depth summary, the depth tokens), which the pretrained tower never saw in
its pretraining: where does its top regain what it was trained to lose? The run's own
parameters are used; those of a part switched off go unread.
"""
import argparse
import copy
import json
import pathlib

import numpy as np


def load_run(workdir):
  """(config, Setup, state) of a run directory: its saved config, its newest checkpoint."""
  import ml_collections

  from remote_jax import config as config_lib
  from remote_jax import task
  saved = pathlib.Path(workdir) / "config.json"
  if not saved.is_file():
    raise ValueError(f"{workdir}: no config.json; give a remote_jax.train run directory")
  config = ml_collections.ConfigDict(json.loads(saved.read_text()))
  world = config.data.get("attribute_world")
  if world is not None and "colour_source" not in world:
    world.colour_source = "own"   # a run from before the tag world: the same world
  config = config_lib.resolve(config)
  s, state, step = task.restore(config, str(workdir))
  return config, s, state, int(step)


# Parts of the model's object-token layout that a synthetic tower's pretraining never saw.
LAYOUTS = {
    "full": {},
    "no_box": {"use_pos": False},
    "no_depth_summary": {"depth_summary": "off"},
    "no_depth": {"vision.use_depth": False, "depth_summary": "off"},
    "rgb_only": {"use_pos": False, "vision.use_depth": False, "depth_summary": "off"},
}


def parse_layouts(text):
  """["full", ...] of a comma-separated `--layouts` value; ValueError names the choices."""
  layouts = [x.strip() for x in text.split(",") if x.strip()]
  unknown = [x for x in layouts if x not in LAYOUTS]
  if unknown or not layouts:
    raise ValueError(f"layouts {unknown or text!r}: choose from {', '.join(LAYOUTS)}")
  return layouts


def with_layout(model_config, layout):
  """A copy of config.model with LAYOUTS[layout]'s parts switched off. The released code's
  co-encoder (semantics=reference) ties more than the box to use_pos (remote.py,
  pool_objects), so only `full` is read there."""
  from remote_jax import config as config_lib
  if layout not in LAYOUTS:   # one name here, where parse_layouts takes a list
    raise ValueError(f"layout {layout!r}: choose from {', '.join(LAYOUTS)}")
  if layout != "full" and model_config.co_encoder:
    raise ValueError(f"layout {layout!r}: a co-encoder run (semantics=reference) is read "
                     "in the full layout only")
  cfg = copy.deepcopy(model_config)
  for path, value in LAYOUTS[layout].items():
    config_lib.set_field(cfg, path, value)
  return cfg


def forward_fn(model):
  """jit'd (params, batch) -> (every vision level's tokens, the head's object features,
  {fused level: the vision fusion's (B, n, m) plan} where it has one)."""
  import jax

  @jax.jit
  def forward(p, batch):
    _, state = model.apply({"params": p}, batch, mutable=["intermediates"])
    inter = state["intermediates"]
    plans = {int(name.removeprefix("mot_vision_")): v["plan"][0] for name, v in inter.items()
             if name.startswith("mot_vision_") and "plan" in v}
    return inter["vision_levels"][0], inter["object_features"][0], plans
  return forward


def object_mass(plan, k):
  """(B, K, K) share of each query object's plan mass that comes from each object's tokens, at
  every source level together; `plan` (B, n, m) has K objects of n // K tokens each in the
  query, and whole levels of the query's layout in the source (m % n == 0): an image-wide
  plan."""
  b, n, m = plan.shape
  if n % k or m % n:
    raise ValueError(f"a plan of {n} x {m} tokens is not image-wide over {k} objects "
                     "(model.mot.vision_scope='image')")
  t = n // k
  per = np.asarray(plan, np.float64).reshape(b, k, t, m // n, k, t).sum((2, 3, 5))
  return per / np.maximum(per.sum(-1, keepdims=True), 1e-30)


def read_shares(share, slots, cue_slots, n_valid):
  """(N, 3): of each read object's mass (`share`, its (N, K) rows of object_mass), the share
  from its own tokens, from its cue object's (0 where the cue is itself) and from each other
  of the image's `n_valid` objects on average."""
  rows = np.arange(len(slots))
  own = share[rows, slots]
  apart = cue_slots != slots
  cue = np.where(apart, share[rows, cue_slots], 0.0)
  each = (1.0 - own - cue) / np.maximum(n_valid - 1 - apart, 1)
  return np.stack([own, cue, each], -1)


def object_features(s, forward, reader, params, split, limit, rgb):
  """({"all": per level (N, D) means of each object's tokens, "rgb": the same of its RGB
  tokens alone, at slice `rgb` of an object's tokens}, head's object features (N, D), labels
  {"colour": (N,), "shape": (N,)}, {fused level: (N, 3) read_shares of an image-wide plan})
  for the read objects (attribute_world.read_cue) of the first
  `limit` examples of `split`, read through `forward` (forward_fn). Raises ValueError when the
  batch's boxes do not match the world's, slot by slot (the labels would be wrong)."""
  import jax

  from remote_jax import task
  from remote_jax.data import attribute_world, pipeline, synth

  world = json.loads((reader.root / "world.json").read_text())["images"]
  boxes = json.loads(reader.path("boxes").read_text())
  img_ids = [json.loads(line)["img_id"] for line in
             reader.path(task.SPLITS[split]).read_text().splitlines()]
  ids = {"colour": {c: i for i, c in enumerate(synth.COLOURS)},
         "shape": {c: i for i, c in enumerate(synth.SHAPES)}}
  ds = pipeline.build_dataset(s.config.data, task.SPLITS[split],
                              batch_size=s.config.eval_batch_size, shuffle=False, seed=0,
                              drop_remainder=False)
  source = s.config.data.attribute_world.colour_source
  image_wide = s.config.model.mot.vision_scope == "image"
  levels, head, labels, n = {"all": [], "rgb": []}, [], {"colour": [], "shape": []}, 0
  mass = {}
  for batch in ds:
    lv, obj, plans = jax.device_get(forward(params, task.model_batch(batch)))
    k = obj.shape[1]
    keep = np.asarray(batch["obj_mask"]) & np.asarray(batch["mask"])[:, None]
    cue_slot = np.zeros(keep.shape, int)
    for row, slot in zip(*np.nonzero(keep)):
      img = img_ids[int(batch["index"][row])]
      want = boxes[img][f"[OBJ{slot}]"]
      if not np.allclose(np.asarray(batch["obj_boxes"])[row, slot, :4], want, atol=1e-3):
        raise ValueError(f"{img} slot {slot}: the batch's box is not the world's {want}")
      read = attribute_world.read_cue(world[img], slot, source)
      if read is None:   # an object no triplet reads (a tag)
        keep[row, slot] = False
        continue
      cue_slot[row, slot] = read[0]
      labels["colour"].append(ids["colour"][read[1]])
      labels["shape"].append(ids["shape"][read[2]])
    per_object = [x.reshape(x.shape[0], k, -1, x.shape[-1]) for x in lv]
    levels["all"].append([x.mean(2)[keep] for x in per_object])
    levels["rgb"].append([x[:, :, rgb].mean(2)[keep] for x in per_object])
    head.append(obj[keep])
    rows, slots = np.nonzero(keep)
    n_valid = np.asarray(batch["obj_mask"]).sum(1)[rows]
    for level, plan in (plans.items() if image_wide else ()):
      mass.setdefault(level, []).append(read_shares(
          object_mass(plan, k)[rows, slots], slots, cue_slot[rows, slots], n_valid))
    n += int(np.asarray(batch["mask"]).sum())
    if n >= limit:
      break
  levels = {name: [np.concatenate(x) for x in zip(*batches)] for name, batches in levels.items()}
  return (levels, np.concatenate(head), {k: np.asarray(v) for k, v in labels.items()},
          {level: np.concatenate(x) for level, x in sorted(mass.items())})


def probe_run(workdir, examples, layouts=("full",)):
  """One result dict per layout of the run in `workdir`."""
  from remote_jax import towers
  from remote_jax.data import builder, synth
  from remote_jax.models import remote
  from remote_jax.models.encoders import clip_vit
  config, s, state, step = load_run(workdir)
  reader = builder.make_reader(s.config.data)
  vision = clip_vit.CLIPVisionConfig.from_config(s.config.model.vision)
  rgb = slice(int(vision.use_cls), int(vision.use_cls) + vision.num_patches)  # [CLS?, rgb, depth]
  for layout in layouts:
    model = remote.build(with_layout(s.config.model, layout), s.meta["num_classes"],
                         s.meta["vocab_size"])
    forward = forward_fn(model)
    train, test = (object_features(s, forward, reader, state.eval_params, split, examples, rgb)
                   for split in ("train", "test"))
    out = {"workdir": str(workdir), "step": step, "mot": config.model.mot.variant,
           "moe": config.model.moe.variant, "n_train": config.data.attribute_world.n_train,
           "colour_source": config.data.attribute_world.colour_source,
           "seed": config.seed, "layout": layout, "objects_train": len(train[1]),
           "objects_test": len(test[1])}
    if test[3]:   # on test: mean shares of a read object's mass, and a uniform plan's
      out["plan_mass"] = {str(level): dict(zip(("own", "cue", "each_other"),
                                               np.round(m.mean(0), 4).tolist()))
                          for level, m in test[3].items()}
      # The attribute world fills every object slot of every image.
      out["uniform_share"] = round(1.0 / s.config.data.num_objects, 4)
    for name, k in (("colour", len(synth.COLOURS)), ("shape", len(synth.SHAPES))):
      ytr, yte = train[2][name], test[2][name]
      for tokens, suffix in (("all", ""), ("rgb", "_rgb_tokens")):
        out[f"{name}_per_level{suffix}"] = [
            round(towers.ridge_accuracy(a, ytr, b, yte, k)[0], 4)
            for a, b in zip(train[0][tokens], test[0][tokens])]
      out[f"{name}_at_head"] = round(towers.ridge_accuracy(train[1], ytr, test[1], yte, k)[0],
                                     4)
    yield out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("workdirs", nargs="+", help="run directories (config.json, checkpoints)")
  ap.add_argument("--examples", type=int, default=600, help="examples per split at most")
  ap.add_argument("--layouts", default="full",
                  help=f"comma-separated, of: {', '.join(LAYOUTS)} (default: full)")
  a = ap.parse_args()
  try:
    layouts = parse_layouts(a.layouts)
    for workdir in a.workdirs:
      for out in probe_run(workdir, a.examples, layouts):
        print(json.dumps(out), flush=True)
  except ValueError as e:
    ap.error(f"{e}")


if __name__ == "__main__":
  main()
