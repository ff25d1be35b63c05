r"""MORE (NJUNLP/MORE): entity-object relations, at most 10 objects per image.

  python -m remote_jax.train --config configs/more.py --workdir runs/more \
      --config.data.root=/data/MORE ...

Layout expected under data.root (override with data.paths.<key>): txt/{train,valid,
test}.txt, boxes as JSON converted once from the published ent_*_dict.pth with
`python -m remote_jax.data.more --convert-pth IN.pth OUT.json` (needs torch once),
img_org/<split>/, img_dep/<stem>.npz, caption_dict.json, rel2id.json.
MORE has no entity descriptions: the <k> segment is left out for text entities.
"""
from configs import common


def get_config(arg=None):
  return common.remote_config(arg, "more", default_size="base", max_length=128,
                              num_objects=10, crop_size=64)
