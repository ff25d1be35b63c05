"""Load local Hugging Face checkpoints into our BERT / CLIP parameter trees.

Every tensor goes through an explicit name map (ours <- PyTorch name, with a
layout rule), and the result is checked against `jax.eval_shape` of our
module, so a wrong or partial checkpoint fails loudly with the full list of
missing, unexpected and mis-shaped tensors. Nothing is written to disk, except that a
path that is no directory but a hub id is fetched into the hub's cache when online.
"""
import dataclasses
import json
import logging
import math
import pathlib
import re
from collections.abc import Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from remote_jax.errors import CheckpointError
from remote_jax.models.encoders.bert import BertConfig, BertEncoder
from remote_jax.models.encoders.clip_vit import CLIPVisionConfig, CLIPVisionTower

log = logging.getLogger(__name__)

INIT_STD = 0.02  # new marker rows and re-initialised position tables (HF / CLIP init)


# ----------------------------------------------------------------------------
# Layout rules: our shape -> PyTorch shape, and the array conversion.


@dataclasses.dataclass(frozen=True)
class Rule:
  torch_shape: Callable[[tuple], tuple]
  to_ours: Callable[[np.ndarray, tuple], np.ndarray]
  # The inverse, for writing our parameters as a checkpoint (save_clip_vision).
  to_torch: Callable[[np.ndarray], np.ndarray]


def _linear(n_in: int) -> Rule:
  """nn.Linear weight (out, in) -> kernel (*in_dims, *out_dims); n_in = len(in_dims)."""
  def torch_shape(s):
    return (math.prod(s[n_in:]), math.prod(s[:n_in]))
  return Rule(torch_shape, lambda x, s: x.T.reshape(s),
              lambda x: x.reshape(torch_shape(x.shape)[::-1]).T)


