"""RelationTokenizer: marker ids, pair encoding, 4.11 longest_first truncation, errors."""
import numpy as np
import pytest

from remote_jax.data import tokenizer as tokenizer_lib
from remote_jax.data.tokenizer import MARKERS, RelationTokenizer


@pytest.fixture(scope="module")
def tok(minilm_dir):
  return RelationTokenizer(minilm_dir, max_length=16)


def test_markers_are_single_tokens_after_base_vocab(tok):
  assert tok.base_vocab_size == 30522
  assert tok.vocab_size == 30522 + 12
  assert list(tok.marker_ids) == list(MARKERS)
  assert list(tok.marker_ids.values()) == list(range(30522, 30534))
  for m in MARKERS:
    assert tok.tokenize(f"x {m} y") == ["x", m, "y"]


def test_default_directory_is_minilm(minilm_dir):
  assert RelationTokenizer(max_length=8).directory == minilm_dir


def test_pair_layout_types_and_padding(tok):
  out = tok.encode("<s1> Alice </s1> met <s2> Bob </s2>", "<k1> a singer </k1>")
  assert set(out) == {"input_ids", "token_type_ids", "attention_mask"}
  assert all(v.dtype == np.int32 and v.shape == (16,) for v in out.values())
  tokens = tok.decode_ids(out["input_ids"])
  assert tokens[:12] == ["[CLS]", "<s1>", "alice", "</s1>", "met", "<s2>", "bob", "</s2>",
                         "[SEP]", "<k1>", "a", "singer"]
  assert tokens[12:] == ["</k1>", "[SEP]", "[PAD]", "[PAD]"]
  np.testing.assert_array_equal(out["token_type_ids"], [0] * 9 + [1] * 5 + [0] * 2)
  np.testing.assert_array_equal(out["attention_mask"], [1] * 14 + [0] * 2)


def test_single_sequence_and_truncation(tok):
  out = tok.encode(" ".join(["word"] * 30))
  assert tok.decode_ids(out["input_ids"])[-1] == "[SEP]"
  assert out["attention_mask"].sum() == 16 and out["token_type_ids"].sum() == 0


def test_longest_first_matches_reference_loop():
  # 4.11: remove from the longer side one token at a time; ties remove from the pair.
  assert tokenizer_lib.truncate_pair([1, 2, 3, 4, 5], [6, 7], 3) == ([1, 2], [6, 7])
  assert tokenizer_lib.truncate_pair([1, 2, 3], [4, 5, 6], 3) == ([1, 2], [4])
  assert tokenizer_lib.truncate_pair([1, 2], [3, 4, 5, 6, 7], 4) == ([1, 2], [3])
  assert tokenizer_lib.truncate_pair([1, 2, 3], None, 2) == ([1], None)


def test_long_pair_truncates_the_longer_side(tok):
  out = tok.encode("a b c", "<k1> " + " ".join(["x"] * 20) + " </k1>")
  tokens = tok.decode_ids(out["input_ids"])
  assert tokens[:5] == ["[CLS]", "a", "b", "c", "[SEP]"]  # sentence kept, caption cut
  assert tokens[-1] == "[SEP]" and "</k1>" not in tokens and out["attention_mask"].all()


def test_directory_without_vocab_is_one_clear_error(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.json or vocab\.txt") as e:
    RelationTokenizer(tmp_path)
  assert str(tmp_path) in str(e.value)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    RelationTokenizer(tmp_path / "nope")
