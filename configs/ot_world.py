r"""Issue 35's towers (work in progress): the demo world (v3) read by 6-layer towers whose
vision tower is pretrained here to name shapes while its top level is trained towards
colour invariance. It is not colour-blind yet: a linear probe still reads the colour from
its top level (docs/ot_world.md), so this is not yet the world the issue asks for.

  python -m remote_jax.towers --config ot_world.py            # pretrain once, probe levels
  python -m remote_jax.train --config ot_world.py --workdir runs/ot_world

The tower (remote_jax/towers.py, recipe model.vision.synth) is written once under
data.cache_dir/towers and loaded as any pretrained encoder; it is frozen here (its
RGB embeddings and layers; its new depth projection, the box and depth-summary embeddings
and everything above train). For
layer-wise lr decay instead:
  --config.optim.frozen_patterns='()' --config.optim.layer_decay=0.8 \
  --config.optim.layer_decay_pattern='^vision/(?:layers_(\d+)|embeddings)/'
The text tower (6 layers, from scratch) matches its depth: the co-encoder walks both
towers a layer at a time.
"""
from configs import common, demo


def get_config(arg=None):
  config = demo.get_config(f"size=deep,{arg or ''}")   # a `size=` in arg comes later and wins
  config.model.vision.pretrained_dir = "synth:colour_blind"
  config.model.vision.synth = common.synth_tower()
  # The pretrained tower; its depth projection (new, from the RGB kernel's channel mean) trains.
  config.optim.frozen_patterns = (r"^vision/(?!embeddings/depth_embedding/)",)
  return config
