r"""Writes the released-code parity fixture (tests/fixtures/released/remote_small.npz).

Run with a separate Python that has torch and transformers 4.2x (never the project's
venv; /work/shared/tools/setup_ref_env.sh makes one), and the git directory of a
Nikol-coder/REMOTE snapshot:

  REMOTE_REF_GIT=/path/to/REMOTE.git $REF_PYTHON bench/released_fixture.py \
      --out tests/fixtures/released/remote_small.npz

No released code is in this repository: the model sources are read out of the git
directory at run time (`git show`) into a scratch folder and imported from there,
unchanged. The model is the released `UnimoREModel` with its hard-coded depths (12
layers, pooling after layer 7, 12 objects, 64-px crops, 4 patches) at a small width,
built from configs instead of `from_pretrained` (no hub here), with a vocabulary of
BASE_VOCAB word pieces + the 12 markers. Every parameter is then perturbed, so that a
LayerNorm left at 1/0 or an OT weight left at 1 cannot hide a mapping error.

The .npz holds: `w:<released name>` every tensor of the state_dict; `batch:<field>`
one batch in the released loader's format (pixels stored as float16-exact values;
`batch_nocap:*` the token fields of the same batch without caption segments);
`out:logits`, `out:text` / `out:vision` (the MoE outputs the head reads),
`out:text_level_<i>` / `out:vision_level_<i>` (i = 0..12, the co-encoder's levels);
the variants `out:logits_nocap` (args.use_cap=False, on the no-caption tokens) and
`out:logits_nobox` (position=None); and `meta:*` (released commit, sizes).
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import types

import numpy as np

REF_FILES = ("__init__.py", "unimo_model.py", "modeling_unimo_moe_opt.py",
             "bert_vit_inter_base_model.py", "modeling_bert.py", "modeling_clip.py")
REF_DIR = "ROMOTE_code/models_best"
MARKERS = ("<s1>", "</s1>", "<s2>", "</s2>", "<k1>", "</k1>", "<k2>", "</k2>",
           "<o1>", "</o1>", "<o2>", "</o2>")
BASE_VOCAB = 128            # > [CLS] 101 / [SEP] 102; the markers follow
CLS, SEP = 101, 102
NUM_LABELS = 28
NUM_OBJECTS, REAL_OBJECTS = 12, 5
SIZES = dict(width=32, heads=4, intermediate=64, layers=12, max_positions=64, seq=40)


def extract_released(git_dir, dst):
  """git-show the released model files into dst/released_ref/; returns the commit."""
  rev = subprocess.check_output(["git", "-C", git_dir, "rev-parse", "HEAD"], text=True).strip()
  pkg = os.path.join(dst, "released_ref")
  os.makedirs(os.path.join(pkg, "models_best"), exist_ok=True)
  open(os.path.join(pkg, "__init__.py"), "w").close()
  for name in REF_FILES:
    src = subprocess.check_output(["git", "-C", git_dir, "show", f"{rev}:{REF_DIR}/{name}"],
                                  text=True)
    with open(os.path.join(pkg, "models_best", name), "w") as f:
      f.write(src)
  return rev


def build_released(dst, use_cap=True):
  """The released UnimoREModel at SIZES, from configs (random init, then its own copying)."""
  from transformers import BertConfig, BertModel, CLIPConfig
  sys.path.insert(0, dst)
  import released_ref.models_best.unimo_model as um
  from released_ref.models_best.modeling_clip import CLIPModel

  s = SIZES
  tower = dict(hidden_size=s["width"], num_hidden_layers=s["layers"],
               num_attention_heads=s["heads"], intermediate_size=s["intermediate"])
  bert = BertConfig(vocab_size=BASE_VOCAB, max_position_embeddings=s["max_positions"], **tower)
  # transformers 4.2x reads the *_dict keywords (it ignores vision_config=...).
  clip = CLIPConfig(vision_config_dict=dict(tower, image_size=64, patch_size=32),
                    text_config_dict=dict(tower, vocab_size=64, max_position_embeddings=16))
  um.CLIPModel = types.SimpleNamespace(from_pretrained=lambda *a, **k: CLIPModel(clip))
  um.CLIPConfig = types.SimpleNamespace(from_pretrained=lambda *a, **k: clip)
  um.BertConfig = types.SimpleNamespace(from_pretrained=lambda *a, **k: bert)
  um.BertModel = types.SimpleNamespace(from_pretrained=lambda *a, **k: BertModel(bert))

  class Tokenizer:   # all the model asks of its tokenizer
    def __len__(self):
      return BASE_VOCAB + len(MARKERS)

    def convert_tokens_to_ids(self, token):
      return BASE_VOCAB + MARKERS.index(token)

  args = types.SimpleNamespace(vit_name="clip", bert_name="bert", device="cpu",
                               use_cap=use_cap, use_dep=True, use_box=True)
  with contextlib.redirect_stdout(io.StringIO()):   # its "weight not found" prints
    return um.UnimoREModel(NUM_LABELS, Tokenizer(), args)


def perturb(model, seed):
  """Every parameter moved off its init: LayerNorms off 1/0, OT weights off 1, the
  rest by a fraction of its own scale (kept small enough for a stable Sinkhorn)."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.dim() <= 1:
        p.add_(0.2 * noise)
      else:
        p.add_(noise * max(float(p.std()), 0.02) * 0.5)


def mid(token):
  return BASE_VOCAB + MARKERS.index(token)


