"""Every config holds every value the code reads: the code states no defaults of its own
(configs/common.py is the one source), so each section must be complete.

Building modules and optimisers here traces nothing: the file runs in about a second.
"""
import importlib

import pytest

from remote_jax import cli
from remote_jax import config as config_lib
from remote_jax.data.builder import _HASHED
from remote_jax.models import moe as moe_lib
from remote_jax.models import remote
from remote_jax.models.fusion import FUSIONS

REMOTE = ["umre.py", "umre.py:semantics=reference", "umre.py:mot=xattn",
          "umre.py:mot=ot_reference", "umre.py:mot=none,moe=off", "umre.py:protocol=reference",
          "mnre.py", "more.py:semantics=reference", "mnre_text.py", "demo.py",
          "demo.py:runlocal,semantics=reference", "ot_study.py:moe=off", "ot_world.py",
          "ot_world_study.py:mot=ot_paper,moe=off", "ot_world.py:tower=slow_stem",
          "ot_world_tag_study.py:pos=false,depth=false,moe=off"]
MI2RAGE = ["mi2rage_demo.py", "mi2rage_demo.py:fast,world=shapes", "mi2rage_mnre.py"]


def load(name):
  file, _, arg = name.partition(":")
  config = importlib.import_module(f"configs.{file[:-3]}").get_config(arg or None)
  return config_lib.resolve(config)


def test_every_config_file_is_covered():
  assert {n.partition(":")[0] for n in REMOTE + MI2RAGE} == set(cli.available_configs())


@pytest.mark.parametrize("name", REMOTE)
def test_remote_config_is_complete(name):
  config = load(name)
  for key in (*_HASHED, "cache_dir", "tokenizer_dir"):
    config_lib.setting(config.data, key)
  assert config.data.cache_dir   # "" would put the cache in the working directory itself
  config_lib.optim_settings(config.optim)
  model = config.model
  d = model.text.hidden_size
  for variant in FUSIONS:   # the mot section serves every variant, not just the chosen one
    FUSIONS[variant](dict(model.mot), d, "mot")
  moe_lib.MMOE[model.moe.variant](dict(model.moe, dtype=model.dtype), d, "moe")
  names = remote.expert_names(model)
  assert (names == ()) == (model.moe.variant == "off")


@pytest.mark.parametrize("name", MI2RAGE)
def test_mi2rage_optimisers_are_complete(name):
  config = load(name)
  for stage in ("teacher", "student"):
    cfg = dict(config[stage]["optim"])
    lr = cfg["lr"]
    for value in (lr.values() if isinstance(lr, dict) else [lr]):   # per-modality rates
      resolved = config_lib.optim_settings(dict(cfg, lr=value))
      assert resolved == dict(cfg, lr=value) and set(resolved) == set(config_lib.OPTIM_KEYS)


def test_a_missing_setting_names_its_field():
  config = load("demo.py")
  del config.data["strict"]
  with pytest.raises(ValueError, match=r"data\.strict is not set"):
    config_lib.setting(config.data, "strict")
  optim_cfg = dict(config.optim)
  del optim_cfg["b2"]
  with pytest.raises(ValueError, match=r"\['b2'\] not set"):
    config_lib.optim_settings(optim_cfg)
