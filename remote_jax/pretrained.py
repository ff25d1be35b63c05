"""Pretrained encoders into a model's parameters: the converted BERT and CLIP checkpoints
of `model.{text,vision}.pretrained_dir` (a local directory, or a hub id fetched when online:
convert.checkpoint_dir), with one fresh word-embedding row per marker token. Shared by
REMOTE's task and MI2RAGE's teachers and students, which pass `load_pretrained` to
`engine.build(load=...)`.
"""
import logging

import flax
import jax
import jax.numpy as jnp

from remote_jax import config as config_lib
from remote_jax.data.tokenizer import MARKERS, PUNCT_MARKERS
from remote_jax.models import convert

log = logging.getLogger(__name__)


def marker_pieces(text_config):
  """The word pieces whose rows the marker rows copy (model.text.marker_init, checked by
  config.check_marker_init); () for "normal" (N(0, 0.02))."""
  config_lib.check_marker_init(text_config)
  return {"normal": (), "punct": PUNCT_MARKERS}[text_config["marker_init"]]


def load_pretrained(params, model_config, seed, cache_dir=None, **vision):
  """Replaces the `text` / `vision` encoder params by converted local checkpoints where
  `model_config.{text,vision}.pretrained_dir` is set (and the model has that encoder).
  A vision `pretrained_dir` "synth:NAME" is a tower pretrained here (remote_jax/towers.py),
  written once under `cache_dir`.

  The word embeddings gain one fresh row per marker token (the tokenizer's vocabulary
  is the checkpoint's plus MARKERS); `vision` overrides the fields of
  `model_config.vision` that `convert.load_clip_vision` takes.
  """
  text_dir = model_config.text.get("pretrained_dir", "")
  vision_dir = model_config.vision.get("pretrained_dir", "")
  if text_dir and "text" in params:
    _, text = convert.load_bert(text_dir, num_extra_tokens=len(MARKERS), seed=seed,
                                extra_like=marker_pieces(model_config.text))
    params = _replace(params, "text", text, text_dir)
    log.info("loaded pretrained text encoder from %s (+%d marker rows)", text_dir, len(MARKERS))
  if vision_dir and "vision" in params:
    if str(vision_dir).startswith("synth:"):
      from remote_jax import towers  # late: only synthetic towers need the data package
      vision_dir = towers.ensure_tower(vision_dir, model_config.vision, cache_dir)
    v = {k: model_config.vision[k] for k in ("image_size", "patch_size", "use_cls", "use_depth")
         if k in model_config.vision}
    _, weights = convert.load_clip_vision(vision_dir, **{**v, **vision}, seed=seed)
    params = _replace(params, "vision", weights, vision_dir)
    log.info("loaded pretrained vision tower from %s", vision_dir)
  return params


def _replace(params, key, new, where):
  old = params[key]
  mismatch = []
  flat_old = flax.traverse_util.flatten_dict(old, sep="/")
  flat_new = flax.traverse_util.flatten_dict(new, sep="/")
  # The model may hold encoder params the checkpoint lacks (e.g. fusion_dense of
  # the released co-encoder): those keep their fresh init.
  for name, value in flat_new.items():
    if name not in flat_old:
      mismatch.append(f"{name}: not in the model")
    elif flat_old[name].shape != value.shape:
      mismatch.append(f"{name}: model {flat_old[name].shape} vs checkpoint {value.shape}")
  if mismatch:
    raise ValueError(f"pretrained {key} weights from {where} do not fit the model config "
                     f"(model.{key}): " + "; ".join(mismatch[:10]))
  merged = dict(flat_old)
  for name, value in flat_new.items():
    merged[name] = jax.device_put(jnp.asarray(value, flat_old[name].dtype),
                                  getattr(flat_old[name], "sharding", None))
  return {**params, key: flax.traverse_util.unflatten_dict(merged, sep="/")}


