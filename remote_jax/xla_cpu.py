"""XLA:CPU flag presets (`config.xla_cpu`), set in XLA_FLAGS before the backend starts.

XLA reads XLA_FLAGS once, when the first computation creates a backend, so
train.py applies the preset right after parsing the config. The flags only
change how XLA compiles for the CPU; on GPU and TPU hosts they are inert.
Measured with `python -m bench.model_step` (README, "Full-model benchmark"):

- "fast": XLA's YNNPACK fusions off. jaxlib 0.10 hands each matmul fusion to
  YNNPACK, which runs it on about one core; without them XLA's own dot
  kernels use every core: BERT-base + ViT-B/32 bf16 train step at 8 x 128
  10.4 -> 8.2 s on 2 cores. At 32 x 128 it matches the memory schedule
  (36.7 s), and the tiny demo model is a little slower with it
  (configs/demo.py keeps "xla").
- "lean": the plain (memory-ordered) scheduler instead of the concurrency-
  optimised one, which keeps several GiB of temporaries alive to run
  independent ops side by side: 8 x 256 with remat 8.1 -> 2.6 GiB of
  temporaries, 6.35 GiB peak; 32 x 128 16.4 GiB peak, 36.8 s.
- "fast_lean": both. Without YNNPACK XLA plans more temporaries (8 x 256
  with remat: 3.5 GiB, peak 7.37 GiB, 23.2 s against lean's 21.7 s), so
  "lean" is the one for the smallest footprint.
- "xla": XLA's own defaults.

A flag the user already put in XLA_FLAGS is left as they set it.
"""
import logging
import os

log = logging.getLogger(__name__)

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="
MEMORY_SCHEDULE = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
PRESETS = {
    "xla": (),
    "fast": (YNN_OFF,),
    "lean": (MEMORY_SCHEDULE,),
    "fast_lean": (YNN_OFF, MEMORY_SCHEDULE),
}


def flags_for(preset: str) -> tuple[str, ...]:
  if preset not in PRESETS:
    raise ValueError(f"config.xla_cpu={preset!r}: allowed {sorted(PRESETS)}")
  return PRESETS[preset]


def merged_xla_flags(preset: str, current: str = "") -> str:
  """`current` XLA_FLAGS plus the preset's flags that it does not already set."""
  have = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in flags_for(preset) if f.split("=", 1)[0] not in have]
  return " ".join(filter(None, [current.strip(), *extra]))


def _backend_started() -> bool:
  import jax._src.xla_bridge as xb  # private, but only read: jax has no public probe
  return bool(getattr(xb, "_backends", None))


def apply(preset: str) -> str:
  """Adds the preset to os.environ["XLA_FLAGS"]; returns the resulting flags.

  Raises if a backend already started with different flags, since XLA would
  silently ignore them.
  """
  merged = merged_xla_flags(preset, os.environ.get("XLA_FLAGS", ""))
  if merged == os.environ.get("XLA_FLAGS", ""):
    return merged
  if _backend_started():
    raise RuntimeError(
        f"config.xla_cpu={preset!r}: JAX's backend already started, so XLA would ignore "
        f"{merged!r}; apply the preset before the first JAX computation, or set "
        "XLA_FLAGS in the environment")
  os.environ["XLA_FLAGS"] = merged
  log.info("XLA_FLAGS=%s (config.xla_cpu=%s)", merged, preset)
  return merged
