"""Every `python -m ...` command of the documentation still parses, so examples cannot rot.

Commands of our CLIs (and the launch scripts, whose arguments go to them) run with
`--dry_run` from a directory outside the repository: the config name resolves, its
`:args` parse, every `--config.x=...` override exists and has the right type. Other
modules (benchmarks, converters) must exist and know every `--flag` the command passes.
"""
import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from remote_jax import cli
from tests.conftest import FAST_COMPILE, REPO

DOCS = ("README.md", "mi2rage_jax/README.md", "docs/benchmarks.md")
CLIS = ("remote_jax.train", "remote_jax.evaluate", "remote_jax.predict", "mi2rage_jax.train",
        "remote_jax.models.released")


def snippets(text):
  """Lines of fenced code blocks (continuations joined) and inline code spans."""
  for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
    yield from block.replace("\\\n", " ").splitlines()
  for span in re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", re.sub(r"```.*?```", "", text, flags=re.S)):
    yield " ".join(span.split())


def parse(line):
  """(module, args) of a documented command, or None."""
  line = re.split(r"\s#\s", line)[0]
  if "python -m " not in line and "launch/" not in line:
    return None
  tokens = shlex.split(line)
  env = dict(t.split("=", 1) for t in tokens if re.match(r"^[A-Z_]+=", t))
  for i, t in enumerate(tokens):
    if t == "-m" and i > 0 and tokens[i - 1].endswith("python") and tokens[i + 2:]:
      return tokens[i + 1], tokens[i + 2:]   # (a bare module name is a mention)
    if t.startswith("launch/") and t.endswith((".sh", ".sbatch")) and tokens[i + 1:]:
      return env.get("MODULE", "remote_jax.train"), tokens[i + 1:]
  return None


def documented():
  out = []
  for doc in DOCS:
    for line in snippets((REPO / doc).read_text(encoding="utf-8")):
      cmd = parse(line)
      if cmd:
        out.append(pytest.param(*cmd, id=f"{doc}: {cmd[0]} {' '.join(cmd[1])}"[:120]))
  makefile = (REPO / "Makefile").read_text()
  for target in ("run",):
    recipe = re.search(rf"^{target}:.*\n\t(.*)$", makefile, re.M).group(1)
    out.append(pytest.param(*parse(recipe.replace("$(BIN)/python", "python")),
                            id=f"make {target}"))
  return out


def test_the_documentation_has_commands():
  modules = {p.values[0] for p in documented()}
  assert set(CLIS) <= modules, modules


@pytest.mark.parametrize("module, args", documented())
def test_documented_command_parses(module, args, tmp_path):
  if module not in CLIS:
    spec = importlib.util.find_spec(module)
    assert spec is not None, module
    source = pathlib.Path(spec.origin).read_text(encoding="utf-8")
    for flag in (a.split("=")[0] for a in args if a.startswith("--")):
      if flag.startswith("--config.") and "parse_known_args" in source:
        # Passed on to every run's remote_jax.train: the field must exist in the command's
        # --config (the demo's where it names none).
        field = flag[len("--config."):].split(".")
        named = [a.split("=", 1)[1] for a in args if a.startswith("--config=")] + [
            args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
        node = cli.load_config(named[0] if named else "demo.py")
        for part in field:
          assert part in node, f"{module}: {flag} names no config field"
          node = node[part]
        continue
      if flag == "--config" and "cli.define_config_flag(" in source:
        continue   # absl's config flag (bench CLIs built on remote_jax.cli)
      assert f'"{flag}"' in source, f"{module} has no {flag}"
    return
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE)
  out = subprocess.run([sys.executable, "-m", module, *args, "--dry_run"], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  config = json.loads(out.stdout)
  for a in args:   # string overrides arrive as given
    m = re.match(r"^--config\.([\w.]+)=(.*)$", a)
    if m and re.match(r"^[/.\w-]+$", m.group(2)) and not re.match(r"^[\d.e+-]+$|^(True|False)$",
                                                                 m.group(2)):
      node = config
      for key in m.group(1).split("."):
        node = node[key]
      assert node == m.group(2), a
