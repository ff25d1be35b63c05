"""The batch contract (remote_jax/data/batch_spec.py) against everything that uses it: the
stored features, the pipeline's batches, the init and compile batches and docs/design.md."""

import numpy as np
import pytest

from configs import common
from remote_jax import task
from remote_jax.data import batch_spec, pipeline
from tests.conftest import FIXTURES, REPO

L, K, S, B = 24, 3, 8, 4


def shapes(batch):
  return {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in batch.items()}


def spec(fields=tuple(batch_spec.FIELDS), batch_size=B):
  return {k: (shape, np.dtype(dtype))
          for k, (shape, dtype) in batch_spec.batch_spec(batch_size, L, K, S, fields).items()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """The UMRE fixture, preprocessed and cached: (config.data, meta, builder)."""
  cfg = common.data_config("umre", root=str(FIXTURES / "umre"), max_length=L, num_objects=K,
                           crop_size=S, cache_dir=str(tmp_path_factory.mktemp("cache")))
  cfg = cfg.to_dict()
  return cfg, pipeline.dataset_meta(cfg), pipeline.get_builder(cfg)


def test_stored_features_are_the_contract(data):
  _, _, builder = data
  features = builder.info.features
  stored = {k: (tuple(f.shape), np.dtype(f.np_dtype)) for k, f in features.items()}
  want = {k: (shape, np.dtype(dtype))
          for k, (shape, dtype) in batch_spec.example_spec(L, K, S).items()}
  assert stored == want
  assert stored["obj_pixels_u8"] == ((K, S, S, 3), np.uint8) and "obj_pixels" not in stored


def test_pipeline_batches_are_the_contract(data):
  cfg, _, _ = data
  batch = next(iter(pipeline.build_dataset(cfg, "train", batch_size=B, shard_index=0,
                                           shard_count=1)))
  assert shapes(batch) == spec()


def test_init_and_compile_batches_are_the_contract(data):
  _, meta, _ = data
  dummy = task.dummy_batch(meta, B)
  assert shapes(dummy) == spec(batch_spec.MODEL_FIELDS)
  abstract = task.abstract_batch(meta, B, None)
  assert shapes(abstract) == spec(batch_spec.MODEL_FIELDS)
  # The model reads every field but `index` (predictions only), and nothing else.
  assert set(batch_spec.FIELDS) - set(dummy) == {"index"}
  # Fill values that init's index checks accept: no marker, no object, every slot real.
  assert (dummy["head_marker"] == -1).all() and dummy["obj_mask"].all() and dummy["mask"].all()


def test_design_doc_shows_the_contract():
  doc = (REPO / "docs" / "design.md").read_text()
  assert batch_spec.markdown_table() in doc
  for key in batch_spec.FIELDS:
    assert f"| {key} |" in doc
