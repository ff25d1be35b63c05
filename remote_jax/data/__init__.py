"""Datasets: readers (published formats) -> preprocessing -> tfds ArrayRecord cache -> grain.

`DATASETS` maps `config.data.name` to a reader factory `fn(config.data) -> reader`; a reader
has `relations`, `negative_id` and `read(split) -> (samples, validation)`.
"""
from remote_jax.data import mnre, more, synth, umre

DATASETS = {
    "umre": umre.UmreReader.from_config,
    "more": more.MoreReader.from_config,
    "mnre": mnre.MnreReader.from_config,
    "demo": synth.demo_reader,
}
# The reader class behind each name: its DEFAULT_PATHS keys are config.data.paths' keys.
READERS = {"umre": umre.UmreReader, "more": more.MoreReader, "mnre": mnre.MnreReader,
           "demo": umre.UmreReader}
