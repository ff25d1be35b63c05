"""Converter: HF checkpoint directories -> our parameter trees, and its errors.

Checkpoints are written as PyTorch-named safetensors from HF Flax models'
random parameters (no torch needed); the helpers are reused by
test_encoders.py.
"""
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import unfreeze
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from remote_jax.models.convert import (
  CheckpointError,
  expected_shapes,
  load_bert,
  load_clip_vision,
)
from remote_jax.models.encoders import BertEncoder, CLIPVisionTower

LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_named(flax_params) -> dict[str, np.ndarray]:
  """HF Flax parameters -> the tensors HF's PyTorch model would save."""
  out = {}
  for (*modules, leaf), x in flatten_dict(unfreeze(flax_params)).items():
    x = np.asarray(x, np.float32)
    if leaf == "kernel":  # Linear (in, out) -> (out, in); Conv (kh, kw, in, out) -> (out, in, kh, kw)
      x = x.transpose(3, 2, 0, 1) if x.ndim == 4 else x.T
    out[".".join([*modules, LEAF_TO_TORCH.get(leaf, leaf)])] = np.ascontiguousarray(x)
  return out


def write_checkpoint(directory: pathlib.Path, config: dict, tensors: dict) -> pathlib.Path:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  save_file(tensors, str(directory / "model.safetensors"))
  return directory


def random_like(shapes, seed: int = 0):
  """Random float32 numpy parameters for a tree of shapes (from eval_shape).

  Initialisers compile a random draw per tensor (several seconds on these
  2 shared cores); numpy takes milliseconds.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    x = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    return x + 1.0 if path[-1].key == "scale" else x  # LayerNorm gains near 1

  return jax.tree_util.tree_map_with_path(draw, unfreeze(shapes))


def random_hf_params(model, seed: int = 0):
  """Random parameters in the HF model's layout."""
  return random_like(jax.eval_shape(
      lambda: model.init_weights(jax.random.key(0), model.input_shape)), seed)


def tiny_hf_bert(directory: pathlib.Path):
  """A random 2-layer HF BERT saved to `directory`; returns (Flax model, params)."""
  from transformers import BertConfig as HFBertConfig
  from transformers import FlaxBertModel
  # Odd sizes (intermediate 37, vocab 99) catch transposed layouts.
  config = HFBertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40, type_vocab_size=2)
  model = FlaxBertModel(config, _do_init=False)
  params = random_hf_params(model)
  write_checkpoint(directory, config.to_dict(), torch_named(params))
  return model, params


def tiny_hf_clip_vision(directory: pathlib.Path, full_clip_model: bool = False):
  """A random 2-layer HF CLIP vision tower (224 px, patch 32) saved to `directory`;
  returns (Flax model, params)."""
  from transformers import CLIPVisionConfig as HFCLIPVisionConfig
  from transformers import FlaxCLIPVisionModel
  config = HFCLIPVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, image_size=224, patch_size=32)
  model = FlaxCLIPVisionModel(config, _do_init=False)
  params = random_hf_params(model)
  tensors, saved = torch_named(params), config.to_dict()
  if full_clip_model:  # CLIPModel layout: a text tower and projections that we ignore
    tensors.update({"text_model.embeddings.token_embedding.weight": np.zeros((10, 64), np.float32),
                    "visual_projection.weight": np.zeros((16, 64), np.float32),
                    "logit_scale": np.zeros((), np.float32)})
    saved = {"model_type": "clip", "vision_config": saved, "text_config": {"hidden_size": 64}}
  write_checkpoint(directory, saved, tensors)
  return model, params


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_bert")
  tiny_hf_bert(d)
  return d


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_clip")
  tiny_hf_clip_vision(d)
  return d


def edited_copy(src: pathlib.Path, dst: pathlib.Path, tensors=None, config=None) -> pathlib.Path:
  """Copy of a checkpoint with `tensors(dict)` / `config(dict)` edits applied in place."""
  state = load_file(str(src / "model.safetensors"))
  raw = json.loads((src / "config.json").read_text())
  if tensors:
    tensors(state)
  if config:
    config(raw)
  return write_checkpoint(dst, raw, state)


