"""Shared config pieces: the `:arg` mini-language and defaults (big_vision style).

`python -m remote_jax.train --config configs/umre.py:mot=xattn,moe=off` passes
"mot=xattn,moe=off" to `get_config(arg)`, which calls `parse_arg`.
"""
import copy

import ml_collections

from remote_jax.data import DATASETS


def parse_arg(arg, lazy=False, **spec):
  """Parses "a=1,b=foo,flag" into a ConfigDict, typed by the defaults in `spec`.

  A bare name sets a bool to True. Unknown keys raise unless `lazy`.
  """
  config = ml_collections.ConfigDict(spec)
  if not arg:
    return config
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      if not lazy:
        raise ValueError(
            f"config arg: unknown key {key!r} in {arg!r}; allowed: {sorted(spec)}")
      config[key] = value if sep else True
      continue
    default = spec[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config arg: {key!r} needs a value ({key}=...)")
      config[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0", "on", "off"):
        raise ValueError(f"config arg: {key}={value!r} is not a bool")
      config[key] = value.lower() in ("true", "1", "on")
    elif default is None:
      config[key] = value
    else:
      try:
        config[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(
            f"config arg: {key}={value!r} is not a {type(default).__name__}") from e
  return config


# Sizes by name: "tiny" is for tests and CPU demos; "base" is BERT-base/ViT-B/32.
TEXT_SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    "small": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256),
    "minilm": dict(hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    # tiny's width, 6 layers: room for a pretrained tower to lose something (configs/ot_world.py).
    "deep": dict(hidden_size=64, num_layers=6, num_heads=4, intermediate_size=128),
}
VISION_SIZES = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    "deep": dict(hidden_size=64, num_layers=6, num_heads=4, intermediate_size=128),
    "small": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256),
    "minilm": dict(hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
}


def text_tower(dims, **overrides):
  """config.model.text: BERT's settings (bert-base-uncased's config.json) at `dims`."""
  # No vocab_size: the tokenizer gives it (the data's meta for REMOTE, the encoder for
  # MI²RAGE, which writes it here in mi2rage_jax/train.py).
  tower = dict(dims, max_position_embeddings=512, type_vocab_size=2,
               hidden_dropout=0.1, attention_dropout=0.1, layer_norm_eps=1e-12,
               # A local HF directory, or a hub id ("bert-base-uncased") fetched when online.
               initializer_range=0.02, pretrained_dir="",
               # The marker rows added to a pretrained vocabulary: "normal" N(0, 0.02) (the
               # released code's), "punct" copies of punctuation rows (data/tokenizer.py).
               marker_init="normal")
  return {**tower, **overrides}


def vision_tower(dims, **overrides):
  """config.model.vision: CLIP ViT's settings at `dims`."""
  tower = dict(dims, layer_norm_eps=1e-5, attention_dropout=0.0, initializer_range=0.02,
               pretrained_dir="")
  return {**tower, **overrides}


def model_config(size="tiny", semantics="paper"):
  """The REMOTE model config. `semantics` picks the paper's or the released code's behaviour.

  Every ablation of the paper (tables 3-5) is one field here:
    mot.variant: ot_paper | ot_reference | xattn | none           (table 3: MOT, CA, w/o MOT)
                 uniform | skip | detached | fgw | sdiv          (docs/ot_variants.md)
    moe.variant: paper | reference | off; moe.experts: "T,V,T2V,V2T" subsets (table 5)
    use_pos / data.use_caption / vision.use_depth                  (table 4: P, C, D)
  """
  if semantics not in ("paper", "reference"):
    raise ValueError(f"model semantics {semantics!r}: allowed 'paper', 'reference'")
  paper = semantics == "paper"
  text = text_tower(TEXT_SIZES[size])
  vision = vision_tower(VISION_SIZES[size], image_size=64, patch_size=32, use_cls=False,
                        use_depth=True)
  num_layers = text["num_layers"]
  if vision["num_layers"] != num_layers:
    raise ValueError("text and vision towers need the same number of layers")
  return ml_collections.ConfigDict(dict(
      semantics=semantics,
      text=text,
      vision=vision,
      # paper: each object crop is encoded on its own; reference: all object
      # tokens of an image attend to each other (the released co-encoder).
      object_attention="per_object" if paper else "joint",
      # The released code's co-encoder extras (reference_remote.md 3.3):
      # text K/V prefixed into late ViT layers, object pooling + box embedding
      # after `pool_layer`, the object-attention term in late BERT FFNs.
      co_encoder=not paper,
      pool_layer=max(num_layers * 2 // 3 - 1, 0),   # 7 of 12, as released
      use_pos=True,
      # post_norm: the box embedding is added after CLIP's pre-LayerNorm, where growing
      # patch embeddings cannot scale it away; pre_norm: eq. 4 literally (before it).
      box_position="post_norm" if paper else "pre_norm",
      # post_norm: each object's mean and max depth, embedded and added where the box is
      # (after the pre-LayerNorm, which divides a uniform depth patch's value away); off:
      # depth reaches the model through its patch tokens only (eq. 4, the released code).
      depth_summary="post_norm" if paper else "off",
      # False reproduces the released code's missing masks (padding attended).
      respect_masks=paper,
      mot=dict(
          variant="ot_paper" if paper else "ot_reference",
          levels="all",                       # "all" or "2,4,6" (level indices)
          source_levels="all_below" if paper else "skip_previous",
          # The paper's lambda (eq. 6) has no value: on cosine costs in [0, 2], 0.1 gives
          # a clearly non-uniform yet smooth plan; the released 0.5 is nearly flat.
          epsilon=0.1 if paper else 0.5,
          iters=50,                           # as released
          cost="cosine",
          # unrolled: the exact gradient of the truncated loop (what PyTorch computes);
          # implicit assumes convergence and is unreliable on low-rank features.
          diff="unrolled",
          solver="ott",                       # ott (ott-jax) | jax (plain, unrolled only)
          tau_a=1.0, tau_b=1.0,               # balanced (1.0) or unbalanced (< 1) marginals
          eps_init=1.0, eps_decay=1.0,        # no epsilon schedule
          num_heads=text["num_heads"],        # xattn's heads (12 at 768, as released)
          alpha_init=0.5,
          residual_init=1.0,
          fused_penalty=1.0,                  # fgw: weight of the query-source cost
          outer_iters=5,                      # fgw: GW linearisations
          loss_weight=0.1,                    # sdiv: Sinkhorn divergence weight (0: off)
          mask=paper,
          # object: eq. 5's F_V^l in R^{2u x d}, one transport problem per object;
          # image: all objects' tokens of an image in one problem (the released code).
          vision_scope="object" if paper else "image",
      ),
      moe=dict(
          variant="paper" if paper else "reference",
          experts="T,V,T2V,V2T",
          num_heads=text["num_heads"],
          shared_projections=True,
          mask_keys=paper,
          dropout_text=0.1, dropout_vision=0.0,
          # H = top level + eq. 12's mix (moe.py PaperMMoE); False: eq. 12 literally.
          residual=paper,
          # Routing per triplet (its markers and objects) on LayerNorm'd inputs; the
          # load-balancing term (KL of the mean routing to uniform) is ours, off here.
          route_by="triplet" if paper else "example",
          router_norm=paper,
          balance_weight=0.0,
      ),
      head=dict(
          hidden=(text["hidden_size"],) if paper else (),
          dropout=0.5 if paper else 0.0,
          use_desc=True,
          # An object whose <o> marker is missing (no captions, truncation): the paper
          # keeps its region feature; the released code zeroes the whole side.
          object_without_marker="keep_region" if paper else "zero_side",
          # Without captions (data.use_caption=False): "mm_linear" keeps the head, the
          # caption marker states zero (the paper's "w/o caption"); "raw" classifies the raw
          # [h_head; h_tail] without mm_linear (the released code's use_cap=False).
          without_caption="mm_linear" if paper else "raw",
          use_caption=True,   # follows data.use_caption (remote_jax/config.py: DERIVED)
      ),
      dtype="float32",
      remat=False,   # True: recompute encoder layers and OT levels in the backward pass
  ))


# The demo world's parameters (remote_jax/data/synth.py, world v3): 1,000 / 500 / 500
# examples per triplet type; 30% of the objects' captions say nothing about them.
DEMO_WORLD = dict(seed=0, n_train=3000, n_val=1500, n_test=1500, image_size=96,
                  caption_absent=0.3)


# The synthetic tower's patch projection (remote_jax/towers.py).
TOWER_STEM = r"^vision/embeddings/patch_embedding/"


def synth_tower(name="grid", **overrides):
  """model.vision.synth: the recipe of a synthetic pretrained tower (remote_jax/towers.py),
  read where model.vision.pretrained_dir = "synth:NAME". `name` picks a recipe of
  SYNTH_TOWERS (configs/ot_world.py:tower=NAME); `overrides` replace its fields."""
  if name not in SYNTH_TOWERS:
    raise ValueError(f"tower={name!r}: allowed {sorted(SYNTH_TOWERS)} (configs/common.py "
                     "SYNTH_TOWERS)")
  recipe = dict(seed=0, steps=4000, batch_size=128, n_crops=4096,
                invariance=1.0,                      # weight of the colour-invariance term
                invariant_levels=3,                  # over the top N levels
                world_size=DEMO_WORLD["image_size"],  # crops are cut from images of this size
                **copy.deepcopy(SYNTH_TOWERS[name]))   # a caller's edit stays its own
  recipe.update(overrides)
  return recipe


# Preprocessed datasets and generated worlds, relative to the working directory (REMOTE's
# data.cache_dir; MI²RAGE's knowledge world, configs/mi2rage_demo.py).
CACHE_DIR = "data_cache"

# MI²RAGE's teacher defaults (configs/mi2rage_demo.py:base_config's args `test_by`, `folds`):
# test views ranked by the teacher's confidence; folds 1: the paper's teacher scores the
# views it trained on (k > 1: cross-fitted, mi2rage_jax/pipeline.py).
MI2RAGE_TEACHER = dict(test_criterion="maxprob", folds=1)


def data_config(name, **overrides):
  """config.data: which dataset, where its files are, and how to preprocess."""
  data = ml_collections.ConfigDict(dict(
      name=name,
      root="",                 # dataset directory (see the README per dataset)
      max_length=128,          # the paper; the released script used 256
      num_objects=12,
      crop_size=64,
      use_caption=True,
      use_depth=True,
      # both | text (no pixels, depth, boxes or object captions) | vision (no sentence
      # words beyond the entity markers, no entity descriptions): the modality ablation.
      modalities="both",
      depth_norm="none",       # none (released) | minmax | more (255 - 100 d)
      # Training text augmentation (MI²RAGE's, for MNRE): this fraction of the non-entity
      # sentence pieces is masked (text_augment_mask of them) or replaced; 0 is off.
      text_augment=0.0,
      text_augment_mask=0.8,
      # Each batch's token fields are cut to its longest example, rounded up to a multiple
      # of this; 0 keeps max_length. The train step is compiled once per length met, the
      # first ahead, the others during training (beside the state: mind the memory).
      pad_to_multiple_of=0,
      # Training batches from runs of this many batches sorted by sentence length (HF's
      # group_by_length), so that cut batches hold little padding; 0 is off.
      group_by_length=0,
      strict="strict",         # strict: stop at the first bad line; skip: count and list
      cache_dir=CACHE_DIR,
      tokenizer_dir="",        # "": the vocabulary of the offline MiniLM package
      worker_count=0,
      # One key per file of the dataset's reader ("" = the reader's DEFAULT_PATHS entry),
      # so --config.data.paths.images=DIR works.
      paths={key: "" for key in DATASETS[name].reader.DEFAULT_PATHS} if name in DATASETS else {},
  ))
  if name == "demo":
    data.demo = dict(DEMO_WORLD)
  data.update(overrides)
  return data


def optim_config(**overrides):
  """config.optim (remote_jax/optim.py says what each key does): the released protocol's
  AdamW, lr 1e-5, 6% warmup then linear decay, weight decay 0.01 on everything."""
  optim = dict(
      name="adamw", lr=1e-5, schedule="linear", warmup_ratio=0.06,
      warmup_steps=None,            # set: overrides warmup_ratio
      b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.01, decay_mask="all",
      clip_norm=0.0,                # <= 0: no clipping
      grad_accum=1,
      groups={}, frozen_patterns=(),
      # Layer-wise lr decay over the text tower (1.0: off); the embeddings count as the
      # layer below layers_0.
      layer_decay=1.0, layer_decay_pattern=r"^text/(?:layers_(\d+)|embeddings)/",
      ema=0.0,                      # moving average of the params, evaluated (0: off)
  )
  optim.update(overrides)
  return optim


_TOWER_OPTIM = dict(lr=1e-3, warmup_ratio=0.05, weight_decay=0.01, decay_mask="no_bias_norm",
                    clip_norm=1.0)
# Named tower recipes: sensor noise (per pixel, fraction of the range) in the crops and the
# world that reads the tower, the floor under which a faded trace is lost; and how the patch
# projection trains (docs/ot_world.md §1).
SYNTH_TOWERS = {
    # Issue 35's grid: the patch projection frozen at its random init, a fixed front end
    # that keeps the colour at level 0 so that the layers fade it (top: 35.6%).
    "grid": dict(pixel_noise=0.12,
                 optim=optim_config(**_TOWER_OPTIM, frozen_patterns=(TOWER_STEM,))),
    # The patch projection trained at 0.3x the lr, less noise: level 0 still keeps the colour
    # (100%), the top loses it (26.8%): the recipe that meets issue 35's probe goal.
    "slow_stem": dict(pixel_noise=0.08,
                      optim=optim_config(**_TOWER_OPTIM, groups={
                          "stem": dict(pattern=TOWER_STEM, lr_mult=0.3)})),
}


def train_config(**overrides):
  """Optimiser, schedule, loop, checkpoints, logging, mesh: the shared defaults."""
  config = ml_collections.ConfigDict(dict(
      seed=0,
      batch_size=32,
      eval_batch_size=64,
      num_epochs=30,
      eval_every_epochs=1,
      eval_every_steps=0,           # >0 overrides eval_every_epochs
      log_every_steps=10,
      checkpoint_every_steps=0,     # 0: at every evaluation
      max_to_keep=2,
      report_max_over_epochs=False, # the released code's test-set selection
      max_steps=0,                  # >0 caps the schedule's length (smoke tests)
      stop_after_step=0,            # >0 stops as if killed there (resume drills)
      optim=optim_config(),
      mesh=[("data", -1)],
      sharding="dp",
      distributed=dict(coordinator_address="", num_processes=0, process_id=-1),
      resume="",
      plots=True,
      xla_cpu="auto",               # XLA:CPU flag preset: auto | auto_lean | fast | lean | fast_lean | xla (xla_cpu.py)
  ))
  config.update(overrides)
  return config


# The `:arg` options every REMOTE config accepts (configs/umre.py:mot=xattn,...).
ARG_SPEC = dict(
    semantics="paper",   # paper | reference (the released code's behaviour)
    size="",             # tiny | small | minilm | base ("" = the config's own)
    mot="",              # a fusion: ot_paper | xattn | none | uniform | ... (fusion.FUSIONS)
    moe="",              # paper | reference | off
    experts="",          # e.g. "T,V,T2V,V2T" or "T2V,V2T" (table 5)
    pos=True,            # table 4: box position feature
    caption=True,        # table 4: object captions / entity descriptions
    depth=True,          # table 4: depth channel
    modalities="both",   # both | text | vision: what evidence the model gets
    protocol="ours",     # ours | reference (released optimiser protocol, sec. 4)
    runlocal=False,      # tiny shapes and few steps, for smoke runs
)


def remote_config(arg, dataset, default_size, **data_overrides):
  """Assembles a full REMOTE config from the `:arg` string; see ARG_SPEC."""
  a = parse_arg(arg, **ARG_SPEC)
  size = "tiny" if a.runlocal else (a.size or default_size)
  config = train_config()
  config.data = data_config(dataset, **data_overrides)
  config.model = model_config(size, a.semantics)
  if a.mot:
    config.model.mot.variant = a.mot
  if a.moe:
    config.model.moe.variant = a.moe
  if a.experts:
    config.model.moe.experts = a.experts
  config.model.use_pos = a.pos
  # The args switch captions and depth off; a dataset without them (data_overrides) stays so.
  config.data.use_caption = config.data.use_caption and a.caption
  config.data.use_depth = config.data.use_depth and a.depth
  config.data.modalities = a.modalities
  # model.vision.use_depth, image_size and model.head.use_caption follow data.use_depth,
  # crop_size and data.use_caption: set by
  # remote_jax.config.resolve after the command line's overrides.
  if a.protocol == "reference":
    apply_reference_protocol(config)
  elif a.protocol != "ours":
    raise ValueError(f"config arg protocol={a.protocol!r}: allowed 'ours', 'reference'")
  if a.runlocal:
    config.batch_size, config.eval_batch_size = 4, 8
    config.max_steps, config.num_epochs, config.log_every_steps = 4, 1, 2
    config.model.vision.patch_size = config.data.crop_size // 2
  return config


def apply_reference_protocol(config):
  """The released training protocol (reference_remote.md 4.1-4.3).

  lr 1e-5, 6% warmup + linear decay, weight decay on everything, 30 epochs,
  batch 32, max_seq 256, and the parameter-selection bug: the classifier and
  mm_linear are never trained. Test-set "best" is reported as well (labelled).
  """
  config.optim.update(lr=1e-5, warmup_ratio=0.06, weight_decay=0.01, decay_mask="all",
                      # One pattern: without captions the released head has no mm_linear.
                      clip_norm=0.0, frozen_patterns=("^head/(mm_linear|classifier)/",))
  config.batch_size, config.num_epochs, config.seed = 32, 30, 1234
  config.data.max_length = 256
  config.report_max_over_epochs = True
