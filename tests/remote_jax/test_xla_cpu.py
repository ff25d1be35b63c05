"""XLA:CPU flag presets: merged into XLA_FLAGS without overriding the user, and
they reach the compiler (the "xla" preset hands matmuls to YNNPACK, "fast" not)."""
import json
import logging
import os
import subprocess
import sys

import pytest

from remote_jax import xla_cpu


def test_presets_merge_without_overriding_the_user():
  assert xla_cpu.merged_xla_flags("xla", "--foo=1") == "--foo=1"
  both = xla_cpu.merged_xla_flags("fast_lean", "")
  assert both.split() == [xla_cpu.YNN_OFF, xla_cpu.MEMORY_SCHEDULE]
  mine = "--xla_cpu_experimental_ynn_fusion_type=dot"
  merged = xla_cpu.merged_xla_flags("fast_lean", mine).split()
  assert merged == [mine, xla_cpu.MEMORY_SCHEDULE]   # the user's value stays, once
  with pytest.raises(ValueError, match=r"config\.xla_cpu='turbo': allowed \['auto', 'auto_lean', 'fast', 'fast_lean', 'lean', 'xla'\]"):
    xla_cpu.merged_xla_flags("turbo")


def test_auto_keeps_ynnpack_only_where_the_cpu_has_bf16_dot_instructions(tmp_path, monkeypatch):
  zen4 = {"avx2", "avx512f", "avx512_bf16"}
  icelake = {"avx2", "avx512f", "avx512_vnni"}
  assert xla_cpu.resolve("auto", zen4) == "xla"
  assert xla_cpu.resolve("auto", {"amx_bf16", "avx512f"}) == "xla"
  assert xla_cpu.resolve("auto", icelake) == "fast"
  assert xla_cpu.resolve("auto_lean", zen4) == "lean"
  assert xla_cpu.resolve("auto_lean", icelake) == "fast_lean"
  assert xla_cpu.resolve("fast", zen4) == "fast"   # concrete presets are kept as given
  # /proc/cpuinfo is read for its "flags" line; no such line (aarch64, macOS): XLA's defaults
  x86 = tmp_path / "x86"
  x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
  assert xla_cpu.cpu_flags(str(x86)) == {"fpu", "avx2", "avx512_bf16"}
  arm = tmp_path / "arm"
  arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
  assert xla_cpu.cpu_flags(str(arm)) is None
  assert xla_cpu.cpu_flags(str(tmp_path / "missing")) is None
  assert xla_cpu.resolve("auto", None) in ("xla", "fast")   # this host: whichever it is
  monkeypatch.setattr(xla_cpu, "cpu_flags", lambda: None)   # a host without /proc flags
  assert (xla_cpu.resolve("auto"), xla_cpu.resolve("auto_lean")) == ("xla", "lean")


def test_apply_refuses_once_the_backend_runs(monkeypatch, caplog):
  import jax
  jax.numpy.zeros(1).block_until_ready()   # the backend has started
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(RuntimeError, match="already started.*XLA_FLAGS"):
    xla_cpu.apply("fast")
  monkeypatch.setenv("XLA_FLAGS", xla_cpu.YNN_OFF)   # nothing to change: fine
  assert xla_cpu.apply("fast") == xla_cpu.YNN_OFF
  monkeypatch.setenv("XLA_FLAGS", "")   # XLA's defaults change nothing, and the log says so
  with caplog.at_level(logging.INFO, logger=xla_cpu.log.name):
    assert xla_cpu.apply("xla") == ""
  assert "XLA_FLAGS= (config.xla_cpu=xla -> xla)" in caplog.text


PROBE = """
import json, sys
from remote_jax import xla_cpu
flags = xla_cpu.apply(sys.argv[1])
import jax, jax.numpy as jnp
x = jnp.ones((64, 64), jnp.bfloat16)
f = lambda a: jax.lax.dot_general(a, a, (((1,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
text = jax.jit(f).lower(x).compile().as_text()
print(json.dumps({"flags": flags, "ynn": "ynn" in text.lower()}))
"""


@pytest.mark.parametrize("preset", ["xla", "fast"])
def test_preset_reaches_the_compiler(preset):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-c", PROBE, preset], capture_output=True, text=True,
                       env=env, check=True)
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["ynn"] == (preset == "xla"), row
