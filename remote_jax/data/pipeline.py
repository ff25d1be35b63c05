"""grain input pipeline over the cached tfds ArrayRecord split (batch contract: design.md s.1).

example indices -> [shuffle(seed), reshuffled each epoch] -> BatchPlan ([eval: pad to whole
global batches with mask=False rows], [train: group by length], each global batch's token
length) -> per-host slice -> repeat -> read -> normalise pixels -> [train: text augmentation]
-> batch -> [cut to the planned length]. The plan is made before the host slice, so in every
epoch the hosts read disjoint parts of one global permutation and cut a batch alike.
"""
import json
import threading

import grain
import numpy as np

from remote_jax import config as config_lib
from remote_jax.data import augment as augment_lib
from remote_jax.data import batch_spec
from remote_jax.data import builder as builder_lib
from remote_jax.writers import jsonable

CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)


def clip_normalise(pixels_u8):
  """uint8 crops -> the float32 the vision tower reads: [0, 1], then CLIP's mean and std."""
  return (pixels_u8.astype(np.float32) * np.float32(1 / 255) - CLIP_MEAN) / CLIP_STD


_BUILDERS = {}
CONTRACT_DTYPES = {k: dtype for k, (_, dtype) in batch_spec.example_spec(1, 1, 1).items()}
TOKEN_FIELDS = tuple(k for k, f in batch_spec.FIELDS.items() if f.dims[:1] == ("L",))
_LENGTHS = {}


def _config_key(config_data):
  """The memo key of a data config (a dict or ConfigDict)."""
  return json.dumps(jsonable(config_data), sort_keys=True)


def get_builder(config_data):
  """The prepared builder for `config_data`, built on first use and memoised per process."""
  key = _config_key(config_data)
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
    pixels = clip_normalise(out.pop("obj_pixels_u8"))
    out["obj_pixels"] = pixels * out["obj_mask"][:, None, None, None]
    return out


class ReadRows(grain.transforms.Map):
  """(example index, padded length) of `BatchPlan` -> the stored example, with `pad_to`; index
  -1 is an eval padding row: example 0 with mask=False and index=-1."""

  def __init__(self, source):
    self.source = source

  def map(self, item):
    i, pad_to = item
    row = dict(self.source[max(int(i), 0)])
    if i < 0:
      row["mask"], row["index"] = np.bool_(False), np.int32(-1)
    row["pad_to"] = np.int32(pad_to)
    return row


