r"""MNRE (thecharm/MNRE mnre_txt): entity-entity relations; no object boxes.

  python -m remote_jax.train --config configs/mnre.py --workdir runs/mnre \
      --config.data.root=/data/MNRE/mnre_txt

The published validation file is named `mnre_val .txt` (with a space); both that
and `mnre_val.txt` are accepted. MNRE has no objects, captions or descriptions, so
the visual side sees only empty (masked) slots unless data.paths.images is set.
"""
from configs import common


def get_config(arg=None):
  config = common.remote_config(arg, "mnre", default_size="base", max_length=128,
                                num_objects=1, crop_size=64, use_caption=False)
  return config
