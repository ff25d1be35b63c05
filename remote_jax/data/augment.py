"""Text augmentation of training examples (MI²RAGE appendix, "the same as used in MNRE").

Of the sentence's word pieces outside the entity spans, a fraction `data.text_augment` is
chosen at random; each chosen piece becomes [MASK] with probability
`data.text_augment_mask`, else a random piece of the base vocabulary. Markers, the pieces
between an opening and its closing marker, [CLS]/[SEP]/[PAD] and the caption segment are
never touched. Applied to the training split only, after shuffling and repeating, so each
epoch draws new positions; grain seeds each element's generator from (seed, position in
the stream), which makes a resumed run draw the same ones.
"""
import grain
import numpy as np

from remote_jax.config import setting
from remote_jax.data.tokenizer import MARKERS

OPENING = tuple(m for m in MARKERS if not m.startswith("</"))


def check_settings(rate, mask_prob):
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"data.text_augment={rate}: the fraction of non-entity word pieces to "
                     "change, in [0, 1) (0 turns augmentation off)")
  if not 0.0 <= mask_prob <= 1.0:
    raise ValueError(f"data.text_augment_mask={mask_prob}: the probability that a chosen "
                     "piece becomes [MASK] (else a random piece), in [0, 1]")


class TextAugment(grain.transforms.RandomMap):
  """Masks or replaces `rate` of an example's non-entity sentence pieces (module doc)."""

  def __init__(self, rate, mask_prob, *, mask_id, special_ids, marker_ids, base_vocab_size):
    check_settings(rate, mask_prob)
    self.rate, self.mask_prob = float(rate), float(mask_prob)
    self.mask_id, self.base_vocab_size = int(mask_id), int(base_vocab_size)
    self.special_ids = np.asarray(sorted(set(special_ids)), np.int32)
    self.open_ids = np.asarray([marker_ids[m] for m in OPENING], np.int32)
    self.close_ids = np.asarray([marker_ids[m] for m in MARKERS if m not in OPENING],
                                np.int32)

  @classmethod
  def from_config(cls, config_data, tokenizer, marker_ids):
    return cls(float(setting(config_data, "text_augment")),
               float(setting(config_data, "text_augment_mask")),
               mask_id=tokenizer.mask_id,
               special_ids=(tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id,
                            tokenizer.mask_id),
               marker_ids=marker_ids, base_vocab_size=tokenizer.base_vocab_size)

  def eligible(self, element):
    """Positions that may change: real sentence pieces outside every marked span."""
    ids = np.asarray(element["input_ids"])
    depth = (np.cumsum(np.isin(ids, self.open_ids)) - np.cumsum(np.isin(ids, self.close_ids)))
    return ((np.asarray(element["attention_mask"]) == 1)
            & (np.asarray(element["token_type_ids"]) == 0)
            & (ids < self.base_vocab_size) & ~np.isin(ids, self.special_ids) & (depth <= 0))

  def random_map(self, element, rng):
    positions = np.flatnonzero(self.eligible(element))
    n = int(round(self.rate * len(positions)))
    if n == 0:
      return element
    chosen = rng.choice(positions, size=n, replace=False)
    random_ids = rng.integers(0, self.base_vocab_size, size=n)
    random_ids = np.where(np.isin(random_ids, self.special_ids), self.mask_id, random_ids)
    ids = np.array(element["input_ids"], copy=True)
    ids[chosen] = np.where(rng.random(n) < self.mask_prob, self.mask_id, random_ids)
    return {**element, "input_ids": ids.astype(ids.dtype)}
