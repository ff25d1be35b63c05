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
- "auto" / "auto_lean": which of the above wins depends on the CPU. YNNPACK's
  bfloat16 kernels use the avx512_bf16 (or AMX) instructions: on a Zen 4 with
  them, a 4096^3 bf16 matmul runs at 350-380 GFLOP/s under "xla" and 190-207
  with YNNPACK off, and the 8 x 128 step is 6.9 s under "xla" against 9.2 s
  under "fast"; on an x86 CPU without them YNNPACK's bf16 ran at 166-172 and
  "fast" won (above). So "auto" is "xla" on x86 CPUs with bf16 dot
  instructions, "fast" on other x86 CPUs and XLA's defaults elsewhere;
  "auto_lean" is the same choice plus the memory-ordered scheduler.

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


AUTO = {"auto": ("xla", "fast"), "auto_lean": ("lean", "fast_lean")}   # (bf16 dots, none)
BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")
CHOICES = sorted([*PRESETS, *AUTO])


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
  """The CPU's feature flags (x86 Linux), or None where they cannot be read."""
  try:
    with open(cpuinfo) as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return None


def resolve(preset: str, flags: set[str] | None = None) -> str:
  """The concrete preset that `preset` stands for on this CPU ("auto" picks)."""
  if preset not in CHOICES:
    raise ValueError(f"config.xla_cpu={preset!r}: allowed {CHOICES}")
  if preset not in AUTO:
    return preset
  flags = cpu_flags() if flags is None else flags
  with_bf16, without = AUTO[preset]
  # No flags to read (not an x86 Linux host): XLA's defaults, i.e. the bf16 choice.
  return with_bf16 if flags is None or flags & set(BF16_DOT_FLAGS) else without


def flags_for(preset: str) -> tuple[str, ...]:
  return PRESETS[resolve(preset)]


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
  concrete = resolve(preset)   # reads /proc/cpuinfo once
  merged = merged_xla_flags(concrete, os.environ.get("XLA_FLAGS", ""))
  if merged != os.environ.get("XLA_FLAGS", ""):
    if _backend_started():
      raise RuntimeError(
          f"config.xla_cpu={preset!r}: JAX's backend already started, so XLA would ignore "
          f"{merged!r}; apply the preset before the first JAX computation, or set "
          "XLA_FLAGS in the environment")
    os.environ["XLA_FLAGS"] = merged
  log.info("XLA_FLAGS=%s (config.xla_cpu=%s -> %s)", merged, preset, concrete)
  return merged


def release_freed_heap():
  """Hands glibc's freed heap back to the OS (a no-op without glibc).

  glibc keeps the memory that XLA's compiler freed mapped in the process, so
  buffers allocated afterwards stack on top of it instead of reusing it; the
  engine (CompiledPerShape) and bench/model_step.py call this after compiling the train step.
  """
  import ctypes
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:   # not glibc
    pass