class BatchPlan(grain.MapDataset):
  """A stream of example indices -> (example index, padded token length) per position,
  planned per global batch (`global_batch` consecutive positions, all hosts' rows).

  Each epoch of `parent` (epoch-aware indices, as grain's shuffle and slice give) is
  extended to `epoch_length` with padding rows (index -1). With `window`, every run of
  `window` global batches is sorted by example length and its batches shuffled (seeded
  by seed, epoch and run), so a batch holds sentences of similar length (HF's
  group_by_length). With `multiple`, a position carries the smallest multiple of it that
  holds the longest example of its global batch (at most max_length), so every host cuts
  its rows of a batch to the same length; without, max_length.
  """

  def __init__(self, parent, epoch_length, *, global_batch, max_length, lengths=None,
               multiple=0, window=0, seed=0):
    super().__init__(parent)
    if (multiple or window) and lengths is None:
      raise ValueError("BatchPlan: multiple and window need the example lengths")
    self._n, self._epoch_length = len(parent), epoch_length
    self._global_batch, self._max_length = global_batch, max_length
    self._lengths, self._multiple, self._window, self._seed = lengths, multiple, window, seed
    self._orders, self._pad_tos = {}, {}   # epoch -> order, global batch -> length
    self._lock = threading.RLock()

  def __getstate__(self):   # grain's worker processes get a copy without the lock
    return {**self.__dict__, "_lock": None, "_orders": {}, "_pad_tos": {}}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.RLock())

  def __len__(self):
    return self._epoch_length

  def __str__(self):
    return f"BatchPlan(multiple={self._multiple}, window={self._window})"

  def _order(self, epoch):
    """Example index at each position of `epoch` (-1 past the parent's epoch)."""
    with self._lock:
      if epoch not in self._orders:
        order = np.full(self._epoch_length, -1, np.int64)
        order[:self._n] = [self._parent[epoch * self._n + q] for q in range(self._n)]
        if self._window:
          order[:self._n] = self._grouped(order[:self._n], epoch)
        while len(self._orders) >= 3:   # a global batch spans two epochs at most (if a
          del self._orders[min(self._orders)]   # split is shorter, orders are recomputed)
        self._orders[epoch] = order
      return self._orders[epoch]

  def _grouped(self, order, epoch):
    size = self._window * self._global_batch
    out = []
    for start in range(0, len(order), size):
      run = order[start:start + size]
      run = run[np.argsort(self._lengths[run], kind="stable")]
      batches = [run[i:i + self._global_batch] for i in range(0, len(run), self._global_batch)]
      rng = np.random.default_rng([self._seed, epoch, start])
      out.extend(batches[k] for k in rng.permutation(len(batches)))
    return np.concatenate(out)

  def _index(self, position):
    epoch, q = divmod(position, self._epoch_length)
    return int(self._order(epoch)[q])

  def _pad_to(self, position):
    if not self._multiple:
      return self._max_length
    batch = position // self._global_batch
    with self._lock:
      if batch not in self._pad_tos:
        rows = [self._index(p) for p in range(batch * self._global_batch,
                                              (batch + 1) * self._global_batch)]
        longest = max((int(self._lengths[i]) for i in rows if i >= 0),
                      default=self._max_length)
        while len(self._pad_tos) >= 64:
          del self._pad_tos[min(self._pad_tos)]
        self._pad_tos[batch] = min(-(-longest // self._multiple) * self._multiple,
                                   self._max_length)
      return self._pad_tos[batch]

  def __getitem__(self, position):
    if isinstance(position, slice):
      return self.slice(position)
    return self._index(position), self._pad_to(position)


class CutToLength(grain.transforms.Map):
  """A batch's token fields cut to its planned length (`pad_to`, the same on every row), or
  kept at max_length where `cut` is False."""

  def __init__(self, cut):
    self.cut = cut

  def map(self, batch):
    length = int(np.max(batch.pop("pad_to")))
    if not self.cut:
      return batch
    return {k: v[:, :length] if k in TOKEN_FIELDS else v for k, v in batch.items()}


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
  rate = float(config_lib.setting(config_data, "text_augment"))
  augment_lib.check_settings(rate, float(config_lib.setting(config_data, "text_augment_mask")))
  if rate == 0:
    return None
  return augment_lib.TextAugment.from_config(
      config_data, builder_lib.make_tokenizer(config_data), dataset_meta(config_data)["marker_ids"])


def example_lengths(config_data, split):
  """Real tokens (attention_mask sum) of each example of a split, memoised per process."""
  key = (_config_key(config_data), split)
  if key not in _LENGTHS:
    source = get_builder(config_data).as_data_source(split)
    _LENGTHS[key] = np.asarray([int(np.sum(source[i]["attention_mask"]))
                                for i in range(len(source))], np.int64)
  return _LENGTHS[key]


def build_map_dataset(config_data, split, *, batch_size, shuffle=False, seed=0, num_epochs=1,
                      shard_index=None, shard_count=None, drop_remainder=None, augment=False):
  """grain MapDataset of batches for this host.

  drop_remainder (default: `shuffle`): True drops the partial last batch and trims the split to
  a multiple of shard_count so hosts step together; False pads the last batch of each epoch with
  mask=False rows, to the same batch count on every host, so every example counts exactly once.
  num_epochs=None repeats forever. augment=True applies `data.text_augment` (training only).
  `data.pad_to_multiple_of` cuts each batch's token fields to its longest example (rounded
  up); `data.group_by_length` (with shuffle) batches sentences of similar length together.
  """
  shard_index, shard_count = _host(shard_index, shard_count)
  drop_remainder = shuffle if drop_remainder is None else drop_remainder
  source = get_builder(config_data).as_data_source(split)
  n = len(source)
  if n == 0:
    raise ValueError(f"split {split!r} of {config_lib.setting(config_data, 'name')} is empty")
  multiple = int(config_lib.setting(config_data, "pad_to_multiple_of"))
  window = int(config_lib.setting(config_data, "group_by_length")) if shuffle else 0
  if multiple < 0 or window < 0 or (window and not multiple):
    raise ValueError(f"data.pad_to_multiple_of={multiple}, data.group_by_length={window}: "
                     "give 0 (off) or a positive number; grouping by length saves nothing "
                     "unless batches are cut (set data.pad_to_multiple_of, e.g. 8)")
  ds = grain.MapDataset.range(n)
  if shuffle:
    ds = ds.shuffle(seed)
  global_batch = batch_size * shard_count
  if drop_remainder:
    # Grouped epochs hold whole global batches, so the runs sorted by length are the batches.
    ds = ds[:n - n % (global_batch if window else shard_count)]
  # Padding rows (eval) fill the last global batch: each host gets whole batches.
  epoch_length = len(ds) if drop_remainder else -(-n // global_batch) * global_batch
  ds = BatchPlan(ds, epoch_length, global_batch=global_batch,
                 max_length=int(config_lib.setting(config_data, "max_length")),
                 lengths=example_lengths(config_data, split) if multiple or window else None,
                 multiple=multiple, window=window, seed=seed)
  ds = ds[shard_index::shard_count]
  if num_epochs != 1:
    ds = ds.repeat(num_epochs)
  ds = ds.map(ReadRows(source)).map(ToBatchContract())
  transform = text_augment(config_data) if augment else None
  if transform is not None:
    ds = ds.random_map(transform, seed=seed)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder)
  return ds.map(CutToLength(cut=bool(multiple)))


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
