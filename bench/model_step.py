r"""Full-model benchmark: forward, train step, compile time, peak memory, FLOP/s.

  python -m bench.model_step                       # tiny + base shapes, paper semantics
  python -m bench.model_step --sizes tiny --semantics paper,reference
  python -m bench.model_step --sizes base --batch 8 --length 256
  python -m bench.model_step --sizes base --dtype bfloat16 --remat --batch 8 --length 256 \
      --xla-cpu lean          # the README's runs (with GLIBC_TUNABLES=glibc.malloc.hugetlb=1)

Prints one JSON object per line. Each configuration runs in its own
subprocess so that `peak_rss_gib` (the process's maximum resident set, which
on a CPU holds parameters, optimizer state and activations) belongs to it
alone. `flops` is XLA's cost analysis of the compiled step; `matmul_peak` is
this machine's measured matmul rate (4096^2, same threads) in float32 and in
bfloat16 (f32 accumulation), the best over the XLA:CPU presets "xla" and
"fast" (each in its own process: XLA reads its flags once), and
`fraction_of_peak` divides by the faster of the run's dtype and float32, to
compare with perf_reference.md's 66% for the released code. XLA's kernels may
run the model's own matmul shapes (MODEL_SHAPES) faster than 4096^3, so the
peak row has their best rate too (`<dtype>_model_shapes`) and each row also gets
`fraction_of_model_shape_peak`, the stricter figure. On a GPU or TPU, `mfu`
divides by the chip's spec-sheet dense bf16 peak (SPEC_BF16_TFLOPS) as well.
`--xla-cpu` picks the run's
XLA:CPU flag preset (remote_jax/xla_cpu.py; training's default is "auto").

The step is the engine's (`engine.build` with REMOTE's loss and the default config.optim,
on one device), compiled from abstract shapes before the state exists, as training does;
the vocabulary is the default tokenizer's (with the markers) and the head has
`--classes` outputs.
"""
import argparse
import json
import os
import resource
import time

import numpy as np

from bench import run_child
from remote_jax import xla_cpu
from remote_jax.xla_cpu import release_freed_heap

# The BERT-base and ViT-B linear layers' matmuls at 32 x 128 tokens (m, k, n).
MODEL_SHAPES = ((4096, 768, 768), (4096, 768, 3072), (4096, 3072, 768))


def matmul_gflops(m, k, n, dtype="float32", reps=5):
  """Best of `reps` (m,k) x (k,n) matmuls; bfloat16 operands accumulate in float32
  (the native kernel that layers.dot_general uses)."""
  import jax
  import jax.numpy as jnp
  a, b = jnp.ones((m, k), dtype), jnp.ones((k, n), dtype)
  f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * m * k * n / best / 1e9


def matmul_peaks(dtype):
  """{dtype: 4096^3 GFLOP/s (perf_reference.md's peak), dtype_model_shapes: the
  best over MODEL_SHAPES}: XLA's kernels can be faster at the model's shapes."""
  return {dtype: round(matmul_gflops(4096, 4096, 4096, dtype), 1),
          f"{dtype}_model_shapes": round(max(matmul_gflops(*s, dtype) for s in MODEL_SHAPES), 1)}


def peak_rss_gib():
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)


def batch_for(meta, batch, rng):
  from remote_jax import task
  b = task.dummy_batch(meta, batch)
  L, K = meta["max_length"], meta["num_objects"]
  b["input_ids"] = rng.integers(1000, 30000, (batch, L)).astype(np.int32)
  b["attention_mask"][:, int(L * 0.8):] = 0
  b["obj_pixels"] = rng.normal(size=b["obj_pixels"].shape).astype(np.float32)
  b["obj_depth"] = rng.normal(size=b["obj_depth"].shape).astype(np.float32)
  b["obj_boxes"] = rng.uniform(size=b["obj_boxes"].shape).astype(np.float32)
  b["obj_mask"][:, K - 2:] = False
  b["head_marker"][:], b["tail_marker"][:] = 1, 5
  b["head_desc"][:] = L // 2
  b["tail_obj"][: batch // 2] = 0
  b["label"] = rng.integers(0, min(8, meta["num_classes"]), batch).astype(np.int32)
  return b


# Dense bf16 peak of one chip from the vendors' spec sheets (TFLOP/s, no
# sparsity), for model FLOP utilisation on accelerators; the first key that
# the device kind contains wins, so "H100 PCIe" precedes "H100".
SPEC_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.4, "H200": 989.4, "A100": 312.0,
                    "L4": 121.0, "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5p": 459.0,
                    "TPU v6 lite": 918.0}


