r"""UMRE (the REMOTE paper's dataset): BERT-base + CLIP ViT-B/32, 12 objects.

  python -m remote_jax.train --config configs/umre.py --workdir runs/umre \
      --config.data.root=/data/umke_partner \
      --config.model.text.pretrained_dir=/models/bert-base-uncased \
      --config.model.vision.pretrained_dir=/models/clip-vit-base-patch32

Where the data comes from: the authors' Google Drive archives `UMRE_Data.zip`
(images) and `umke_partner.zip` (split files train_set.json / val_set.json /
test_set.json, pos_umke.json boxes, cap_qwenvl_simply.json captions), plus
Depth-Anything-V2 maps (`<stem>.npz` with `depth_map`), see github.com/
Nikol-coder/REMOTE. Put them under data.root (or set data.paths.<key>:
train, val, test, boxes, captions, images, depth, relations).

Args: semantics=paper|reference, mot=..., moe=..., experts=..., pos/caption/
depth=False (table 4), protocol=reference (the released optimiser protocol).
"""
from configs import common


def get_config(arg=None):
  # data_config's and model_config's defaults are UMRE's (128 word pieces, 12 objects,
  # 64 px crops, ViT-B/32 patches).
  return common.remote_config(arg, "umre", default_size="base")
