"""What the CLIs share at the front door: `--config` names, flag errors, and the
training harness of remote_jax.train and mi2rage_jax.train.

`--config NAME.py[:arg]` (or `configs/NAME.py[:arg]`) that is not a file under the
working directory is looked up among the configs installed with the package, so the
documented commands work from any directory. Flag errors (an unknown config, a bad
`:arg`, an override of a field that does not exist or of the wrong type) end in one
line, like the data errors of `remote_jax.errors`.

  _CONFIG = cli.define_config_flag()
  ...
  if __name__ == "__main__":
    cli.run(main)

A training CLI defines `define_train_flags()` and runs `train_main(...)`: logging,
the XLA:CPU preset, `jax.distributed`, one-line errors and `--seeds` (one run per
seed in workdir/seed_N, then workdir/seeds_summary.json with the mean and std).
"""
import importlib.util
import json
import os
import pathlib
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from remote_jax import config as config_lib
from remote_jax import errors

# Installed next to remote_jax/ (pyproject installs the top-level configs package).
CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
_CONFIG_FLAG = re.compile(r"^--?config(=|$)")
_OVERRIDE = re.compile(r"^--?(no)?config\.([^=]+)")


class UsageError(ValueError):
  """A command line that names something that does not exist."""


def define_config_flag(help_string="Config: configs/NAME.py[:arg], a bare NAME.py or a path."):
  """The `--config` flag (with `--config.x=y` overrides) and `--dry_run`."""
  flags.DEFINE_bool("dry_run", False, "Print the config (args and overrides applied) as JSON "
                    "and exit.")
  return config_flags.DEFINE_config_file("config", None, help_string, lock_config=True)


def available_configs():
  """Names of the packaged configs (files with a get_config)."""
  return sorted(p.name for p in CONFIG_DIR.glob("*.py")
                if "def get_config" in p.read_text(encoding="utf-8"))


def resolve_config(value):
  """`PATH[:arg]` with PATH made loadable: an existing file stays as given; a bare
  `NAME.py` or `configs/NAME.py` becomes the packaged config of that name."""
  path, sep, arg = value.partition(":")
  if pathlib.Path(path).is_file():
    return value
  p = pathlib.PurePath(path)
  if str(p.parent) in (".", "configs"):
    name = p.name if p.suffix else f"{p.name}.py"
    if name in available_configs():
      return f"{CONFIG_DIR / name}{sep}{arg}"
  raise UsageError(f"--config={value}: no file {path!r} here and no packaged config of that "
                   f"name; available: {', '.join(available_configs())}")


def load_config(value):
  """The resolved ConfigDict of `--config=value`, without overrides (remote_jax/config.py)."""
  path, sep, arg = resolve_config(value).partition(":")
  spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return config_lib.resolve(module.get_config(arg) if sep else module.get_config())


def overridden_fields(argv):
  """The dotted fields that `--config.a.b=...` flags in `argv` set ("a.b")."""
  return tuple(m.group(2) for m in map(_OVERRIDE.match, argv) if m)


def _resolve_argv(argv):
  argv = list(argv)
  for i, a in enumerate(argv):
    if a == "--":
      break
    if _CONFIG_FLAG.match(a):
      if "=" in a:
        flag, value = a.split("=", 1)
        argv[i] = f"{flag}={resolve_config(value)}"
      elif i + 1 < len(argv):
        argv[i + 1] = resolve_config(argv[i + 1])
  return argv


def _bad_override(argv):
  """The first `--config.a.b=...` whose path the loaded config lacks, as a message."""
  try:
    value = load_config(_config_value(argv))
  except Exception:  # the config itself failed: the caller reports that
    return None
  for a in argv:
    m = _OVERRIDE.match(a)
    if not m:
      continue
    node, done = value, []
    for key in m.group(2).split("."):
      if not hasattr(node, "keys") or key not in node:
        where = "config" + "".join(f".{k}" for k in done)
        have = sorted(node.keys()) if hasattr(node, "keys") else type(node).__name__
        return f"--config.{m.group(2)}: {where} has no field {key!r} (it has: {have})"
      node = node[key]
      done.append(key)
  return None


