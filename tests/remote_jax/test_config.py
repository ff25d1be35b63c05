"""Derived fields follow their sources after the command line's overrides (remote_jax/config.py).

Each case runs the CLI's `--dry_run` (no jax import: about a second each), so what is
compared is what a training run would be handed.
"""
import json

import pytest

from remote_jax import config as config_lib
from tests.remote_jax.test_cli import run

REMOTE = ("demo.py", "umre.py", "mnre.py", "mnre_text.py", "more.py")
MI2RAGE = ("mi2rage_demo.py:fast", "mi2rage_mnre.py")
TRAIN = {"remote": "remote_jax.train", "mi2rage": "mi2rage_jax.train"}


def dry_run(tmp_path, kind, *args):
  out = run(TRAIN[kind], *args, "--dry_run", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout)


def get(config, path):
  for key in path.split("."):
    config = config[key]
  return config


def present(config, kind):
  """DERIVED[kind]'s entries whose two fields `config` has (the attribute world's pair only
  in configs/ot_world.py; resolve skips the others too)."""
  return [e for e in config_lib.DERIVED[kind]
          if config_lib.has_field(config, e[0]) and config_lib.has_field(config, e[1])]


def other(value):
  """A valid new value of a source field: the other bool, the attribute world's other colour
  source, or twice the size."""
  if isinstance(value, bool):
    return not value
  return {"own": "tag", "tag": "own"}[value] if isinstance(value, str) else 2 * value


@pytest.mark.parametrize("name", REMOTE)
def test_an_arg_and_the_field_it_sets_give_one_config(tmp_path, name):
  # `:depth=False` and `--config.data.use_depth=False`: the model stops expecting depth
  # either way (before the config layer, the field left model.vision.use_depth True).
  by_arg = dry_run(tmp_path, "remote", f"--config={name}:depth=False")
  by_field = dry_run(tmp_path, "remote", f"--config={name}", "--config.data.use_depth=False")
  assert by_arg == by_field
  assert by_field["model"]["vision"]["use_depth"] is False


@pytest.mark.parametrize("kind,name", [("remote", n) for n in ("demo.py", "mnre_text.py",
                                                                 "ot_world.py")]
                         + [("mi2rage", n) for n in MI2RAGE])
def test_every_derived_field_follows_its_source(tmp_path, kind, name):
  base = dry_run(tmp_path, kind, f"--config={name}")
  for target, source, how in present(base, kind):
    assert get(base, target) == how(get(base, source)), target
    value = other(get(base, source))
    changed = dry_run(tmp_path, kind, f"--config={name}", f"--config.{source}={value}")
    assert get(changed, source) == value
    assert get(changed, target) == how(value), f"{target} did not follow {source}={value}"


@pytest.mark.parametrize("kind,name", [("remote", "demo.py"), ("remote", "ot_world.py"),
                                       ("mi2rage", MI2RAGE[0])])
def test_overriding_a_derived_field_names_its_source(tmp_path, kind, name):
  base = dry_run(tmp_path, kind, f"--config={name}")
  for target, source, _ in present(base, kind):
    out = run(TRAIN[kind], f"--config={name}", f"--config.{target}={other(get(base, target))}",
              "--dry_run", cwd=tmp_path)
    assert out.returncode == 2
    assert f"error: --config.{target}: {target} follows {source}; set --config.{source} " \
           "instead" in out.stderr


def test_resolve_is_idempotent_and_checks():
  from configs import demo
  config = config_lib.resolve(demo.get_config("runlocal"))
  again = config_lib.resolve(config_lib.resolve(demo.get_config("runlocal")))
  assert config.to_dict() == again.to_dict()
  config.model.box_position = "nowhere"
  with pytest.raises(ValueError, match=r"model.box_position='nowhere': allowed"):
    config_lib.resolve(config)