def flat_shapes(params) -> dict:
  return {"/".join(k): tuple(v.shape) for k, v in flatten_dict(params).items()}


def test_bert_params_match_module_and_layout(bert_dir):
  config, params = load_bert(bert_dir)
  ids = jnp.zeros((1, 1), jnp.int32)
  assert flat_shapes(params) == expected_shapes(BertEncoder(config), ids, ids, ids, True)
  assert all(isinstance(v, np.ndarray) and v.dtype == np.float32
             for v in flatten_dict(params).values())
  state = load_file(str(bert_dir / "model.safetensors"))
  query = state["encoder.layer.1.attention.self.query.weight"]  # (out, in)
  np.testing.assert_array_equal(params["layers_1"]["query"]["kernel"], query.T.reshape(32, 4, 8))
  out = state["encoder.layer.1.attention.output.dense.weight"]
  np.testing.assert_array_equal(params["layers_1"]["attention_output"]["kernel"],
                                out.T.reshape(4, 8, 32))


def test_bert_prefix_and_heads_are_ignored(bert_dir, tmp_path, caplog):
  def add_prefix_and_heads(state):
    for k in list(state):
      state["bert." + k] = state.pop(k)
    state["cls.predictions.bias"] = np.zeros(99, np.float32)
    state["bert.embeddings.position_ids"] = np.arange(40)[None]

  d = edited_copy(bert_dir, tmp_path / "mlm", tensors=add_prefix_and_heads)
  with caplog.at_level(logging.DEBUG, logger="remote_jax.models.convert"):
    _, prefixed = load_bert(d)
  _, plain = load_bert(bert_dir)
  for k, v in flatten_dict(plain).items():
    np.testing.assert_array_equal(flatten_dict(prefixed)[k], v)
  assert "cls.predictions.bias" in caplog.text and "pooler.dense.weight" in caplog.text


def test_renamed_and_misshaped_tensors_are_all_listed(bert_dir, tmp_path):
  def corrupt(state):
    state["encoder.layer.1.output.dense_renamed.weight"] = state.pop(
        "encoder.layer.1.output.dense.weight")
    state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((36, 32), np.float32)

  d = edited_copy(bert_dir, tmp_path / "bad", tensors=corrupt)
  with pytest.raises(CheckpointError) as e:
    load_bert(d)
  msg = str(e.value)
  assert str(d) in msg
  assert "missing: encoder.layer.1.output.dense.weight (expected shape (32, 37))" in msg
  assert "unexpected: encoder.layer.1.output.dense_renamed.weight" in msg
  assert ("mis-shaped: encoder.layer.0.intermediate.dense.weight: expected (37, 32), "
          "found (36, 32)") in msg


@pytest.mark.parametrize("field, value, expected", [
    ("num_hidden_layers", 3, "num_hidden_layers: config 3, weights 2"),
    ("hidden_size", 64, "hidden_size: config 64, weights 32"),
])
def test_config_that_does_not_match_the_weights(bert_dir, tmp_path, field, value, expected):
  d = edited_copy(bert_dir, tmp_path / "cfg", config=lambda c: c.update({field: value}))
  with pytest.raises(CheckpointError, match="config.json .* does not match the weights") as e:
    load_bert(d)
  assert expected in str(e.value)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.pop("hidden_size"), "missing field 'hidden_size'"),
    (lambda c: c.update(hidden_act="relu"), "unsupported field 'hidden_act' = 'relu'"),
    (lambda c: c.update(num_attention_heads=5), "not divisible by num_attention_heads 5"),
    (lambda c: c.update(vocab_size="99"), "invalid field 'vocab_size'"),
])
def test_invalid_config_json(bert_dir, tmp_path, edit, expected):
  d = edited_copy(bert_dir, tmp_path / "cfg", config=edit)
  with pytest.raises(CheckpointError, match=expected) as e:
    load_bert(d)
  assert str(d / "config.json") in str(e.value)


