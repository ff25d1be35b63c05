r"""The released REMOTE code's weights -> our `semantics=reference` parameter tree.

  python -m remote_jax.models.released best_model.pth \
      --config configs/umre.py:semantics=reference --workdir runs/released
  python -m remote_jax.evaluate --config configs/umre.py:semantics=reference \
      --workdir runs/released --split test

The input is the state_dict the released training saves (`torch.save(model.state_dict(),
".../best_model.pth")` of `UnimoREModel`): a torch `.pth`/`.pt`/`.bin` (needs torch), or
an `.npz` of the same tensors under the same names (torch stays optional:
`np.savez(f, **{k: v.numpy() for k, v in sd.items()})`). Every tensor goes through the
explicit name map below and is checked against `jax.eval_shape` of our model, so a
checkpoint that does not fit fails with the full list of missing, unexpected and
mis-shaped tensors, as `convert.py`'s Hugging Face loaders do.

Names map one to one (tests/remote_jax/models/test_released.py checks the forward pass
against the released code's) except: the released OT module l of each stack is our
level l + 1 (module 0 is never called); `vision2text_layer_agg` (text queries over the
vision levels) is our `moe/text`, `text2vision_layer_agg` our `moe/vision`; q/k/v
kernels take the (D, heads, head_dim) layout; conv weights (O, C, kh, kw) become
(kh*kw*C, O). The released-only tensors that no computation reads are dropped by
`ignored_patterns` (an explicit list, reported at INFO level).
"""
import logging
import pathlib
import re

import numpy as np
from flax.traverse_util import unflatten_dict

from remote_jax import config as config_lib
from remote_jax.errors import CheckpointError
from remote_jax.models import convert
from remote_jax.models import heads as heads_lib
from remote_jax.models import remote as remote_lib
from remote_jax.models.convert import COPY, FLAT, LINEAR, dense_names, norm_names, patch_conv
from remote_jax.models.encoders.bert import BertConfig
from remote_jax.models.encoders.clip_vit import CLIPVisionConfig

log = logging.getLogger(__name__)

PREFIX = "model."   # UnimoREModel.model (UnimoModel); the head's layers sit beside it


def _rename(names: list, ours: str, theirs: dict) -> list:
  """convert.py's HF name map with our subtree prefix and the released module names."""
  out = []
  for o, t, rule in names:
    for old, new in theirs.items():
      if t.startswith(old):
        t = new + t[len(old):]
        break
    out.append((f"{ours}/{o}", t, rule))
  return out


def _ot(ours: str, theirs: str, weight: str) -> list:
  return [*dense_names(f"{ours}/q_proj", f"{theirs}.query_proj.0"),
          *norm_names(f"{ours}/q_norm", f"{theirs}.query_proj.1"),
          *dense_names(f"{ours}/k_proj", f"{theirs}.key_proj.0"),
          *norm_names(f"{ours}/k_norm", f"{theirs}.key_proj.1"),
          (f"{ours}/w", weight, COPY)]


def _moe_side(ours: str, theirs: str, q: str, kv: str, levels: int) -> list:
  names = []
  for j in range(levels):
    att = f"{theirs}.cross_modal_att_layer.{j}"
    names += [*dense_names(f"{ours}/attn_{j}/query", f"{att}.self_attn.{q}_q_proj"),
              *dense_names(f"{ours}/attn_{j}/key", f"{att}.self_attn.{kv}_k_proj"),
              *dense_names(f"{ours}/attn_{j}/value", f"{att}.self_attn.{kv}_v_proj"),
              *dense_names(f"{ours}/attn_{j}/out", f"{att}.self_attn.out_proj"),
              *norm_names(f"{ours}/norm_{j}", f"{att}.layer_norm1")]
  agg = f"{theirs}.moe_layer_wise_agg"
  return names + [(f"{ours}/expert_in", f"{agg}.experts1", COPY),
                  (f"{ours}/expert_out", f"{agg}.experts2", COPY),
                  *dense_names(f"{ours}/router", f"{agg}.expert_router")]


