"""grain input pipeline over the cached tfds ArrayRecord split (batch contract: design.md s.1).

source -> [shuffle(seed), reshuffled each epoch] -> per-host slice -> repeat -> [eval: pad to
whole batches with mask=False rows] -> normalise pixels -> [train: text augmentation] -> batch. Shuffling happens before the
host slice, so in every epoch the hosts read disjoint parts of one global permutation.
"""
import json

import grain
import numpy as np

from remote_jax.data import augment as augment_lib
from remote_jax.data import batch_spec
from remote_jax.data import builder as builder_lib
from remote_jax.writers import jsonable

CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)
_BUILDERS = {}
CONTRACT_DTYPES = {k: dtype for k, (_, dtype) in batch_spec.example_spec(1, 1, 1).items()}


def get_builder(config_data):
  """The prepared builder for `config_data`, built on first use and memoised per process."""
  key = json.dumps(jsonable(config_data), sort_keys=True)
  if key not in _BUILDERS:
    _BUILDERS[key] = builder_lib.prepare(config_data)
  return _BUILDERS[key]


def dataset_meta(config_data):
  """dict(relations, negative_id, num_classes, vocab_size, base_vocab_size, marker_ids,
  max_length, num_objects, crop_size, splits (name -> examples), skipped (split -> counts),
  buckets (split -> {bucket name: example indices}))."""
  return builder_lib.meta_from_builder(get_builder(config_data), config_data)


class ToBatchContract(grain.transforms.Map):
  """Stored example -> batch-contract element: uint8 crops become CLIP-normalised float32
  `obj_pixels` (empty slots stay exactly zero: the reference pads with zero tensors after
  normalising) and integer scalars return to int32 (tfds stores them as int64)."""

  def map(self, element):
    out = {k: np.asarray(v, CONTRACT_DTYPES.get(k)) for k, v in element.items()}
    pixels = out.pop("obj_pixels_u8").astype(np.float32) * np.float32(1 / 255)
    pixels = (pixels - CLIP_MEAN) / CLIP_STD
    out["obj_pixels"] = pixels * out["obj_mask"][:, None, None, None]
    return out


class PadTo:
  """Rows past the end repeat row 0 with mask=False and index=-1 (eval padding)."""

  def __init__(self, parent, fallback):
    self.parent, self.fallback = parent, fallback

  def __call__(self, i):
    if i < len(self.parent):
      return self.parent[i]
    row = dict(self.parent[0] if len(self.parent) else self.fallback[0])
    row["mask"], row["index"] = np.bool_(False), np.int32(-1)
    return row


def _host(shard_index, shard_count):
  if shard_index is None or shard_count is None:
    import jax
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index={shard_index} not in [0, {shard_count})")
  return shard_index, shard_count


def text_augment(config_data):
  """The training map of `data.text_augment` (augment.py), or None where it is 0."""
  rate = float(builder_lib.setting(config_data, "text_augment"))
  augment_lib.check_settings(rate, float(builder_lib.setting(config_data, "text_augment_mask")))
  if rate == 0:
    return None
  return augment_lib.TextAugment.from_config(
      config_data, builder_lib.make_tokenizer(config_data), dataset_meta(config_data)["marker_ids"])


def build_map_dataset(config_data, split, *, batch_size, shuffle=False, seed=0, num_epochs=1,
                      shard_index=None, shard_count=None, drop_remainder=None, augment=False):
  """grain MapDataset of batches for this host.

  drop_remainder (default: `shuffle`): True drops the partial last batch and trims the split to
  a multiple of shard_count so hosts step together; False pads the last batch of each epoch with
  mask=False rows, to the same batch count on every host, so every example counts exactly once.
  num_epochs=None repeats forever. augment=True applies `data.text_augment` (training only).
  """
  shard_index, shard_count = _host(shard_index, shard_count)
  drop_remainder = shuffle if drop_remainder is None else drop_remainder
  source = get_builder(config_data).as_data_source(split)
  n = len(source)
  if n == 0:
    raise ValueError(f"split {split!r} of {builder_lib.setting(config_data, 'name')} is empty")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed)
  if drop_remainder:
    ds = ds[:n - n % shard_count]
  ds = ds[shard_index::shard_count]
  if not drop_remainder:
    per_host = -(-n // shard_count)
    padded = -(-per_host // batch_size) * batch_size
    ds = grain.MapDataset.range(padded).map(PadTo(ds, grain.MapDataset.source(source)))
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(ToBatchContract())
  transform = text_augment(config_data) if augment else None
  if transform is not None:
    ds = ds.random_map(transform, seed=seed)
  return ds.batch(batch_size, drop_remainder=drop_remainder)


def build_dataset(config_data, split, *, batch_size, shuffle=False, seed=0, num_epochs=1,
                  shard_index=None, shard_count=None, drop_remainder=None, worker_count=0,
                  read_threads=2, augment=False):
  """The host's batch stream as a grain IterDataset; `iter(ds)` has get_state()/set_state()
  for checkpointing. worker_count > 0 decodes in that many processes (needs a __main__ guard
  and parsed absl flags)."""
  ds = build_map_dataset(config_data, split, batch_size=batch_size, shuffle=shuffle, seed=seed,
                         num_epochs=num_epochs, shard_index=shard_index,
                         shard_count=shard_count, drop_remainder=drop_remainder,
                         augment=augment)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=2 * batch_size))
  if worker_count:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it
