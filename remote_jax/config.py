"""The config layer: reading fields, deriving fields, checking what they mean.

Configs are data (configs/*.py:get_config(arg)) and set sources only. `resolve(config)`
runs after the command line's `--config.x=y` overrides (remote_jax/cli.py), as MaxText's
pyconfig does: it computes every derived field of `DERIVED` from its source and runs the
semantic checks, so `--config.data.use_depth=False` means what `:depth=False` means. A
derived field is not set by hand: an override of one that disagrees with its source is a
one-line error naming the source. `resolve` is idempotent: a saved, resolved config.json
resolves to itself.

The accessors (`setting`, `field`, `choice`, `flag`, `number`, ...) read one field and
raise ValueError naming it when it is missing or bad; configs/common.py states every
default, so a missing field is a caller's mistake.
"""
import math

# -- accessors ---------------------------------------------------------------------------


def cfg_get(cfg, key, default=None):
  """An optional field of a dict or an ml_collections ConfigDict; missing, None or "" give
  `default`."""
  value = None if cfg is None or key not in cfg else cfg[key]
  return default if value is None or value == "" else value


def setting(cfg, key):
  """config.data.<key>. configs/common.py:data_config sets every setting, so a missing one
  is a caller's mistake (a hand-made dict: start from data_config instead)."""
  if cfg is None or key not in cfg:
    raise ValueError(f"data.{key} is not set (configs/common.py:data_config sets every "
                     "data setting)")
  return cfg[key]


MOT = "model.mot"


def field(cfg, key, where=MOT):
  """`cfg[key]` of the section `where` (default model.mot, set whole by
  configs/common.py:model_config); missing or None raises."""
  value = cfg.get(key) if cfg is not None else None
  if value is None:
    raise ValueError(f"{where}.{key} is not set (configs/common.py:model_config sets every "
                     f"field of {where})")
  return value


def choice(cfg, key, allowed, where=MOT):
  value = field(cfg, key, where)
  if value not in tuple(allowed):
    raise ValueError(f"{where}.{key}={value!r}: allowed values are {sorted(allowed)}")
  return value


def flag(cfg, key, where=MOT):
  value = field(cfg, key, where)
  if type(value) is not bool:
    raise ValueError(f"{where}.{key}={value!r}: must be True or False")
  return value


def number(cfg, key, lo=-math.inf, hi=math.inf, lo_open=False, hi_open=False, integer=False,
           where=MOT):
  """A float (or int) in the interval lo..hi; `*_open` excludes the end."""
  value = field(cfg, key, where)
  span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
  kind = "an integer" if integer else "a number"
  numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
  if integer and numeric and not float(value).is_integer():
    numeric = False
  if not numeric or not math.isfinite(value) or not (
      (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)):
    raise ValueError(f"{where}.{key}={value!r}: must be {kind} in {span}")
  return int(value) if integer else float(value)


def as_dict(x) -> dict:
  """A ConfigDict, a mapping or None as a plain dict."""
  if x is None:
    return {}
  return x.to_dict() if hasattr(x, "to_dict") else dict(x)


def distributed_field(config, name):
  """config.distributed.<name>; absent, None, "" and negative numbers mean unset."""
  section = None if config is None else getattr(config, "distributed", None)
  if section is None and isinstance(config, dict):
    section = config.get("distributed")
  if section is None:
    return None
  value = section.get(name) if isinstance(section, dict) else getattr(section, name, None)
  if value == "" or (isinstance(value, int) and not isinstance(value, bool) and value < 0):
    return None
  return value


# The keys of config.optim (configs/common.py:optim_config sets each; optim.py uses them).
OPTIM_KEYS = ("name", "lr", "schedule", "warmup_ratio", "warmup_steps", "b1", "b2", "eps",
              "weight_decay", "decay_mask", "clip_norm", "grad_accum", "groups",
              "frozen_patterns", "layer_decay", "layer_decay_pattern", "ema")


def optim_settings(config) -> dict:
  """config.optim as a checked dict: every key of OPTIM_KEYS, no other."""
  cfg = as_dict(config)
  unknown = sorted(set(cfg) - set(OPTIM_KEYS))
  if unknown:
    raise ValueError(f"optim config: unknown key(s) {unknown}; allowed: {sorted(OPTIM_KEYS)}")
  missing = [k for k in OPTIM_KEYS if k not in cfg]
  if missing:
    raise ValueError(f"optim config: {missing} not set (configs/common.py:optim_config sets "
                     "every key)")
  if not 0.0 <= float(cfg["ema"]) < 1.0:
    raise ValueError(f"optim.ema={cfg['ema']}: the average's decay must be in [0, 1) (0: off)")
  if cfg["name"] != "adamw":
    raise ValueError(f"optim.name: only 'adamw' is implemented, got {cfg['name']!r}")
  return cfg