def make_batch(seed, captions=True):
  """4 examples, one per triplet kind (e-e, o-o, e-o, o-e), the loader's format;
  REAL_OBJECTS objects per image, the other slots zero as the loader pads them."""
  rng = np.random.default_rng(seed)
  kinds = ("ee", "oo", "eo", "oe")
  b, seq = len(kinds), SIZES["seq"]
  ids = np.zeros((b, seq), np.int64)
  types_ = np.zeros((b, seq), np.int64)
  mask = np.zeros((b, seq), np.int64)
  head_obj = np.full(b, -1, np.int64)
  tail_obj = np.full(b, -1, np.int64)
  for i, kind in enumerate(kinds):
    words = lambda n: rng.integers(1, 100, n).tolist()
    sent = words(12)
    if kind[0] == "e":
      sent = sent[:2] + [mid("<s1>")] + sent[2:4] + [mid("</s1>")] + sent[4:]
    else:
      head_obj[i] = rng.integers(0, REAL_OBJECTS)
    if kind[1] == "e":
      sent = sent[:9] + [mid("<s2>")] + sent[9:11] + [mid("</s2>")] + sent[11:]
    else:
      tail_obj[i] = (head_obj[i] + 1 + rng.integers(0, REAL_OBJECTS - 1)) % REAL_OBJECTS
    first = [CLS] + sent + [SEP]
    second = []
    for side, n in (("1", 5 + i), ("2", 4 + 2 * i)):
      tag = "k" if kind[int(side) - 1] == "e" else "o"
      second += [mid(f"<{tag}{side}>")] + words(n) + [mid(f"</{tag}{side}>")]
    # Drawn either way, so that both batches share every other field (pixels, boxes, ...).
    second = second + [SEP] if captions else []
    row = first + second
    ids[i, :len(row)] = row
    types_[i, len(first):len(row)] = 1
    mask[i, :len(row)] = 1
  pixels = np.zeros((b, NUM_OBJECTS, 4, 64, 64), np.float32)
  # On a grid of 1/8 (exact in float16, and it compresses): the fixture stays small.
  rgb = np.clip(np.round(rng.standard_normal((b, REAL_OBJECTS, 3, 64, 64)) * 8) / 8, -3, 3)
  pixels[:, :REAL_OBJECTS, :3] = rgb
  pixels[:, :REAL_OBJECTS, 3] = rng.integers(0, 80, (b, REAL_OBJECTS, 64, 64)) / 8
  boxes = np.zeros((b, NUM_OBJECTS, 5), np.float32)
  lt = rng.uniform(0, 0.5, (b, REAL_OBJECTS, 2))
  rb = lt + rng.uniform(0.1, 0.5, (b, REAL_OBJECTS, 2))
  boxes[:, :REAL_OBJECTS, :2], boxes[:, :REAL_OBJECTS, 2:4] = lt, rb
  boxes[:, :REAL_OBJECTS, 4] = (rb[..., 0] - lt[..., 0]) * (rb[..., 1] - lt[..., 1])
  return dict(input_ids=ids, attention_mask=mask, token_type_ids=types_, ent_imgs=pixels,
              ent_idx_head=head_obj, ent_idx_tail=tail_obj, position=boxes,
              labels=rng.integers(0, NUM_LABELS, b))


def run(model, batch, with_position=True):
  """(logits, {name: array}) of one eval forward; levels captured off the encoder."""
  import torch
  seen = {}
  hook = model.model.encoder.register_forward_hook(
      lambda mod, inp, out: seen.update(text=out[0], vision=out[1]))
  t = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  if not with_position:
    t["position"] = None
  model.eval()
  with torch.no_grad():
    _, logits = model(**t)
  hook.remove()
  out = {"text": seen["text"].last_hidden_state, "vision": seen["vision"].last_hidden_state}
  for side in ("text", "vision"):
    for i, h in enumerate(seen[side].hidden_states):
      out[f"{side}_level_{i}"] = h
  return logits.numpy(), {k: v.numpy() for k, v in out.items()}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", default="tests/fixtures/released/remote_small.npz")
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args()
  git_dir = os.environ.get("REMOTE_REF_GIT")
  if not git_dir:
    sys.exit("set REMOTE_REF_GIT to the git directory of a Nikol-coder/REMOTE snapshot")
  import torch
  torch.manual_seed(a.seed)
  torch.set_num_threads(1)
  with tempfile.TemporaryDirectory() as tmp:
    rev = extract_released(git_dir, tmp)
    model = build_released(tmp)
    perturb(model, a.seed + 1)
    batch = make_batch(a.seed + 2)
    logits, feats = run(model, batch)
    logits_nobox, _ = run(model, batch, with_position=False)
    nocap = make_batch(a.seed + 2, captions=False)
    model.args.use_cap = False
    logits_nocap, _ = run(model, nocap)
    import transformers
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
  arrays = {f"w:{k}": v.detach().numpy() for k, v in model.state_dict().items()}
  arrays.update({f"batch:{k}": v.astype(np.float16) if k == "ent_imgs" else v
                 for k, v in batch.items()})
  # The no-caption batch differs in its token fields only.
  arrays.update({f"batch_nocap:{k}": nocap[k]
                 for k in ("input_ids", "attention_mask", "token_type_ids")})
  arrays["out:logits"], arrays["out:logits_nobox"] = logits, logits_nobox
  arrays["out:logits_nocap"] = logits_nocap
  arrays.update({f"out:{k}": v for k, v in feats.items()})
  meta = dict(SIZES, commit=rev, base_vocab=BASE_VOCAB, markers=MARKERS,
              num_labels=NUM_LABELS, num_objects=NUM_OBJECTS, seed=a.seed, **versions)
  arrays["meta:json"] = np.asarray(json.dumps(meta))
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  np.savez_compressed(a.out, **arrays)
  print(json.dumps({"out": a.out, "bytes": os.path.getsize(a.out), "commit": rev,
                    "max_abs_logit": float(np.abs(logits).max())}))


if __name__ == "__main__":
  main()
