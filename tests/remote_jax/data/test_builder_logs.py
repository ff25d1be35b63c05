"""tfds' per-build noise is dropped from the logs; its other warnings pass."""
import logging

from remote_jax.data import builder  # noqa: F401  (installs the filter)


def test_tfds_build_noise_is_filtered_and_other_warnings_kept(caplog):
  log = logging.getLogger("absl")
  with caplog.at_level(logging.WARNING, logger="absl"):
    log.warning("Using custom data configuration %s", "demo-0f0bc94b71f2")
    log.warning("Variant folder %s has no dataset_info.json", "/tmp/x/1.0.0")
    log.warning("Dataset %s is corrupt", "remote_data")
  assert [r.getMessage() for r in caplog.records] == ["Dataset remote_data is corrupt"]