# -- semantic checks -----------------------------------------------------------------------

VISION_SCOPES = ("object", "image")
BOX_POSITIONS = ("post_norm", "pre_norm")
DEPTH_SUMMARIES = ("off", "post_norm")
SOURCE_LEVELS = ("all_below", "skip_previous")


def mot_levels(cfg_mot, num_layers):
  """Target levels that get OT fusion, and each one's source levels."""
  first = 2 if cfg_mot.source_levels == "skip_previous" else 1
  if cfg_mot.source_levels not in SOURCE_LEVELS:
    raise ValueError(
        f"model.mot.source_levels={cfg_mot.source_levels!r}: allowed "
        "'all_below' (paper eq. 5: levels 0..l-1) or 'skip_previous' "
        "(released code: levels 0..l-2)")
  if cfg_mot.variant == "none":
    return {}
  if cfg_mot.levels == "all":
    targets = list(range(first, num_layers + 1))
  else:
    try:
      targets = sorted({int(x) for x in str(cfg_mot.levels).split(",") if x})
    except ValueError as e:
      raise ValueError(f"model.mot.levels={cfg_mot.levels!r}: 'all' or a "
                       "comma list of level indices") from e
    bad = [t for t in targets if not first <= t <= num_layers]
    if bad:
      raise ValueError(f"model.mot.levels: {bad} out of range; allowed "
                       f"{first}..{num_layers} with source_levels="
                       f"{cfg_mot.source_levels!r}")
  stop = 1 if cfg_mot.source_levels == "skip_previous" else 0
  return {t: tuple(range(0, t - stop)) for t in targets}


def check_model(cfg):
  """config.model's fields that no single module owns: the towers' widths, the MOT levels
  and scope, the box and depth placements (the fusion and MoE registries check their own
  sections when they build)."""
  d = cfg.vision.hidden_size
  if cfg.text.hidden_size != d:
    raise ValueError(
        f"model.text.hidden_size={cfg.text.hidden_size} and "
        f"model.vision.hidden_size={d} must match (fusion works in one width)")
  mot_levels(cfg.mot, cfg.text.num_layers)
  if cfg.mot.vision_scope not in VISION_SCOPES:
    raise ValueError(f"model.mot.vision_scope={cfg.mot.vision_scope!r}: allowed "
                     f"{list(VISION_SCOPES)}")
  if cfg.mot.vision_scope == "object" and cfg.co_encoder:
    raise ValueError("model.mot.vision_scope='object' needs model.co_encoder=False (the "
                     "co-encoder pools each object to one token; use 'image')")
  if cfg.box_position not in BOX_POSITIONS:
    raise ValueError(f"model.box_position={cfg.box_position!r}: allowed {list(BOX_POSITIONS)}")
  if cfg.depth_summary not in DEPTH_SUMMARIES:
    raise ValueError(f"model.depth_summary={cfg.depth_summary!r}: allowed "
                     f"{list(DEPTH_SUMMARIES)}")


def check_padding_cut(config):
  """Cutting padding (data.pad_to_multiple_of) leaves a masked model's outputs unchanged, not
  the released code's, whose attention and transport see the padding."""
  attends = {k: v for k, v in (("model.respect_masks", config.model.respect_masks),
                               ("model.mot.mask", config.model.mot.mask)) if not v}
  if config.data.pad_to_multiple_of and attends:
    raise ValueError(f"data.pad_to_multiple_of={config.data.pad_to_multiple_of} with "
                     f"{', '.join(f'{k}=False' for k in attends)}: this model attends padding "
                     "(the released code's behaviour), so cutting it would change its outputs; "
                     "set --config.data.pad_to_multiple_of=0 or mask the padding")


MARKER_INITS = ("normal", "punct")   # model.text.marker_init (pretrained.marker_pieces)


def check_marker_init(text_config):
  init = text_config["marker_init"]
  if init not in MARKER_INITS:
    raise ValueError(f"model.text.marker_init={init!r}: allowed 'normal' (N(0, 0.02), the "
                     "released code's) or 'punct' (copies of the rows of punctuation pieces, "
                     "data/tokenizer.py PUNCT_MARKERS)")


# MI²RAGE's teacher kinds and test-time criteria (mi2rage_jax/pipeline.py, selection.py).
# oracle (demo generators only) keeps the views the generator made faithfully (its
# `meta.faithful`, random among equals): what a perfect selection would give, an upper bound
# for the analysis, never a method.
TEACHER_KINDS = ("trained", "similarity", "random", "none", "oracle")
TEST_CRITERIA = ("maxprob", "entropy", "agree", "real")


