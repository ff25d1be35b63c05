r"""MI2RAGE on MNRE-2 with pre-generated synthetic views (paper section 4 settings).

  python -m mi2rage_jax.train --config configs/mi2rage_mnre.py:root=/data/MNRE/mnre_txt,\
views=/data/mnre_views,images=/data/mnre_images,bert=/models/bert-base-uncased,\
clip=/models/clip-vit-base-patch16 --workdir runs/mi2rage_mnre

Data: MNRE txt at `root` (required: the folder with mnre_train.txt, e.g.
root=/data/MNRE/mnre_txt; unset, the run stops with a one-line error). test=val
(the default) scores the val split, for copies without mnre_test.txt; test=test
is the paper's test set. Real images at `images`/<img_id>
(needed by no_real_text, and appended at test time by no_real_image).
Synthetic views: one views store per split and modality (mi2rage_jax/views.py),
  <views>/<image|text>/<split>/manifest.json
with instance ids "<split>/<line index>". Round 0 holds the views generated
from the real view; round r the views chained from the views kept at round
r-1 (listed in <workdir>/<setting>/selections/<split>_round{r-1}.json after
stage select_{r-1}; the run stops with an error naming the instance and round
until that round is in the store). Paper: Stable Diffusion 2.1 (512 px, 50
steps, guidance 7.5) and BLIP ViT-L (nucleus p=0.8); 30 initial views, keep
60%, 4 children per kept view in round 1 and 1 in round 2 (K=2); the student
uses 10 captions (no_real_text) or 6 images (no_real_image).

Text-only data (WebNLG-style JSONL, see mi2rage_jax/data.py):
  configs/mi2rage_mnre.py:dataset=webnlg,root=/data/webnlg,views=/data/webnlg_views
runs the text student (no_real_image) only.

Args: setting, teacher, rounds, unimodal, n_train, n_test (0: the paper's per-setting
numbers), root, test, images, views, bert, clip, dataset (mnre|webnlg), seed.
"""
from configs import common, mi2rage_demo

PAPER_VIEWS = {"no_real_text": 10, "no_real_image": 6}


def get_config(arg=None):
  config, arg = mi2rage_demo.base_config(
      arg, setting="both", rounds=2, size="base", n_train=0, n_test=0,
      root="", test="val", images="", views="", bert="", clip="",
      dataset="mnre")
  if arg.dataset == "webnlg":
    config.settings = ("no_real_image",)
  config.data.update(
      name=arg.dataset, root=arg.root, test_split=arg.test, image_dir=arg.images,
      max_length=128)
  del config.data.demo
  config.model.text.update(pretrained_dir=arg.bert)
  config.model.vision.update(image_size=224, patch_size=16, pretrained_dir=arg.clip)
  config.data.tokenizer_dir = arg.bert
  config.generator = dict(name="pregenerated", stores={
      modality: {split: f"{arg.views}/{modality}/{split}" for split in ("train", arg.test)}
      for modality in ("image", "text")})
  config.ccg = dict(rounds=arg.rounds, n_initial=30, children=(4, 1), keep_fraction=0.6)
  # Section 9.1: AdamW + cosine; teacher batch 256, lr 3e-7 (texts) / 5e-7 (images).
  config.teacher.update(batch_size=256, steps=2000, eval_batch_size=256)
  config.teacher.optim = common.optim_config(lr={"text": 3e-7, "image": 5e-7},
                                             schedule="cosine", warmup_ratio=0.1)
  student = config.student.to_dict()
  student.update(batch_size=16, steps=8000, eval_batch_size=32,
                 n_train_views=arg.n_train or dict(PAPER_VIEWS),
                 n_test_views=arg.n_test or dict(PAPER_VIEWS),
                 optim=common.optim_config(lr=1e-5, schedule="cosine", warmup_ratio=0.1))
  config.student = student
  config.model.cross_heads = 12
  config.diversity.update(pca_dim=32, components=3)
  return config