def name_map(model_cfg) -> list:
  """(our "/"-joined path, released name, layout rule) for every parameter of
  RemoteModel(model_cfg) under semantics=reference."""
  _check_reference(model_cfg)
  enc = f"{PREFIX}encoder"
  bert = convert.bert_name_map(BertConfig.from_config(model_cfg.text, vocab_size=1))
  clip = convert.clip_name_map(CLIPVisionConfig.from_config(model_cfg.vision))
  names = _rename(bert, "text", {"embeddings.": f"{PREFIX}text_embeddings.",
                                 "encoder.layer.": f"{enc}.text_layer."})
  names += _rename(clip, "vision", {"embeddings.": f"{PREFIX}vision_embeddings.",
                                    "pre_layrnorm": f"{PREFIX}vision_pre_layrnorm",
                                    "encoder.layers.": f"{enc}.vision_layers."})
  if model_cfg.vision.use_depth:
    names.append(("vision/embeddings/depth_embedding/kernel",
                  f"{PREFIX}vision_embeddings.depth_embedding.weight", patch_conv(1)))
  layers = model_cfg.text.num_layers
  names += [(f"text/layers_{i}/fusion_dense/{k}",
             f"{enc}.text_layer.{i}.intermediate.fusion_dense.{t}", r)
            for i in _fusion_layers(model_cfg)
            for k, t, r in (("kernel", "weight", LINEAR), ("bias", "bias", FLAT))]
  if model_cfg.use_pos:
    names += [*dense_names("box_embed", f"{enc}.image_position_embeddings"),
              *norm_names("pool_norm", f"{enc}.layernorm")]
  for level in config_lib.mot_levels(model_cfg.mot, layers):
    for side in ("text", "vision"):
      names += _ot(f"mot_{side}_{level}", f"{enc}.{side}_ot_attention.{level - 1}",
                   f"{enc}.{side}_cross_attention_weights.{level - 1}")
  names += _moe_side("moe/text", f"{enc}.vision2text_layer_agg", "text", "vision", layers + 1)
  names += _moe_side("moe/vision", f"{enc}.text2vision_layer_agg", "vision", "text", layers + 1)
  if not _raw_head(model_cfg):
    names += dense_names("head/mm_linear", "mm_linear")
  return names + dense_names("head/classifier", "classifier")


def _raw_head(model_cfg) -> bool:
  return heads_lib.raw_pairs(model_cfg.head.use_caption, model_cfg.head.without_caption)


def _fusion_layers(model_cfg) -> range:
  """BERT layers whose fusion_dense computes something (those after pool_layer)."""
  return range(model_cfg.pool_layer + 1, model_cfg.text.num_layers)


def ignored_patterns(model_cfg) -> list[str]:
  """Regexes of the released tensors that no computation reads (or buffers)."""
  enc = re.escape(f"{PREFIX}encoder")
  below = "|".join(str(i) for i in range(model_cfg.pool_layer + 1))
  return [
      r"model\.(vision|text)_embeddings\.position_ids$",           # buffers
      r"model\.vision_embeddings\.class_embedding$",               # no CLS token
      r"model\.vision_post_layernorm\.",                           # no pooled output
      r"model\.text_pooler\.",
      rf"{enc}\.text_layer\.({below})\.intermediate\.fusion_dense\.",   # called without objects
      rf"{enc}\.(vision|text)_cross_attention\.\d+\.",             # never called
      rf"{enc}\.(vision2text|text2vision)_layer_agg\.cross_modal_att_layer\.\d+\.self_attn\."
      r"(vision_and_text|text_and_vision)_k_proj\.",               # called with None
      rf"{enc}\.(vision|text)_ot_attention\.0\.",                  # OT runs from layer 1 on
      rf"{enc}\.(vision|text)_cross_attention_weights\.0$",
  ] + ([] if model_cfg.use_pos else [rf"{enc}\.(image_position_embeddings|layernorm)\."]) + (
      [r"mm_linear\."] if _raw_head(model_cfg) else [])   # use_cap=False never calls it


def _check_reference(model_cfg):
  if model_cfg.semantics != "reference" or not model_cfg.co_encoder:
    raise ValueError(f"released weights fit model.semantics='reference' only (the config has "
                     f"{model_cfg.semantics!r}): pass --config configs/umre.py:semantics=reference")