def patch_conv(in_channels: int) -> Rule:
  """Conv2d weight (out, in, kh, kw) -> (kh*kw*in, out), flattened like `patchify`."""
  def torch_shape(s):
    side = math.isqrt(s[0] // in_channels)
    return (s[1], in_channels, side, side)

  def to_torch(x):
    out, _, side, _ = torch_shape(x.shape)
    return x.reshape(side, side, in_channels, out).transpose(3, 2, 0, 1)
  return Rule(torch_shape, lambda x, s: x.transpose(2, 3, 1, 0).reshape(s), to_torch)


FLAT = Rule(lambda s: (math.prod(s),), lambda x, s: x.reshape(s),   # vectors, bias (heads, kv)
            lambda x: x.reshape(-1))
COPY = Rule(lambda s: s, lambda x, s: x, lambda x: x)
TO_HEADS = _linear(1)     # q/k/v: (D, heads, kv)
FROM_HEADS = _linear(2)   # attention output: (heads, kv, D)
LINEAR = _linear(1)


def dense_names(ours: str, theirs: str, rule: Rule = LINEAR) -> list:
  return [(f"{ours}/kernel", f"{theirs}.weight", rule), (f"{ours}/bias", f"{theirs}.bias", FLAT)]


def norm_names(ours: str, theirs: str) -> list:
  return [(f"{ours}/scale", f"{theirs}.weight", FLAT), (f"{ours}/bias", f"{theirs}.bias", FLAT)]


# ----------------------------------------------------------------------------
# Name maps: (our "/"-joined path, PyTorch name after the prefix, rule)


def bert_name_map(config: BertConfig) -> list:
  names = [
      ("embeddings/word_embeddings/embedding", "embeddings.word_embeddings.weight", COPY),
      ("embeddings/position_embeddings/embedding", "embeddings.position_embeddings.weight", COPY),
      ("embeddings/token_type_embeddings/embedding", "embeddings.token_type_embeddings.weight",
       COPY),
      *norm_names("embeddings/layer_norm", "embeddings.LayerNorm"),
  ]
  for i in range(config.num_layers):
    ours, theirs = f"layers_{i}", f"encoder.layer.{i}"
    names += [
        *dense_names(f"{ours}/query", f"{theirs}.attention.self.query", TO_HEADS),
        *dense_names(f"{ours}/key", f"{theirs}.attention.self.key", TO_HEADS),
        *dense_names(f"{ours}/value", f"{theirs}.attention.self.value", TO_HEADS),
        *dense_names(f"{ours}/attention_output", f"{theirs}.attention.output.dense", FROM_HEADS),
        *norm_names(f"{ours}/attention_norm", f"{theirs}.attention.output.LayerNorm"),
        *dense_names(f"{ours}/intermediate", f"{theirs}.intermediate.dense"),
        *dense_names(f"{ours}/output", f"{theirs}.output.dense"),
        *norm_names(f"{ours}/output_norm", f"{theirs}.output.LayerNorm"),
    ]
  return names


def clip_name_map(config: CLIPVisionConfig) -> list:
  names = [
      ("embeddings/patch_embedding/kernel", "embeddings.patch_embedding.weight", patch_conv(3)),
      ("embeddings/position_embedding/embedding", "embeddings.position_embedding.weight", COPY),
      *norm_names("pre_layrnorm", "pre_layrnorm"),
  ]
  if config.use_cls:  # without CLS neither the token nor the pooler exists
    names += [("embeddings/class_embedding", "embeddings.class_embedding", COPY),
              *norm_names("post_layernorm", "post_layernorm")]
  for i in range(config.num_layers):
    ours, theirs = f"layers_{i}", f"encoder.layers.{i}"
    names += [
        *dense_names(f"{ours}/q_proj", f"{theirs}.self_attn.q_proj", TO_HEADS),
        *dense_names(f"{ours}/k_proj", f"{theirs}.self_attn.k_proj", TO_HEADS),
        *dense_names(f"{ours}/v_proj", f"{theirs}.self_attn.v_proj", TO_HEADS),
        *dense_names(f"{ours}/out_proj", f"{theirs}.self_attn.out_proj", FROM_HEADS),
        *norm_names(f"{ours}/layer_norm1", f"{theirs}.layer_norm1"),
        *dense_names(f"{ours}/fc1", f"{theirs}.mlp.fc1"),
        *dense_names(f"{ours}/fc2", f"{theirs}.mlp.fc2"),
        *norm_names(f"{ours}/layer_norm2", f"{theirs}.layer_norm2"),
    ]
  return names


# Tensors a checkpoint may hold that our encoders do not use (regexes, after the prefix).
BERT_IGNORED = [r"pooler\.", r"cls\.", r"embeddings\.position_ids$"]
CLIP_IGNORED = [r"text_model\.", r"text_projection\.", r"visual_projection\.", r"logit_scale$",
                r"embeddings\.position_ids$"]
CLIP_IGNORED_WITHOUT_CLS = [r"embeddings\.class_embedding$", r"post_layernorm\."]

# Config fields read off the weights: (our field, HF key, PyTorch name, read(shape)).
BERT_PROBES = [
    ("vocab_size", "vocab_size", "embeddings.word_embeddings.weight", lambda s: s[0]),
    ("hidden_size", "hidden_size", "embeddings.word_embeddings.weight", lambda s: s[1]),
    ("max_position_embeddings", "max_position_embeddings",
     "embeddings.position_embeddings.weight", lambda s: s[0]),
    ("type_vocab_size", "type_vocab_size", "embeddings.token_type_embeddings.weight",
     lambda s: s[0]),
    ("intermediate_size", "intermediate_size", "encoder.layer.0.intermediate.dense.weight",
     lambda s: s[0]),
]
CLIP_PROBES = [
    ("hidden_size", "hidden_size", "embeddings.patch_embedding.weight", lambda s: s[0]),
    ("patch_size", "patch_size", "embeddings.patch_embedding.weight", lambda s: s[-1]),
    ("intermediate_size", "intermediate_size", "encoder.layers.0.mlp.fc1.weight", lambda s: s[0]),
]
BERT_LAYER_NAME = r"encoder\.layer\.(\d+)\."
CLIP_LAYER_NAME = r"encoder\.layers\.(\d+)\."


# ----------------------------------------------------------------------------
# Reading a checkpoint directory

# A Hugging Face hub id: "name" or "owner/name" (letters, digits, ".", "_", "-").
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
# What the loaders read of a checkpoint directory (BERT also reads vocab.txt).
WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json",
                "model-*.safetensors")