def test_missing_directory_config_and_weights(bert_dir, tmp_path):
  def single_line_error(path, fragment):
    with pytest.raises(CheckpointError, match=fragment) as e:
      load_bert(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)

  single_line_error(tmp_path / "nowhere", "no checkpoint directory")
  (tmp_path / "empty").mkdir()
  single_line_error(tmp_path / "empty", "has no config.json")
  (tmp_path / "empty" / "config.json").write_text((bert_dir / "config.json").read_text())
  single_line_error(tmp_path / "empty", "has no weights: expected model.safetensors")
  try:
    import torch  # noqa: F401
  except ImportError:
    (tmp_path / "empty" / "pytorch_model.bin").write_bytes(b"")
    single_line_error(tmp_path / "empty", "only pytorch_model.bin .* convert it to model.safetensors")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
  """The hub offline (HF_HUB_OFFLINE=1) with an empty cache."""
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
  return constants


@pytest.mark.parametrize("load,hub_id,files", [
    (load_bert, "bert-base-uncased", "config.json model.safetensors vocab.txt"),
    (load_clip_vision, "openai/clip-vit-base-patch32", "config.json model.safetensors")])
def test_hub_id_offline_says_what_to_download_where(no_hub, load, hub_id, files):
  with pytest.raises(CheckpointError) as e:
    load(hub_id)
  msg = str(e.value)
  assert "\n" not in msg
  assert f"pretrained_dir {hub_id!r} is not a local directory and the hub is offline " \
         "(HF_HUB_OFFLINE=1)" in msg
  assert f"huggingface-cli download {hub_id} {files} --local-dir DIR" in msg
  assert "(DIR/config.json, DIR/model.safetensors) and set pretrained_dir to it" in msg