def _config_value(argv):
  for i, a in enumerate(argv):
    if _CONFIG_FLAG.match(a):
      return a.split("=", 1)[1] if "=" in a else argv[i + 1]
  return None


def _innermost(e):
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  return e


def parse_flags(argv):
  """absl `flags_parser`: resolves `--config`, then parses; a bad flag is one line."""
  given = argv
  try:
    argv = _resolve_argv(argv)
    sys.argv = argv  # config_flags finds the `--config.x` overrides in sys.argv
    rest = flags.FLAGS(argv)
    config = flags.FLAGS["config"].value
    config.get("data")  # a config that failed to load raises here, not later in main
    # Derived fields follow their sources after the overrides; the checks run here.
    config_lib.resolve(config, overridden_fields(argv))
  except Exception as e:  # flags, ml_collections and absl raise many types; all are usage
    if os.environ.get("REMOTE_JAX_TRACEBACK"):
      raise
    msg = _bad_override(argv) if isinstance(e, (AttributeError, KeyError)) else None
    if msg is None:
      text = str(e)
      # ml_collections wraps a failing get_config's traceback into the message.
      msg = text if "\n" not in text else f"--config={_config_value(given)}: {_innermost(e)}"
    errors.print_error(msg, "--helpshort lists the flags")
    sys.exit(2)
  if flags.FLAGS.dry_run:
    print(config.to_json_best_effort(indent=2, sort_keys=True))
    sys.exit(0)
  return rest


def run(main):
  """app.run with the --config resolution and one-line flag errors."""
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=parse_flags)


def define_train_flags(workdir_help="Run directory."):
  """`--config` (with overrides and `--dry_run`), `--workdir` and `--seeds`."""
  define_config_flag()
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.DEFINE_string("seeds", "", "Comma list of seeds: one run per seed in workdir/seed_N, "
                      "then their mean and std (workdir/seeds_summary.json).")


def _seeds(value):
  try:
    return [int(s) for s in value.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--seeds={value}: expected a comma list of integers, e.g. 0,1,2") from None


def train_main(train, report, aggregate, report_seeds, default_workdir):
  """The absl `main` of a training CLI (flags of `define_train_flags`).

  `train(config, workdir) -> summary` is one run; `report(summary, config)` its
  printed table; with `--seeds`, `aggregate([summary, ...])` gives the JSON of
  seeds_summary.json and `report_seeds(aggregate)` its table. `default_workdir(config)`
  when `--workdir` is not given. Only process 0 prints and writes the seeds summary.
  """
  def main(argv):
    del argv
    from remote_jax import distributed, writers, xla_cpu
    writers.setup_cli_logging()
    config = flags.FLAGS.config
    with errors.user_errors():
      seeds = _seeds(flags.FLAGS.seeds)
      xla_cpu.apply(config.xla_cpu)   # before the backend starts
    import jax
    workdir = pathlib.Path(flags.FLAGS.workdir or default_workdir(config))
    distributed.maybe_initialize(config)
    jax.config.update("jax_threefry_partitionable", True)
    main_process = distributed.is_main()
    with errors.user_errors():
      if not seeds:
        summary = train(config, workdir)
        if main_process:
          print(report(summary, config))
        return
      summaries = []
      for seed in seeds:
        with config.unlocked():
          config.seed = seed
        summaries.append(train(config, workdir / f"seed_{seed}"))
        if main_process:
          print(f"seed {seed}\n{report(summaries[-1], config)}")
      agg = aggregate(summaries)
      if main_process:
        (workdir / "seeds_summary.json").write_text(json.dumps(agg, indent=2) + "\n")
        print(report_seeds(agg))

  return main