def checkpoint_dir(path, files=WEIGHT_FILES) -> pathlib.Path:
  """A local checkpoint directory for `path`: `path` itself, or, when it does not exist
  and looks like a hub id ("bert-base-uncased", "openai/clip-vit-base-patch32"), the
  hub snapshot of `files` (huggingface_hub.snapshot_download: the local cache, else a
  download). Offline and not cached: a one-line error saying what to download where."""
  path = pathlib.Path(path)
  name = str(path)
  if path.exists() or not HUB_ID.fullmatch(name) or ".." in name:
    return path   # a local path: _read_config_path says what is wrong with it
  import huggingface_hub
  from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(name, allow_patterns=list(files)))
  except RepositoryNotFoundError:
    raise CheckpointError(f"pretrained_dir {name!r}: no local directory {path.resolve()} and "
                          "no hub repository of that name") from None
  except (LocalEntryNotFoundError, OSError) as e:   # offline, or no network
    why = ("the hub is offline (HF_HUB_OFFLINE=1)" if huggingface_hub.constants.HF_HUB_OFFLINE
           else f"it could not be downloaded ({type(e).__name__})")
    wanted = " ".join(f for f in files if "*" not in f and "index" not in f)
    raise CheckpointError(
        f"pretrained_dir {name!r} is not a local directory and {why}: on a machine with hub "
        f"access run `huggingface-cli download {name} {wanted} --local-dir DIR`, copy DIR "
        f"here (DIR/config.json, DIR/model.safetensors) and set pretrained_dir to it") from None


def _read_config_path(path: pathlib.Path) -> pathlib.Path:
  if not path.is_dir():
    raise CheckpointError(
        f"no checkpoint directory at {path}: expected a local Hugging Face model directory "
        "(config.json + model.safetensors), e.g. from `huggingface-cli download REPO "
        f"--local-dir {path}`")
  config = path / "config.json"
  if not config.is_file():
    raise CheckpointError(f"{path} has no config.json: put the model's config.json next to "
                          "its weights")
  return config


def _as_checkpoint_error(read, *args, **kwargs):
  try:
    return read(*args, **kwargs)
  except CheckpointError:
    raise
  except ValueError as e:  # config errors already name the file and the field
    raise CheckpointError(str(e)) from None


def _read_config(cls, path: pathlib.Path, **overrides):
  return _as_checkpoint_error(cls.from_hf, _read_config_path(path), **overrides)


def to_numpy(x) -> np.ndarray:
  return np.asarray(x.float().numpy() if x.is_floating_point() else x.numpy())


def read_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  """PyTorch-named tensors of a local HF directory, as numpy arrays."""
  single, index = path / "model.safetensors", path / "model.safetensors.index.json"
  if single.is_file() or index.is_file():
    from safetensors.numpy import load_file
    if single.is_file():
      return load_file(single)
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return {k: v for shard in shards for k, v in load_file(path / shard).items()}
  if (path / "pytorch_model.bin").is_file():
    try:
      import torch
    except ImportError:
      raise CheckpointError(
          f"{path} has only pytorch_model.bin and torch is not installed: convert it to "
          "model.safetensors (with torch: `safetensors.torch.save_file(torch.load(f), "
          "'model.safetensors')`) or install torch") from None
    state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    return {k: to_numpy(v) for k, v in state.items()}
  raise CheckpointError(f"{path} has no weights: expected model.safetensors, "
                        "model.safetensors.index.json or pytorch_model.bin")


