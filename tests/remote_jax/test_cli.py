"""The front door: `--config NAME.py` from any directory, `--dry_run`, every
`data.paths.<key>` overridable, and each command-line mistake reported in one line.

The flag errors stop before jax is imported, so each subprocess takes about a second.
"""
import json
import os
import subprocess
import sys

import pytest

from configs import common
from remote_jax import cli
from remote_jax.data import DATASETS
from tests.conftest import FAST_COMPILE, REPO


def run(module, *args, cwd):
  env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS=FAST_COMPILE)
  return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_resolve_config_names_paths_and_unknown(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert cli.resolve_config("umre.py") == str(cli.CONFIG_DIR / "umre.py")
  assert cli.resolve_config("configs/umre.py:mot=xattn") == f"{cli.CONFIG_DIR / 'umre.py'}:mot=xattn"
  assert cli.resolve_config("demo:runlocal") == f"{cli.CONFIG_DIR / 'demo.py'}:runlocal"
  own = tmp_path / "mine.py"
  own.write_text("def get_config(arg=None):\n  return {}\n")
  assert cli.resolve_config("mine.py:x") == "mine.py:x"   # a file here wins
  with pytest.raises(cli.UsageError, match="available: demo.py, .*umre.py"):
    cli.resolve_config("umer.py")
  assert "common.py" not in cli.available_configs()


@pytest.mark.parametrize("name", ["umre", "more", "mnre", "demo"])
def test_data_paths_hold_every_reader_key(name):
  config = cli.load_config(f"{'demo' if name == 'demo' else name}.py")
  assert set(config.data.paths) == set(DATASETS[name].reader.DEFAULT_PATHS)
  assert set(config.data.paths.values()) == {""}   # "" = the reader's default
  assert set(common.data_config(name).paths) == set(DATASETS[name].reader.DEFAULT_PATHS)


def test_train_from_another_directory_reaches_the_data_root_line(tmp_path):
  out = run("remote_jax.train", "--config", "umre.py", f"--workdir={tmp_path / 'w'}",
            cwd=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "error: data.root is not set for dataset 'umre'" in out.stderr
  assert "Nikol-coder/REMOTE" in out.stderr   # where UMRE comes from
  assert "Traceback" not in out.stderr


def test_dry_run_applies_every_path_override(tmp_path):
  keys = sorted(DATASETS["umre"].reader.DEFAULT_PATHS)
  out = run("remote_jax.train", "--config=umre.py:runlocal", "--dry_run",
            *(f"--config.data.paths.{k}=/data/{k}" for k in keys), cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout)["data"]["paths"] == {k: f"/data/{k}" for k in keys}


@pytest.mark.parametrize("args, expected", [
    (["--config=umer.py"], "no packaged config of that name; available: demo.py"),
    (["--config=umre.py:mot=xattn,colour=red"], "unknown key 'colour'"),
    (["--config=umre.py", "--config.data.paths.imagez=/x"],
     "config.data.paths has no field 'imagez'"),
    (["--config=umre.py", "--config.optim.lr=fast"], "--config.optim.lr=fast"),
    (["--config=umre.py", "--workdirr=/tmp/x"], "Unknown command line flag 'workdirr'"),
    ([], "--config must have a value"),
])
@pytest.mark.parametrize("module", ["remote_jax.train", "remote_jax.evaluate"])
def test_command_line_mistakes_are_one_line(tmp_path, module, args, expected):
  out = run(module, *args, "--dry_run", cwd=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[0].startswith("error: ") and expected in lines[0], out.stderr
  assert len(lines) == 2 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("module", ["remote_jax.train", "mi2rage_jax.train"])
def test_both_training_clis_share_the_harness(tmp_path, module):
  """remote_jax.cli.train_main: the same --seeds flag and one-line errors in both."""
  out = run(module, "--config=demo.py" if module.startswith("remote") else
            "--config=mi2rage_demo.py", "--seeds=0,x", cwd=tmp_path)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "error: --seeds=0,x: expected a comma list of integers" in out.stderr
  assert "Traceback" not in out.stderr
  assert "one run per seed in workdir/seed_N" in run(module, "--helpfull", cwd=tmp_path).stdout


def test_mi2rage_cli_resolves_names_too(tmp_path):
  out = run("mi2rage_jax.train", "--config=mi2rage_demo.py:fast", "--dry_run", cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads(out.stdout)["student"]["steps"] == 2


def test_error_line_starts_after_a_progress_bar(capsys):
  from tqdm import tqdm

  from remote_jax import errors
  bar = tqdm(total=10, file=sys.stderr, ascii=True)
  bar.update(3)   # leaves "\r 30%|###..." with no newline
  errors.print_error("data.root is not set")
  err = capsys.readouterr().err
  assert "\nerror: data.root is not set\n" in err, repr(err)