def read_state_dict(path) -> dict[str, np.ndarray]:
  """A released state_dict (.pth/.pt/.bin via torch, or .npz) as numpy arrays."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no released state_dict at {path}: expected the best_model.pth "
                            "that the released training writes (or an .npz of its tensors)")
  if path.suffix == ".npz":
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  try:
    import torch
  except ImportError:
    raise CheckpointError(
        f"{path} is a torch file and torch is not installed: convert it with torch elsewhere "
        "(np.savez(out, **{k: v.numpy() for k, v in torch.load(f).items()})) and pass the "
        ".npz") from None
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {k: convert.to_numpy(v) for k, v in state.items()}


def example_batch(model_cfg, max_length: int, num_objects: int, batch_size: int = 1) -> dict:
  """A model batch of zeros at these sizes (for shapes; the batch contract's fields)."""
  from remote_jax.data import batch_spec
  spec = batch_spec.batch_spec(batch_size, max_length, num_objects,
                               model_cfg.vision.image_size, fields=batch_spec.MODEL_FIELDS)
  return {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}


def convert_state(state: dict, model_cfg, num_classes: int, vocab_size: int, *,
                  max_length: int = 8, num_objects: int = 12, where="state_dict") -> dict:
  """Released tensors -> params of RemoteModel(model_cfg, num_classes, vocab_size).

  Raises CheckpointError listing every missing, unexpected (not ignored) and mis-shaped
  tensor. `max_length` / `num_objects` only shape the dummy batch of eval_shape.
  """
  names = name_map(model_cfg)
  state, _ = convert.strip_prefix(state, "module.")   # saved from nn.DataParallel
  state, dropped = convert.drop_ignored(state, ignored_patterns(model_cfg))
  if dropped:
    log.info("%s: ignoring %d released tensors no computation reads: %s", where,
             len(dropped), ", ".join(dropped))
  model = remote_lib.build(model_cfg, num_classes, vocab_size)
  expected = convert.expected_shapes(
      model, example_batch(model_cfg, max_length, num_objects), True)
  flat, problems = convert.convert_tensors(state, names, expected, "")
  problems.missing += [f"(ours) {k} {v}: not in the name map" for k, v in expected.items()
                       if k not in flat and k not in {o for o, _, _ in names}]
  if problems:
    lines = [f"released weights {where} do not fit RemoteModel (semantics=reference, "
             f"width {model_cfg.text.hidden_size}, {model_cfg.text.num_layers} layers, "
             f"vocab {vocab_size}, {num_classes} classes):", *problems.lines()]
    raise CheckpointError("\n".join(lines))
  # np.ascontiguousarray in _convert makes the scalar OT weights 1-d: back to ().
  params = unflatten_dict({k: v.reshape(expected[k]) for k, v in flat.items()}, sep="/")
  convert.check_tree(where, params, expected)
  return params


def batch_from_released(batch: dict, marker_ids: dict) -> dict:
  """A batch of the released loader (input_ids, ent_imgs (B,K,4,S,S), position,
  ent_idx_head/tail, labels) -> our batch contract. `marker_ids`: token -> id."""
  ids = np.asarray(batch["input_ids"])

  def first(token):
    hit = ids == marker_ids[token]
    return np.where(hit.any(1), hit.argmax(1), -1).astype(np.int32)

  pixels = np.asarray(batch["ent_imgs"], np.float32)
  out = {k: np.asarray(batch[k], np.int32)
         for k in ("input_ids", "token_type_ids", "attention_mask")}
  out["obj_pixels"] = pixels[:, :, :3].transpose(0, 1, 3, 4, 2)
  out["obj_depth"] = pixels[:, :, 3:].transpose(0, 1, 3, 4, 2)
  out["obj_boxes"] = np.asarray(batch["position"], np.float32)
  out["obj_mask"] = np.abs(pixels).reshape(pixels.shape[:2] + (-1,)).max(-1) > 0
  for side, n in (("head", "1"), ("tail", "2")):
    entity, obj = first(f"<s{n}>"), first(f"<o{n}>")
    out[f"{side}_marker"] = np.where(entity >= 0, entity, obj)
    out[f"{side}_desc"] = first(f"<k{n}>")
    out[f"{side}_obj"] = np.asarray(batch[f"ent_idx_{side}"], np.int32)
  out["label"] = np.asarray(batch["labels"], np.int32)
  return out


# ----------------------------------------------------------------------------
# Command line: released state_dict -> an orbax checkpoint evaluate/predict restore


def save_checkpoint(s, params, workdir, source: str) -> pathlib.Path:
  """Writes `params` into the state of Setup `s` as step 0 of workdir/ckpt."""
  import jax

  from remote_jax import checkpoint as ckpt_lib
  state = s.state
  placed = jax.tree_util.tree_map(
      lambda old, new: jax.device_put(np.asarray(new, old.dtype), old.sharding),
      state.params, params)
  fields = {"params": placed}
  if getattr(state, "ema", None) is not None:   # optim.ema: the average is what evaluates
    fields["ema"] = placed
  state = state.replace(**fields)
  ckpt = ckpt_lib.Checkpointer.for_workdir(workdir, async_save=False)
  ckpt.save(0, state, meta={"converted_from": source, "done": True}, force=True)
  ckpt.wait()
  ckpt.close()
  return pathlib.Path(workdir) / "ckpt"


def main(argv):
  from remote_jax import errors, task, writers
  writers.setup_cli_logging()
  with errors.user_errors():
    if len(argv) != 2:
      raise ValueError("give one released state_dict: python -m remote_jax.models.released "
                       "best_model.pth --config ... --workdir OUT")
    config, workdir = _CONFIG.value, _WORKDIR.value
    if not workdir:
      raise ValueError("give --workdir: the converted checkpoint goes to WORKDIR/ckpt")
    _check_reference(config.model)
    s = task.setup(config)
    state = read_state_dict(argv[1])
    params = convert_state(state, config.model, s.meta["num_classes"], s.meta["vocab_size"],
                           max_length=s.meta["max_length"], num_objects=s.meta["num_objects"],
                           where=argv[1])
    out = save_checkpoint(s, params, workdir, argv[1])
    print(f"wrote {out} (step 0) from {argv[1]}")


if __name__ == "__main__":
  from absl import flags

  from remote_jax import cli
  _CONFIG = cli.define_config_flag()
  _WORKDIR = flags.DEFINE_string("workdir", None,
                                 "Run directory: the checkpoint goes to WORKDIR/ckpt.")
  cli.run(main)
