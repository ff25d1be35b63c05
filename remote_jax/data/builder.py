"""Preprocessed examples cached as a tensorflow-datasets ArrayRecord dataset (no TensorFlow).

The builder config name is `<dataset>-<hash>`, the hash covering every preprocessing setting,
the tokenizer files, the contents of the text/JSON source files and the listings (name, size,
mtime) of the image and depth directories, so changing any of them builds a fresh copy next to
the old one (old copies are not deleted). Examples are written in reader order
(`disable_shuffling`), so row i of a split has `index == i`. Skipped examples (data.strict =
"skip") are listed in `<cache_dir>/reports/<config name>/skipped_<split>.json` and counted in
the dataset metadata.
"""
import fcntl
import hashlib
import json
import logging
import os
import pathlib

import tensorflow_datasets as tfds
from etils import epath

from remote_jax.config import cfg_get, setting
from remote_jax.data import batch_spec, preprocess
from remote_jax.data import tokenizer as tokenizer_lib
from remote_jax.data.records import DataError
from remote_jax.data.umre import SPLITS
from remote_jax.writers import jsonable

log = logging.getLogger(__name__)
# Every cache is a custom builder config by design (named by its hash); tfds warns about
# it each time a builder object is made, twice per data build, and about the cache's
# not-yet-written folder on a first build.
_TFDS_NOISE = ("Using custom data configuration", "Variant folder ")
logging.getLogger("absl").addFilter(
    lambda record: not str(record.getMessage()).startswith(_TFDS_NOISE))
# Bump when preprocess.py changes what it writes: old caches are then ignored.
PREPROCESS_VERSION = 3   # 2: modalities="vision" keeps only the markers; 3: head first
# The settings that change the stored examples (the cache key). `root`, `paths` and `demo`
# are optional fields (demo: the demo world's parameters, only for name="demo").
_HASHED = ("name", "max_length", "num_objects", "crop_size", "use_caption", "use_depth",
           "depth_norm", "modalities", "strict")
_OPTIONAL = ("root", "paths", "demo")


def _settings(cfg):
  return {**{k: setting(cfg, k) for k in _HASHED}, **{k: cfg_get(cfg, k) for k in _OPTIONAL}}


def cache_dir(cfg):
  path = setting(cfg, "cache_dir")
  if not path:
    raise ValueError("data.cache_dir is empty; give the directory for preprocessed datasets")
  return pathlib.Path(path).resolve()


def make_reader(cfg):
  from remote_jax.data import DATASETS
  name = setting(cfg, "name")
  if name not in DATASETS:
    raise ValueError(f"data.name={name!r}; known datasets: {sorted(DATASETS)}")
  return DATASETS[name].make(cfg)


def make_tokenizer(cfg):
  # "": the vocabulary of the offline MiniLM package.
  return tokenizer_lib.RelationTokenizer(setting(cfg, "tokenizer_dir") or None,
                                         setting(cfg, "max_length"))


