r"""Issue 35's world: relations that need the colour, read by a vision tower pretrained here
to lose it at its top (docs/ot_world.md).

  python -m remote_jax.towers --config ot_world.py            # pretrain once, probe levels
  python -m remote_jax.train --config ot_world.py --workdir runs/ot_world
  python -m bench.ot_study --config ot_world_study.py ...      # the study (ot_world_study.py)

The world (remote_jax/data/attribute_world.py): 3 shapes per image, each of its own colour and
shape, with sensor noise; "P painted a shape ." holds for the red and yellow objects (`painted`,
the colour part), "P drew a shape ." for the circle (`drew`, the shape control), each triplet
(P, one object). The test split's buckets `colour` and `shape` score the two parts apart.

The tower (remote_jax/towers.py, recipe model.vision.synth): 6 layers pretrained to name the
shape with a colour-invariant top, on crops with the world's noise. `tower=NAME` picks a
recipe of configs/common.py SYNTH_TOWERS: `grid` (the default, issue 35's studies: the patch
projection kept at its random init; the top reads the colour at 35.6%) or `slow_stem` (the
patch projection trained at 0.3x the lr, less noise: 26.8% at the top, 100% at level 0).
It is written once under data.cache_dir/towers and loaded as any pretrained encoder; it is
frozen here (its RGB embeddings and layers; its new depth
projection, the box and depth-summary embeddings and everything above train). For layer-wise
lr decay instead:
  --config.optim.frozen_patterns='()' --config.optim.layer_decay=0.8 \
  --config.optim.layer_decay_pattern='^vision/(?:layers_(\d+)|embeddings)/'
The text tower (6 layers, from scratch) matches its depth: the co-encoder walks both towers
a layer at a time.

The vision OT is image-wide (model.mot.vision_scope=image): an object's tokens are
transported from every object's lower tokens. With the paper's per-object scope, the mean
over an object's tokens of the transported term is the same for `skip`, `uniform` and any
plan with uniform marginals, and the head reads that mean, so transport would have nothing
to find (docs/ot_world.md).
"""
from configs import common, demo

# The world's parameters (config.data.attribute_world); its sensor noise is the tower's.
# colour_source "tag": the colour part's cue sits in another object, the read shape's
# same-shaped tag (H3; data.num_objects follows it: remote_jax/config.py DERIVED).
ATTRIBUTE_WORLD = dict(seed=0, n_train=3000, n_val=300, n_test=600, image_size=96,
                       colour_source="own")


def get_config(arg=None):
  # `tower=NAME` (configs/common.py SYNTH_TOWERS) is this config's own; the rest is the demo's.
  items = [x for x in (arg or "").split(",") if x.strip()]
  own = common.parse_arg(",".join(x for x in items if x.strip().startswith("tower=")),
                         tower="grid")
  rest = ",".join(x for x in items if not x.strip().startswith("tower="))
  config = demo.get_config(f"size=deep,{rest}")   # a `size=` in arg comes later and wins
  config.model.vision.pretrained_dir = "synth:colour_blind"
  # Its world_size follows data.attribute_world.image_size, and the world's pixel_noise
  # follows its pixel_noise (remote_jax/config.py DERIVED).
  config.model.vision.synth = common.synth_tower(own.tower)
  # The demo's training settings, the attribute world's data (the same UMRE reader).
  config.data.name = "attribute_world"
  del config.data["demo"]
  config.data.attribute_world = dict(ATTRIBUTE_WORLD,
                                     pixel_noise=config.model.vision.synth["pixel_noise"])
  config.model.mot.vision_scope = "image"
  # The pretrained tower; its depth projection (new, from the RGB kernel's channel mean) trains.
  config.optim.frozen_patterns = (r"^vision/(?!embeddings/depth_embedding/)",)
  return config
