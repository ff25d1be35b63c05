"""Text augmentation: what it may touch, how much, with what, and the same draws on a rerun."""
import numpy as np
import pytest

from configs import common
from remote_jax.data import augment, pipeline
from remote_jax.data.tokenizer import RelationTokenizer

SENTENCE = "<s1> Alice Smith </s1> met <s2> Bob </s2> in the old city of Paris on a rainy day"


@pytest.fixture(scope="module")
def tok(minilm_dir):
  return RelationTokenizer(minilm_dir, max_length=40)


def make(tok, rate, mask_prob=0.8):
  return augment.TextAugment(
      rate, mask_prob, mask_id=tok.mask_id,
      special_ids=(tok.cls_id, tok.sep_id, tok.pad_id, tok.mask_id),
      marker_ids=tok.marker_ids, base_vocab_size=tok.base_vocab_size)


@pytest.fixture(scope="module")
def example(tok):
  return tok.encode(SENTENCE, "a caption about the city")


def test_only_words_outside_the_entity_spans_may_change(tok, example):
  aug = make(tok, 0.5)
  pieces = tok.decode_ids(example["input_ids"])
  eligible = aug.eligible(example)
  chosen = [p for p, ok in zip(pieces, eligible) if ok]
  assert chosen == tok.tokenize("met in the old city of Paris on a rainy day")
  for seed in range(20):
    out = aug.random_map(example, np.random.default_rng(seed))
    changed = out["input_ids"] != example["input_ids"]
    assert not changed[~eligible].any(), seed
    for k in ("token_type_ids", "attention_mask"):
      np.testing.assert_array_equal(out[k], example[k])


def test_the_configured_fraction_is_chosen_and_masked(tok, example):
  n = int(make(tok, 0.3).eligible(example).sum())
  always_mask = make(tok, 0.3, mask_prob=1.0)
  for seed in range(10):
    out = always_mask.random_map(example, np.random.default_rng(seed))
    assert (out["input_ids"] == tok.mask_id).sum() == round(0.3 * n)
  # mask_prob 0.8: of all chosen pieces, about 80% become [MASK] (over 400 draws)
  aug, masked, chosen = make(tok, 0.3), 0, 0
  for seed in range(400):
    out = aug.random_map(example, np.random.default_rng(seed))
    masked += int((out["input_ids"] == tok.mask_id).sum())
    chosen += round(0.3 * n)
  assert abs(masked / chosen - 0.8) < 0.04
  never_mask = make(tok, 0.3, mask_prob=0.0).random_map(example, np.random.default_rng(0))
  replaced = never_mask["input_ids"] != example["input_ids"]
  assert replaced.sum() >= round(0.3 * n) - 1       # a random piece may equal the old one
  assert (never_mask["input_ids"][replaced] < tok.base_vocab_size).all()   # never a marker


def test_settings_out_of_range_name_the_field():
  with pytest.raises(ValueError, match=r"data.text_augment=1.5"):
    augment.check_settings(1.5, 0.8)
  with pytest.raises(ValueError, match=r"data.text_augment_mask=-0.1"):
    augment.check_settings(0.3, -0.1)


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
  cache = tmp_path_factory.mktemp("demo_cache")
  cfg = common.data_config("demo", cache_dir=str(cache), max_length=32,
                           crop_size=8, text_augment=0.3, num_objects=6).to_dict()
  cfg["demo"] = dict(cfg["demo"], seed=1, n_train=12, n_val=3, n_test=3, image_size=32)
  return cfg


def batches(cfg, augment_on):
  ds = pipeline.build_map_dataset(cfg, "train", batch_size=4, shuffle=True, seed=5,
                                  num_epochs=2, augment=augment_on)
  return [ds[i] for i in range(len(ds))]


def test_pipeline_augments_training_text_only_and_repeats_its_draws(demo_data):
  plain, first, again = batches(demo_data, False), batches(demo_data, True), batches(demo_data, True)
  changed = 0
  for p, a, b in zip(plain, first, again):
    for k in p:
      np.testing.assert_array_equal(a[k], b[k])          # a rerun (or resume) draws the same
      if k != "input_ids":
        np.testing.assert_array_equal(p[k], a[k])
    changed += int((p["input_ids"] != a["input_ids"]).sum())
  assert changed > 0
  # The second epoch sees each example again with other positions changed.
  epoch = len(plain) // 2
  by_index = lambda bs: {int(i): ids for b in bs for i, ids in zip(b["index"], b["input_ids"])}
  e1, e2 = by_index(first[:epoch]), by_index(first[epoch:])
  assert any((e1[i] != e2[i]).any() for i in e1)
  off = dict(demo_data, text_augment=0.0)
  for p, a in zip(plain, batches(off, True)):
    np.testing.assert_array_equal(p["input_ids"], a["input_ids"])