def test_hub_id_without_network_says_the_download_failed(no_hub, monkeypatch):
  import huggingface_hub
  from huggingface_hub.errors import LocalEntryNotFoundError

  def no_network(*args, **kwargs):
    raise LocalEntryNotFoundError("An error happened while trying to locate the files")
  monkeypatch.setattr(no_hub, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
  with pytest.raises(CheckpointError, match=r"could not be downloaded \(LocalEntryNotFound"
                     r"Error\): on a machine with hub access run `huggingface-cli download "
                     r"bert-base-uncased config.json"):
    load_bert("bert-base-uncased")


@pytest.mark.parametrize("path", ["../bert-base-uncased", "runs/a/bert", "/no/such/bert"])
def test_a_local_path_that_is_no_hub_id_keeps_its_error(no_hub, path):
  with pytest.raises(CheckpointError, match="no checkpoint directory at .*huggingface-cli "
                     "download REPO"):
    load_bert(path)


def test_hub_id_online_is_fetched_and_converted(bert_dir, tmp_path, monkeypatch):
  """snapshot_download (here a stand-in writing the tiny checkpoint, as the hub would: only
  the allowed files) gives the directory the real converter reads."""
  import fnmatch
  import shutil

  import huggingface_hub
  calls = []

  def snapshot_download(repo_id, allow_patterns):
    calls.append((repo_id, allow_patterns))
    out = tmp_path / "snapshot"
    out.mkdir()
    for f in bert_dir.iterdir():
      if any(fnmatch.fnmatch(f.name, p) for p in allow_patterns):
        shutil.copy(f, out / f.name)
    (out / "vocab.txt").write_text("\n".join(f"w{i}" for i in range(99)))
    return str(out)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  config, params = load_bert("google/tiny-bert", num_extra_tokens=2, extra_like=("w3", "w7"))
  assert calls == [("google/tiny-bert", ["config.json", "model.safetensors",
                                         "model.safetensors.index.json", "model-*.safetensors",
                                         "vocab.txt"])]
  want_config, want = load_bert(bert_dir)
  assert config.vocab_size == want_config.vocab_size + 2
  table = params["embeddings"]["word_embeddings"]["embedding"]
  np.testing.assert_array_equal(table[-2:], table[[3, 7]])
  params["embeddings"]["word_embeddings"]["embedding"] = table[:-2]
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_marker_rows_are_appended(minilm_dir):
  config, params = load_bert(minilm_dir, num_extra_tokens=12, seed=3)
  old = load_file(str(minilm_dir / "model.safetensors"))["embeddings.word_embeddings.weight"]
  table = params["embeddings"]["word_embeddings"]["embedding"]
  assert config.vocab_size == old.shape[0] + 12 and table.shape == (old.shape[0] + 12, 384)
  np.testing.assert_array_equal(table[:-12], old)
  new = table[-12:]
  assert abs(new.std() - 0.02) < 0.002 and abs(new.mean()) < 0.002
  _, again = load_bert(minilm_dir, num_extra_tokens=12, seed=3)
  np.testing.assert_array_equal(again["embeddings"]["word_embeddings"]["embedding"], table)


def test_clip_model_and_vision_model_layouts_agree(clip_dir, tmp_path):
  tiny_hf_clip_vision(tmp_path / "full", full_clip_model=True)
  config, vision = load_clip_vision(clip_dir)
  _, full = load_clip_vision(tmp_path / "full")
  pixels = jnp.zeros((1, 224, 224, 3))
  assert flat_shapes(vision) == expected_shapes(CLIPVisionTower(config), pixels)
  for k, v in flatten_dict(vision).items():
    np.testing.assert_array_equal(flatten_dict(full)[k], v)


def test_clip_remote_variant_depth_and_positions(clip_dir, caplog):
  with caplog.at_level(logging.WARNING, logger="remote_jax.models.convert"):
    config, params = load_clip_vision(clip_dir, image_size=64, use_cls=False, use_depth=True, seed=1)
  assert (config.num_patches, config.num_tokens) == (4, 8)
  assert "re-initialised" in caplog.text
  emb = params["embeddings"]
  assert "class_embedding" not in emb and "post_layernorm" not in params
  rgb = load_file(str(clip_dir / "model.safetensors"))["vision_model.embeddings.patch_embedding.weight"]
  depth = rgb.mean(axis=1, keepdims=True).transpose(2, 3, 1, 0).reshape(32 * 32, 64)
  np.testing.assert_allclose(emb["depth_embedding"]["kernel"], depth, rtol=1e-6, atol=1e-7)
  positions = emb["position_embedding"]["embedding"]
  assert positions.shape == (4, 64) and 0.015 < positions.std() < 0.025


def test_clip_patch_size_that_does_not_fit(clip_dir):
  with pytest.raises(CheckpointError) as e:
    load_clip_vision(clip_dir, patch_size=16)
  msg = str(e.value)
  assert "mis-shaped: vision_model.embeddings.patch_embedding.weight: expected (64, 3, 16, 16)" in msg
  assert "patch_size: config 16, weights 32" in msg


def test_marker_rows_can_start_as_copies_of_word_pieces(minilm_dir, tmp_path):
  """extra_like (model.text.marker_init="punct"): each new row is the named piece's row;
  a piece the vocabulary lacks, or a count that does not match, is a clear error."""
  from remote_jax.data.tokenizer import PUNCT_MARKERS
  _, params = load_bert(minilm_dir, num_extra_tokens=12, extra_like=PUNCT_MARKERS)
  table = params["embeddings"]["word_embeddings"]["embedding"]
  vocab = (minilm_dir / "vocab.txt").read_text(encoding="utf-8").splitlines()
  for row, piece in zip(table[-12:], PUNCT_MARKERS):
    np.testing.assert_array_equal(row, table[vocab.index(piece)])
  assert not np.array_equal(table[-12], table[-10])   # "@" and "#": two markers, two rows
  with pytest.raises(ValueError, match=r"has no piece \['<nope>'\]"):
    load_bert(minilm_dir, num_extra_tokens=1, extra_like=("<nope>",))
  with pytest.raises(ValueError, match="12 new embedding rows but 1 pieces"):
    load_bert(minilm_dir, num_extra_tokens=12, extra_like=("@",))
