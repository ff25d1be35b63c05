"""Benchmarks printing JSON (not tests). Shared: reading a `configs/x.py[:arg]` config,
and running one configuration in a child process (XLA reads its flags and
device list once per process)."""
import json
import subprocess
import sys


def load_config(config_arg):
  """`configs/x.py[:arg]` (or a bare name) -> its get_config(arg), as train.py reads it."""
  from remote_jax import cli
  return cli.load_config(config_arg)


def run_child(module, one, env):
  """`python -m MODULE --one JSON(one)` under `env`: its last stdout line as
  a dict, or `one` with the child's stderr tail as "error"."""
  out = subprocess.run([sys.executable, "-m", module, "--one", json.dumps(one)],
                       capture_output=True, text=True, env=env)
  line = out.stdout.strip().splitlines()[-1:] if out.returncode == 0 else []
  return json.loads(line[0]) if line else {**one, "error": out.stderr.strip()[-800:]}