def _digest(paths):
  h = hashlib.sha1()
  for path in paths:
    h.update(str(path).encode())
    with open(path, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
  return h.hexdigest()


def config_key(cfg, reader, tok):
  """Hash of everything that changes the stored examples."""
  settings = {k: jsonable(v) for k, v in _settings(cfg).items()}
  settings["root"] = str(reader.root.resolve())
  settings["paths"] = {k: v for k, v in (settings["paths"] or {}).items() if v != ""}  # "": default
  files, dirs = [], []
  for split in available_splits(reader):
    files += reader.source_files(split)
    dirs += reader.resource_dirs(split)
  listing = hashlib.sha1()
  for directory in sorted(set(dirs)):
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
      stat = entry.stat()
      listing.update(f"{directory}/{entry.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
  tok_files = sorted(p for p in tok.directory.iterdir()
                     if p.name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
  blob = json.dumps(dict(settings=settings, version=PREPROCESS_VERSION,
                         data=_digest(sorted(set(files))), resources=listing.hexdigest(),
                         tokenizer=_digest(tok_files)),
                    sort_keys=True)
  return hashlib.sha1(blob.encode()).hexdigest()[:12]


def available_splits(reader):
  out = []
  for split in SPLITS:
    try:
      reader.split_file(split)
    except FileNotFoundError:
      continue
    out.append(split)
  return out


class RemoteData(tfds.core.GeneratorBasedBuilder):
  """One builder class; each preprocessing config is a separate BuilderConfig name."""
  VERSION = tfds.core.Version("1.0.0")

  # tfds' own lookup needs the importlib_resources backport for editable installs.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    return epath.Path(__file__)

  def __init__(self, cfg, *, reader=None, tokenizer=None, **kwargs):
    self._cfg = cfg
    self._reader = reader or make_reader(cfg)
    self._tok = tokenizer or make_tokenizer(cfg)
    key = config_key(cfg, self._reader, self._tok)
    root = cache_dir(cfg)
    name = f"{setting(cfg, 'name')}-{key}"
    self.report_dir = root / "reports" / name
    super().__init__(config=tfds.core.BuilderConfig(name=name),
                     data_dir=str(root), file_format="array_record", **kwargs)

  def _info(self):
    spec = batch_spec.example_spec(setting(self._cfg, "max_length"),
                                   setting(self._cfg, "num_objects"),
                                   setting(self._cfg, "crop_size"))
    # Arrays as raw bytes: tf.Example int64/float lists are ~10x slower to write and read
    # and store each uint8 pixel as an int64 varint.
    features = tfds.features.FeaturesDict(
        {k: tfds.features.Tensor(shape=shape, dtype=dtype, encoding=(
            tfds.features.Encoding.BYTES if shape else tfds.features.Encoding.NONE))
         for k, (shape, dtype) in spec.items()})
    reader = self._reader
    metadata = tfds.core.MetadataDict(
        relations=list(reader.relations), negative_id=reader.negative_id,
        vocab_size=self._tok.vocab_size, base_vocab_size=self._tok.base_vocab_size,
        marker_ids=self._tok.marker_ids, settings=jsonable(
            _settings(self._cfg)), skipped={}, buckets={})
    return tfds.core.DatasetInfo(builder=self, features=features, metadata=metadata,
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in available_splits(self._reader)}

  def _generate_examples(self, split):
    cfg, reader = self._cfg, self._reader
    pre = preprocess.Preprocessor(
        self._tok, reader.relations, num_objects=setting(cfg, "num_objects"),
        crop_size=setting(cfg, "crop_size"), use_caption=setting(cfg, "use_caption"),
        use_depth=setting(cfg, "use_depth"), depth_norm=setting(cfg, "depth_norm"),
        modalities=setting(cfg, "modalities"))
    samples, validation = reader.read(split)
    buckets = reader.buckets(split) if hasattr(reader, "buckets") else {}
    row, row_of_line = 0, {}
    for sample in samples:
      try:
        example = pre(sample, row)
      except DataError as e:
        validation.fail(e)
        continue
      yield row, example
      row_of_line[sample.record.line - 1] = row
      row += 1
    self.info.metadata["skipped"][split] = validation.counts
    # Buckets name 0-based lines of the split file; the pipeline's `index` is the row (skipped
    # lines have none and leave their buckets).
    self.info.metadata["buckets"][split] = {
        name: [row_of_line[i] for i in lines if i in row_of_line]
        for name, lines in buckets.items()}
    if validation.skipped:
      path = validation.write(self.report_dir, f"skipped_{split}")
      log.warning("%s %s: skipped %d examples %s; list in %s", reader.name, split,
                  len(validation.skipped), validation.counts, path)
      if not row:
        raise ValueError(f"{reader.name} split {split!r}: every example was skipped "
                         f"{validation.counts}; see {path}")


def prepare(cfg, *, reader=None, tokenizer=None):
  """The builder for `cfg` (config.data), built if its cache is missing.

  Several processes (parallel runs, the hosts of a job on a shared disk) may ask for
  the same cache: one builds it under an exclusive lock file, the others wait and then
  read it; where the lock is not honoured (some network file systems), a loser of the
  final rename reads the winner's copy, which is identical (same key, same inputs).
  """
  builder = RemoteData(cfg, reader=reader, tokenizer=tokenizer)
  if builder.is_prepared():
    return builder
  lock_path = pathlib.Path(builder.data_dir).parent / ".build.lock"
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      builder = RemoteData(cfg, reader=reader, tokenizer=tokenizer)
      if not builder.is_prepared():
        try:
          builder.download_and_prepare()
        except FileExistsError:
          log.info("%s was built by another process; using it", builder.data_dir)
          builder = RemoteData(cfg, reader=reader, tokenizer=tokenizer)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return builder


def meta_from_builder(builder, cfg):
  md = builder.info.metadata
  relations = list(md["relations"])
  return dict(relations=relations, negative_id=int(md["negative_id"]),
              num_classes=len(relations), vocab_size=int(md["vocab_size"]),
              base_vocab_size=int(md["base_vocab_size"]),
              marker_ids={k: int(v) for k, v in md["marker_ids"].items()},
              max_length=int(setting(cfg, "max_length")),
              num_objects=int(setting(cfg, "num_objects")),
              crop_size=int(setting(cfg, "crop_size")),
              splits={k: v.num_examples for k, v in builder.info.splits.items()},
              skipped=dict(md.get("skipped", {})),
              buckets={split: {name: list(rows) for name, rows in b.items()}
                       for split, b in dict(md.get("buckets", {})).items()})