def check_mi2rage(cfg):
  """The MI²RAGE config's choices that its pipeline reads (pipeline.Run)."""
  if cfg.teacher.kind not in TEACHER_KINDS:
    raise ValueError(f"teacher.kind {cfg.teacher.kind!r}; allowed: {TEACHER_KINDS}")
  if cfg.teacher.test_criterion not in TEST_CRITERIA:
    raise ValueError(f"teacher.test_criterion {cfg.teacher.test_criterion!r}; allowed: "
                     f"{TEST_CRITERIA} (label-free: the test labels are never read)")
  return mi2rage_folds(cfg)


def mi2rage_folds(cfg):
  """teacher.folds: 1 = the paper (one teacher scores the views it trained on); k > 1 =
  cross-fitted, with a trained teacher."""
  k = int(cfg.teacher.folds)
  if k < 1 or (k > 1 and cfg.teacher.kind != "trained"):
    raise ValueError(f"teacher.folds={k}: must be 1, or > 1 with teacher.kind 'trained' "
                     f"(not {cfg.teacher.kind!r})")
  return k


# -- derived fields -------------------------------------------------------------------------

# The attribute world's objects per image by data.attribute_world.colour_source: 3 shapes, or
# 2 large shapes and their 2 tags (remote_jax/data/attribute_world.py draws them; stated here,
# where data.num_objects follows it, because the data package imports this module).
ATTRIBUTE_WORLD_OBJECTS = {"own": 3, "tag": 4}


def attribute_world_objects(colour_source):
  if colour_source not in ATTRIBUTE_WORLD_OBJECTS:
    raise ValueError(f"data.attribute_world.colour_source={colour_source!r}: allowed "
                     f"{list(ATTRIBUTE_WORLD_OBJECTS)}")
  return ATTRIBUTE_WORLD_OBJECTS[colour_source]


# (derived field, its source, how): the fields that copy or follow another. A config file
# and an override set the source; `resolve` sets the derived field.
DERIVED = {
    "remote": (
        ("model.vision.use_depth", "data.use_depth", lambda v: v),
        ("model.vision.image_size", "data.crop_size", lambda v: v),
        ("model.head.use_caption", "data.use_caption", lambda v: v),
        # A synthetic tower read on the attribute world (configs/ot_world.py): the world's
        # noise is the tower's, the tower's crops are cut from images of the world's size.
        ("data.attribute_world.pixel_noise", "model.vision.synth.pixel_noise", lambda v: v),
        ("model.vision.synth.world_size", "data.attribute_world.image_size", lambda v: v),
        # Its object count follows where the colour cue sits (3 shapes, or 2 and 2 tags).
        ("data.num_objects", "data.attribute_world.colour_source", attribute_world_objects),
    ),
    "mi2rage": (
        ("data.image_size", "model.vision.image_size", lambda v: v),
    ),
}


def kind(config):
  """"mi2rage" (configs/mi2rage_*.py: settings, teacher, student) or "remote"."""
  return "mi2rage" if "settings" in config and "teacher" in config else "remote"


def get_field(config, path):
  node = config
  for key in path.split("."):
    node = node[key]
  return node


def has_field(config, path):
  node = config
  for key in path.split("."):
    if key not in node:
      return False
    node = node[key]
  return True


def set_field(config, path, value):
  """config.a.b.c = value for path "a.b.c"."""
  *parents, key = path.split(".")
  node = config
  for k in parents:
    node = node[k]
  node[key] = value


def resolve(config, overridden=()):
  """Computes the derived fields of `config` (in place; returned) and checks it.

  `overridden`: the dotted fields the command line set (`--config.a.b=...` -> "a.b"); a
  derived field among them is an error naming its source, unless it agrees with it.
  """
  for target, source, how in DERIVED[kind(config)]:
    if not (has_field(config, source) and has_field(config, target)):
      continue   # a pair of fields only some configs have (the attribute world's)
    value = how(get_field(config, source))
    if target in overridden and get_field(config, target) != value:
      raise ValueError(f"--config.{target}: {target} follows {source}; set "
                       f"--config.{source} instead")
    set_field(config, target, value)
  if kind(config) == "remote":
    check_model(config.model)
    check_padding_cut(config)
    check_marker_init(config.model.text)
    optim_settings(config.optim)
  else:
    check_mi2rage(config)
    for part in ("teacher", "student"):
      optim_settings(config[part].optim)
  return config
