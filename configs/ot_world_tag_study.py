r"""Issue 35's H3 study (docs/ot_world.md §5): configs/ot_world_study.py on the tag world,
where the colour part's cue sits in another object than the read one.

  python -m bench.ot_study --config ot_world_tag_study.py \
      --extra pos=false,depth=false,moe=off \
      --variants none,ot_paper,uniform,skip,detached,xattn,ot_reference --seeds 0-4 \
      --baselines none,uniform,skip --metric test/colour/acc \
      --xla_cache runs/ot_world_study/xla_cache \
      --config.data.attribute_world.n_train=1000 --out runs/ot_world_study/tag_n1000_moe_off

Each image holds 2 large grey shapes and 2 small tags, one of each large shape's shape, one
painted and one not (remote_jax/data/attribute_world.py). "P painted a shape ." holds for the
large shape whose tag is painted: the read object carries no colour, so a same-position
`skip` has nothing to return, and `uniform` mixes both tags into both shapes alike. A plan
that matches a shape to its same-shaped tag, by content, is what would find the cue.
data.num_objects follows (4; remote_jax/config.py DERIVED). The `rgb_only` layout
(`pos=false,depth=false`) is the one where the tower's loss holds inside the model.
"""
from configs import ot_world_study


def get_config(arg=None):
  config = ot_world_study.get_config(arg)
  config.data.attribute_world.colour_source = "tag"
  return config