def strip_prefix(state: dict, prefix: str) -> tuple[dict, str]:
  """Drops `prefix` when the checkpoint uses it (e.g. BertForMaskedLM's "bert.")."""
  if not any(k.startswith(prefix) for k in state):
    return state, ""
  return {k.removeprefix(prefix): v for k, v in state.items()}, prefix


def _legacy_norm_names(state: dict) -> dict:
  """Old BERT checkpoints name LayerNorm parameters gamma/beta."""
  return {re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                 re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)): v for k, v in state.items()}


# ----------------------------------------------------------------------------
# Matching a state dict against our module


def _flat_shapes(tree) -> dict[str, tuple]:
  return {"/".join(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def expected_shapes(module: nn.Module, *inputs) -> dict[str, tuple]:
  """Our "/"-joined parameter paths -> shapes, from eval_shape (no compute)."""
  return _flat_shapes(jax.eval_shape(
      lambda: nn.meta.unbox(module.init(jax.random.key(0), *inputs)["params"])))


@dataclasses.dataclass
class Problems:
  missing: list = dataclasses.field(default_factory=list)
  unexpected: list = dataclasses.field(default_factory=list)
  misshaped: list = dataclasses.field(default_factory=list)

  def __bool__(self):
    return bool(self.missing or self.unexpected or self.misshaped)

  def lines(self) -> list[str]:
    """One indented line per problem, for a CheckpointError."""
    return ([f"  missing: {m}" for m in self.missing]
            + [f"  unexpected: {u}" for u in self.unexpected]
            + [f"  mis-shaped: {m}" for m in self.misshaped])


def convert_tensors(state: dict, names: list, expected: dict, prefix: str,
                    lenient: Iterable[str] = ()) -> tuple[dict, Problems]:
  """Applies the name map. Paths in `lenient` skip a mis-shaped tensor (returned
  absent) instead of reporting it: the caller re-initialises them."""
  stray = {ours for ours, _, _ in names} - set(expected)
  if stray:  # our map and our module disagree: a bug here, not in the file
    raise AssertionError(f"name map entries the module lacks: {sorted(stray)}")
  flat, problems = {}, Problems()
  for ours, theirs, rule in names:
    want = rule.torch_shape(expected[ours])
    if theirs not in state:
      problems.missing.append(f"{prefix}{theirs} (expected shape {want})")
    elif tuple(state[theirs].shape) != want:
      if ours not in lenient:
        problems.misshaped.append(
            f"{prefix}{theirs}: expected {want}, found {tuple(state[theirs].shape)}")
    else:
      flat[ours] = np.ascontiguousarray(rule.to_ours(np.asarray(state[theirs], np.float32),
                                                     expected[ours]))
  used = {theirs for _, theirs, _ in names}
  problems.unexpected = [f"{prefix}{k} (shape {tuple(v.shape)})"
                         for k, v in sorted(state.items()) if k not in used]
  return flat, problems


def _config_mismatch(config, state: dict, probes: list, layer_name: str) -> list[str]:
  """'hf_key: config X, weights Y' for each field the weights contradict."""
  found = [(field, key, read(tuple(state[name].shape)))
           for field, key, name, read in probes if name in state]
  layers = {int(m.group(1)) for k in state for m in [re.match(layer_name, k)] if m}
  if layers:
    found.append(("num_layers", "num_hidden_layers", max(layers) + 1))
  return [f"{key}: config {getattr(config, field)}, weights {value}"
          for field, key, value in found if getattr(config, field) != value]


def _raise_problems(path, what: str, problems: Problems, mismatch: list[str],
                    config_label: str = "config.json"):
  lines = [f"checkpoint {path} does not fit {what}:", *problems.lines()]
  if mismatch:
    lines.append(f"  {config_label} ({path / 'config.json'}) does not match the weights: "
                 + "; ".join(mismatch))
  raise CheckpointError("\n".join(lines))


def drop_ignored(state: dict, ignored: list[str]) -> tuple[dict, list[str]]:
  """`state` without the tensors whose names match a pattern of `ignored`, and their names."""
  pattern = re.compile("|".join(ignored))
  dropped = sorted(k for k in state if pattern.match(k))
  return {k: v for k, v in state.items() if k not in dropped}, dropped


def _load_state(path, prefix: str, ignored: list[str]) -> tuple[dict, str]:
  state, prefix = strip_prefix(read_state_dict(path), prefix)
  state, dropped = drop_ignored(state, ignored)
  if dropped:
    log.debug("%s: ignoring %d tensors not used by the encoder: %s", path, len(dropped),
              ", ".join(dropped))
  return state, prefix


def check_tree(path, params: dict, expected: dict):
  got = _flat_shapes(params)
  if got != expected:
    raise AssertionError(f"{path}: converted tree differs from the module: "
                         f"{sorted(set(got.items()) ^ set(expected.items()))}")


def _vocab_ids(path: pathlib.Path, pieces, count: int) -> list[int]:
  """The ids of `pieces` (one per new row) in `path`/vocab.txt (line i holds id i)."""
  if len(pieces) != count:
    raise ValueError(f"{count} new embedding rows but {len(pieces)} pieces to copy: "
                     f"{list(pieces)}")
  vocab = path / "vocab.txt"
  if not vocab.is_file():
    raise FileNotFoundError(f"{vocab} not found: copying rows of word pieces "
                            "(model.text.marker_init) needs the checkpoint's vocabulary")
  ids = {w: i for i, w in enumerate(vocab.read_text(encoding="utf-8").splitlines())}
  missing = [p for p in pieces if p not in ids]
  if missing:
    raise ValueError(f"{vocab} has no piece {missing}: choose pieces of this vocabulary")
  return [ids[p] for p in pieces]


def _normal_rows(seed: int, shape: tuple) -> np.ndarray:
  return (np.random.default_rng(seed).standard_normal(shape) * INIT_STD).astype(np.float32)


# ----------------------------------------------------------------------------
# Public loaders


def load_bert(path, num_extra_tokens: int = 0, seed: int = 0,
              extra_like: tuple[str, ...] = ()) -> tuple[BertConfig, dict]:
  """HF BERT directory (or hub id, `checkpoint_dir`) -> (config, params of
  `BertEncoder(config)`).

  `num_extra_tokens` rows (REMOTE's markers) are appended to the word
  embeddings, drawn from N(0, 0.02), or, with `extra_like` (one word piece of the
  checkpoint's vocab.txt per new row), copies of those pieces' rows; the returned
  config counts them.
  """
  path = checkpoint_dir(path, WEIGHT_FILES + ("vocab.txt",))
  config = _read_config(BertConfig, path)
  state, prefix = _load_state(path, "bert.", BERT_IGNORED)
  state = _legacy_norm_names(state)
  ids = jnp.zeros((1, 1), jnp.int32)
  expected = expected_shapes(BertEncoder(config), ids, ids, ids, True)
  flat, problems = convert_tensors(state, bert_name_map(config), expected, prefix)
  if problems:
    _raise_problems(path, "BertEncoder", problems,
                    _config_mismatch(config, state, BERT_PROBES, BERT_LAYER_NAME))
  if num_extra_tokens:
    word = "embeddings/word_embeddings/embedding"
    if extra_like:
      new_rows = np.asarray(flat[word])[_vocab_ids(path, extra_like, num_extra_tokens)]
    else:
      new_rows = _normal_rows(seed, (num_extra_tokens, config.hidden_size))
    flat[word] = np.concatenate([flat[word], new_rows])
    config = dataclasses.replace(config, vocab_size=config.vocab_size + num_extra_tokens)
    expected = expected_shapes(BertEncoder(config), ids, ids, ids, True)
  params = unflatten_dict(flat, sep="/")
  check_tree(path, params, expected)
  return config, params


def load_clip_vision(path, image_size: int | None = None, patch_size: int | None = None,
                     use_cls: bool = True, use_depth: bool = False,
                     seed: int = 0) -> tuple[CLIPVisionConfig, dict]:
  """HF CLIPModel / CLIPVisionModel directory (or hub id, `checkpoint_dir`) -> (config,
  params of `CLIPVisionTower`).

  A position table that no longer fits (other image size, no CLS) is
  re-initialised N(0, 0.02) with a warning, and `depth_embedding` starts as
  the mean over input channels of the pretrained rgb patch projection: both
  as in the released REMOTE code.
  """
  path = checkpoint_dir(path)
  overrides = {"use_cls": use_cls, "use_depth": use_depth}
  overrides.update({k: v for k, v in {"image_size": image_size, "patch_size": patch_size}.items()
                    if v is not None})
  config = _read_config(CLIPVisionConfig, path, **overrides)
  # The released variant drops the CLS token and so the pooler.
  ignored = CLIP_IGNORED + ([] if use_cls else CLIP_IGNORED_WITHOUT_CLS)
  state, prefix = _load_state(path, "vision_model.", ignored)
  size = config.image_size
  inputs = [jnp.zeros((1, size, size, 3))] + ([jnp.zeros((1, size, size, 1))] if use_depth else [])
  expected = expected_shapes(CLIPVisionTower(config), *inputs)
  positions = "embeddings/position_embedding/embedding"
  names = clip_name_map(config)
  flat, problems = convert_tensors(state, names, expected, prefix, lenient=[positions])
  if problems:
    _raise_problems(path, "CLIPVisionTower", problems,
                    _config_mismatch(config, state, CLIP_PROBES, CLIP_LAYER_NAME),
                    "config.json with the image_size/patch_size arguments")
  if positions not in flat:
    found = tuple(state["embeddings.position_embedding.weight"].shape)
    log.warning("%s: pretrained position table %s does not fit %d positions (image %d, "
                "patch %d, cls %s): re-initialised N(0, %g)", path, found, config.num_positions,
                size, config.patch_size, use_cls, INIT_STD)
    flat[positions] = _normal_rows(seed, expected[positions])
  if use_depth:
    rgb = flat["embeddings/patch_embedding/kernel"]
    flat["embeddings/depth_embedding/kernel"] = (
        rgb.reshape(-1, 3, config.hidden_size).mean(axis=1))
  params = unflatten_dict(flat, sep="/")
  check_tree(path, params, expected)
  return config, params


def save_clip_vision(directory, config: CLIPVisionConfig, params) -> pathlib.Path:
  """Our CLIPVisionTower params (without CLS or depth) -> a CLIPVisionModel directory in HF's
  names and layouts (config.json, model.safetensors) that `load_clip_vision(use_cls=False)`
  reads back: how a tower trained here (remote_jax/towers.py) is loaded as any pretrained
  encoder is. Its position table has no CLS row, so HF's own CLIP does not load it."""
  from safetensors.numpy import save_file
  if config.use_cls or config.use_depth:
    raise ValueError("save_clip_vision writes towers without CLS and depth tokens (an HF "
                     "CLIPVisionModel's CLS pooler and our depth projection have no slot there)")
  flat = flatten_dict(jax.device_get(params), sep="/")
  names = clip_name_map(config)
  missing = sorted({ours for ours, _, _ in names} - set(flat))
  if missing:
    raise ValueError(f"save_clip_vision: params lack {missing[:5]}")
  tensors = {f"vision_model.{theirs}": np.ascontiguousarray(rule.to_torch(np.asarray(flat[ours],
                                                                                     np.float32)))
             for ours, theirs, rule in names}
  d = config.hidden_size
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  hf = {"model_type": "clip_vision_model", "hidden_size": d,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
        "intermediate_size": config.intermediate_size, "image_size": config.image_size,
        "patch_size": config.patch_size, "layer_norm_eps": config.layer_norm_eps,
        "hidden_act": "quick_gelu", "num_channels": 3,
        "attention_dropout": config.attention_dropout,
        "initializer_range": config.initializer_range}
  (directory / "config.json").write_text(json.dumps(hf, indent=1))
  save_file(tensors, str(directory / "model.safetensors"))
  return directory