def spec_peak_tflops(device_kind):
  return next((v for k, v in SPEC_BF16_TFLOPS.items() if k in device_kind), None)


def child_env(preset):
  """XLA reads XLA_FLAGS once per process (jit's compiler_options did not reach
  the scheduler flag), so each preset runs in a child process."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_cpu.merged_xla_flags(preset, env.get("XLA_FLAGS", ""))
  return env


def child(one, preset):
  """`one` (a configuration, or {"peak": True}) in a child process under `preset`."""
  return run_child("bench.model_step", one, child_env(preset))


def run_one(size, semantics, batch, length, objects, crop, steps, dtype, remat, mot, diff,
            solver="", xla_cpu="auto", profile="", classes=28):
  import flax.linen as nn
  import jax

  from configs import common
  from remote_jax import engine, sharding, task
  from remote_jax.data.tokenizer import RelationTokenizer
  from remote_jax.models import remote

  cfg = common.model_config(size, semantics)
  cfg.vision.image_size = crop
  cfg.vision.patch_size = 32 if crop >= 64 else crop // 2
  cfg.dtype = dtype
  cfg.remat = remat
  if mot:
    cfg.mot.variant = mot
  if diff:
    cfg.mot.diff = diff
  if solver:
    cfg.mot.solver = solver
  meta = dict(max_length=length, num_objects=objects, crop_size=crop, num_classes=classes,
              vocab_size=RelationTokenizer().vocab_size)   # the data's tokenizer, + markers
  rng = np.random.default_rng(0)
  b = batch_for(meta, batch, rng)
  model = remote.build(cfg, meta["num_classes"], meta["vocab_size"])
  mesh = sharding.make_mesh([("data", 1)], devices=jax.devices()[:1])
  rss = {}   # the process's peak RSS after each phase: where the peak comes from

  # Compile from abstract shapes before any array exists, as training does: the
  # compiler's own memory then does not stack on parameters and Adam state.
  init = lambda: nn.meta.unbox(model.init({"params": jax.random.key(0)}, b)["params"])
  abstract_params = jax.eval_shape(init)
  fwd = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  t0 = time.perf_counter()
  fwd_c = fwd.lower(abstract_params, b).compile()
  fwd_compile_s = time.perf_counter() - t0
  rss["compile_forward"] = peak_rss_gib()
  release_freed_heap()

  t0 = time.perf_counter()
  s = engine.build(model, b, common.optim_config(), steps + 1, mesh, loss_fn=task.remote_loss,
                   eval_fn=task.make_eval_step,
                   compile_batch=task.abstract_batch(meta, batch, sharding.batch_sharding(mesh)))
  jax.block_until_ready(s.state)
  compile_s = s.train_step.compile_s
  init_s = time.perf_counter() - t0 - compile_s   # the state's init (and the optimizer's)
  compiled = s.train_step.compiled(b)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(s.state.params))
  rss["build"] = peak_rss_gib()   # the train step's compilation, then the state
  release_freed_heap()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  mem = compiled.memory_analysis()   # XLA's buffer plan for one step
  step_gib = {k: round(getattr(mem, f"{k}_size_in_bytes") / 2 ** 30, 2)
              for k in ("argument", "output", "temp")} if mem else {}

  def timeit(fn, n):
    out, times = None, []
    for _ in range(n):
      t = time.perf_counter()
      out = fn()
      jax.block_until_ready(out)
      times.append(time.perf_counter() - t)
    return out, times

  holder = [s.state]   # donated by each step
  del s

  def one_step():
    holder[0], m = compiled(holder[0], b, jax.random.key(1))
    return m["loss"]

  _, step_times = timeit(one_step, steps + 1)
  rss["train"] = peak_rss_gib()
  _, fwd_times = timeit(lambda: fwd_c(holder[0].params, b), steps + 1)
  rss["forward"] = peak_rss_gib()
  step_s = float(np.median(step_times[1:]))
  extra = {}
  if profile:   # one more step under the profiler, grouped by component and op kind
    from bench import op_profile
    with jax.profiler.trace(profile):
      jax.block_until_ready(one_step())
    extra["profile"] = op_profile.summarise(profile, compiled.as_text())
  return dict(
      size=size, semantics=semantics, mot=cfg.mot.variant, diff=cfg.mot.diff,
      solver=cfg.mot.solver, remat=remat, dtype=dtype, xla_cpu=xla_cpu,
      xla_flags=os.environ.get("XLA_FLAGS", ""),
      batch=batch, tokens=length, objects=objects, crop=crop, classes=classes,
      params_m=round(n_params / 1e6, 2),
      init_s=round(init_s, 2), compile_train_s=round(compile_s, 2),
      compile_forward_s=round(fwd_compile_s, 2),
      forward_s=round(float(np.median(fwd_times[1:])), 4), train_step_s=round(step_s, 4),
      samples_per_s=round(batch / step_s, 3), train_gflop=round(flops / 1e9, 1),
      achieved_gflops=round(flops / step_s / 1e9, 1) if flops else None,
      step_buffers_gib=step_gib,
      peak_rss_gib=peak_rss_gib(), peak_rss_after=rss,
      backend=jax.default_backend(), devices=jax.device_count(),
      device_kind=jax.devices()[0].device_kind, **extra)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--sizes", default="tiny,base")
  ap.add_argument("--semantics", default="paper")
  ap.add_argument("--batch", type=int, default=0, help="0: 8 for tiny, 32 for base")
  ap.add_argument("--length", type=int, default=0, help="0: 48 for tiny, 128 for base")
  ap.add_argument("--objects", type=int, default=12)
  ap.add_argument("--classes", type=int, default=28, help="the head's outputs (UMRE: 28)")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--mot", default="")
  ap.add_argument("--diff", default="")
  ap.add_argument("--solver", default="", help="ott | jax (the OT blocks' Sinkhorn)")
  ap.add_argument("--xla-cpu", default="auto", choices=xla_cpu.CHOICES,
                  help="XLA:CPU flag preset (remote_jax/xla_cpu.py)")
  ap.add_argument("--profile", default="",
                  help="trace one more step into this directory; the row gets a 'profile' "
                       "summary (bench/op_profile.py)")
  ap.add_argument("--one", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.one:   # child process: one configuration, or the matmul peak
    one = json.loads(args.one)
    if "peak" in one:
      row = {k: v for d in ("float32", "bfloat16") for k, v in matmul_peaks(d).items()}
    else:
      row = run_one(**one)
    print(json.dumps(row), flush=True)
    return
  by_preset = {p: child({"peak": True}, p) for p in ("xla", "fast")}
  peaks = {k: max(r.get(k, 0.0) for r in by_preset.values())
           for d in ("float32", "bfloat16") for k in (d, f"{d}_model_shapes")}
  print(json.dumps({"matmul_peak_gflops": peaks, "by_preset": by_preset}), flush=True)
  for size in args.sizes.split(","):
    for semantics in args.semantics.split(","):
      one = dict(size=size, semantics=semantics,
                 batch=args.batch or (8 if size == "tiny" else 32),
                 length=args.length or (48 if size == "tiny" else 128),
                 objects=args.objects, crop=32 if size == "tiny" else 64, steps=args.steps,
                 dtype=args.dtype, remat=args.remat, mot=args.mot, diff=args.diff,
                 solver=args.solver, xla_cpu=args.xla_cpu, classes=args.classes,
                 profile=f"{args.profile}/{size}_{semantics}" if args.profile else "")
      row = child(one, args.xla_cpu)
      if row.get("achieved_gflops"):
        # Against the faster of the run's dtype and float32: a bf16 step could
        # always run in float32 (and on CPUs without bf16 dot instructions
        # float32 matmuls are the faster ones).
        for key, suffix in (("fraction_of_peak", ""), ("fraction_of_model_shape_peak",
                                                       "_model_shapes")):
          peak = max(peaks[args.dtype + suffix], peaks["float32" + suffix])
          row[key] = round(row["achieved_gflops"] / peak, 3)
        spec = spec_peak_tflops(row.get("device_kind", ""))
        if spec and row.get("backend") != "cpu":   # MFU: model FLOPs / one chip's spec peak
          row["mfu"] = round(row["achieved_gflops"] / 1e3 / spec, 3)
      print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
