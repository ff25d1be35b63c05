"""Datasets: readers (published formats) -> preprocessing -> tfds ArrayRecord cache -> grain.

`DATASETS` maps `config.data.name` to its `Dataset`: the reader class (its DEFAULT_PATHS keys
are config.data.paths' keys) and the factory `make(config.data) -> reader`; a reader has
`relations`, `negative_id` and `read(split) -> (samples, validation)`.
"""
from typing import Any, NamedTuple

from remote_jax.data import attribute_world, mnre, more, synth, umre


class Dataset(NamedTuple):
  reader: type
  make: Any


DATASETS = {
    "umre": Dataset(umre.UmreReader, umre.UmreReader.from_config),
    "more": Dataset(more.MoreReader, more.MoreReader.from_config),
    "mnre": Dataset(mnre.MnreReader, mnre.MnreReader.from_config),
    "demo": Dataset(umre.UmreReader, synth.demo_reader),   # the demo world, read as UMRE
    # Issue 35's world (configs/ot_world.py), read as UMRE.
    "attribute_world": Dataset(umre.UmreReader, attribute_world.reader),
}
