"""Benchmarks printing JSON (not tests). Shared: reading a `configs/x.py[:arg]` config."""
import importlib.util


def load_config(config_arg):
  """`configs/x.py[:arg]` -> its get_config(arg), as train.py's --config reads it."""
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)
