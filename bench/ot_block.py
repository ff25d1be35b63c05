"""Time the fusion blocks: compile, forward, forward+backward (jit, median of N).

  python -m bench.ot_block            # text1, text11, vision6 (B=8, D=768): ~2 min on 2 idle cores
  python -m bench.ot_block --quick    # tiny shapes, a smoke run
  python -m bench.ot_block --shapes text1,text6,text11,vision6 --repeats 5

Prints one JSON object per line: one per (shape, case), then one summary line
with ott-jax's overhead over the hand-written log-domain Sinkhorn (the same
block with solver="jax": same cost, masks, iterations, unrolled gradient).
Shapes follow the released text OT (n=128 tokens, m=128*l source tokens for
level l) and vision OT (n=96 patch tokens, m=96*l); 10% of each side is padding.
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from remote_jax.models.fusion import make_fusion

SHAPES = {   # name: (B, n, m, D)
    "text1": (8, 128, 128, 768),
    "text6": (8, 128, 768, 768),
    "text11": (8, 128, 1408, 768),
    "vision6": (8, 96, 576, 768),
    "tiny": (2, 8, 24, 32),
}
CASES = {    # name: (variant, cfg)
    "ot_paper/ott/unrolled": ("ot_paper", {"diff": "unrolled"}),
    "ot_paper/ott/implicit": ("ot_paper", {"diff": "implicit"}),
    "ot_paper/jax/unrolled": ("ot_paper", {"solver": "jax"}),
    "ot_reference": ("ot_reference", {}),
    "xattn": ("xattn", {}),
}


def _inputs(shape, seed=0):
  b, n, m, d = shape
  rng = np.random.default_rng(seed)
  basis = rng.normal(size=(32, d))
  q = rng.normal(size=(b, n, 32)) @ basis + 2.0 * rng.normal(size=(b, n, d))
  s = rng.normal(size=(b, m, 32)) @ basis + 2.0 * rng.normal(size=(b, m, d))
  qm = np.arange(n)[None] < np.full((b, 1), n - n // 10)
  sm = np.arange(m)[None] < np.full((b, 1), m - m // 10)
  return (jnp.asarray(q, jnp.float32), jnp.asarray(qm), jnp.asarray(s, jnp.float32),
          jnp.asarray(sm), jnp.asarray(rng.normal(size=(b, n, d)), jnp.float32))


def _timed(fn, args, repeats):
  jax.block_until_ready(fn(*args))    # warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * statistics.median(times)


def bench_case(case, shape_name, repeats):
  variant, cfg = CASES[case]
  shape = SHAPES[shape_name]
  q, qm, s, sm, w = _inputs(shape)
  # config.model.mot of the variant's semantics; one xattn head per 64 dims, as released.
  semantics = "reference" if variant == "ot_reference" else "paper"
  cfg = dict(common.model_config("base", semantics).mot, variant=variant,
             num_heads=max(shape[-1] // 64, 1), **cfg)
  blk = make_fusion(cfg, shape[-1], "blk")
  params = jax.jit(blk.init)(jax.random.key(0), q, qm, s, sm)
  fwd = jax.jit(lambda p, q, qm, s, sm: blk.apply(p, q, qm, s, sm)[0])

  def loss(p, q, s):
    return jnp.sum(blk.apply(p, q, qm, s, sm)[0] * w)

  fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  row = {"case": case, "shape": shape_name, "B": shape[0], "n": shape[1], "m": shape[2], "D": shape[3]}
  try:
    t = time.perf_counter()
    fwd_c = fwd.lower(params, q, qm, s, sm).compile()
    row["compile_fwd_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    fwd_bwd_c = fwd_bwd.lower(params, q, s).compile()
    row["compile_fwd_bwd_s"] = round(time.perf_counter() - t, 2)
    row["fwd_ms"] = round(_timed(fwd_c, (params, q, qm, s, sm), repeats), 2)
    row["fwd_bwd_ms"] = round(_timed(fwd_bwd_c, (params, q, s), repeats), 2)
  except jax.errors.JaxRuntimeError as e:   # implicit mode: lineax can fail at run time
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny shapes only")
  parser.add_argument("--shapes", default="text1,text11,vision6",
                      help=f"comma list of {sorted(SHAPES)}")
  parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {list(CASES)}")
  parser.add_argument("--repeats", type=int, default=2, help="timed runs after a warm-up")
  args = parser.parse_args(argv)
  shapes = ["tiny"] if args.quick else args.shapes.split(",")
  cases = args.cases.split(",")
  for name in shapes + cases:
    if name not in SHAPES and name not in CASES:
      parser.error(f"unknown shape or case {name!r}")
  rows = []
  for shape in shapes:
    for case in cases:
      rows.append(bench_case(case, shape, args.repeats))
      print(json.dumps(rows[-1]), flush=True)
  overhead = {}
  for shape in shapes:
    by_case = {r["case"]: r for r in rows if r["shape"] == shape and "error" not in r}
    ott, own = by_case.get("ot_paper/ott/unrolled"), by_case.get("ot_paper/jax/unrolled")
    if ott and own:
      overhead[shape] = {k: round(ott[k] / own[k], 2) for k in
                         ("fwd_ms", "fwd_bwd_ms", "compile_fwd_s", "compile_fwd_bwd_s")}
  print(json.dumps({"summary": "ott_unrolled / hand-written log-domain", "ratio": overhead,
                        "device": str(jax.devices()[0]), "backend": jax.default_backend()}))


if __name__ == "__main__":
  main()
