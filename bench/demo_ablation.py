r"""REMOTE's ablations on the demo world, over seeds (issue 19; paper tables 3 and 5).

  python -m bench.demo_ablation --seeds 0,1,2 --workdir runs/demo_ablation

Trains `configs/demo.py:ARGS` once per variant and seed (`remote_jax.train` in a
child process, `--parallel` at a time), reads each run's summary.json (test at
the best-dev step) and prints one JSON line per variant: test F1 overall, per
triplet type and on the compositional bucket, as mean and standard deviation
over the seeds. For the full model it adds the router's mean expert weights per
triplet type (each seed's plots/router_by_type.json, averaged). A bar plot goes
to WORKDIR/demo_ablation.png and the JSON lines to WORKDIR/demo_ablation.jsonl.
A finished run (summary.json present) is read, not retrained.
"""
import argparse
import concurrent.futures
import json
import pathlib
import subprocess
import sys
import time

import numpy as np

# (name, configs/demo.py args, field overrides): the full model, table 3's MOT and MMoE
# ablations and the modality ablation (the default set), then issue 19's model changes
# undone one at a time (ask for them with --variants).
VARIANTS = (
    ("full", "", ()),
    ("mot=none", "mot=none", ()),
    ("mot=xattn", "mot=xattn", ()),
    ("mot=ot_reference", "mot=ot_reference", ()),
    ("moe=off", "moe=off", ()),
    ("modalities=text", "modalities=text", ()),
    ("modalities=vision", "modalities=vision", ()),
    ("box=pre_norm", "", ("--config.model.box_position=pre_norm",)),
    ("vision_ot=image", "", ("--config.model.mot.vision_scope=image",)),
    ("route=example", "", ("--config.model.moe.route_by=example",
                           "--config.model.moe.router_norm=False")),
    ("balance=0", "", ("--config.model.moe.balance_weight=0.0",)),
    ("depth_summary=off", "", ("--config.model.depth_summary=off",)),
)
DEFAULT_VARIANTS = tuple(n for n, _, _ in VARIANTS[:7])
KEYS = ("test/f1", "test/e-e/f1", "test/o-o/f1", "test/e-o/f1", "test/compositional/f1",
        "dev/f1")


def run_one(name, args, seed, workdir, overrides):
  # `overrides`: the variant's fields, then the command line's (which win).
  """Trains one (variant, seed) unless its summary exists; -> (summary dict, seconds)."""
  out = workdir / name.replace("=", "-") / f"seed_{seed}"
  summary = out / "summary.json"
  t0 = time.perf_counter()
  if not summary.exists():
    out.mkdir(parents=True, exist_ok=True)
    config = f"configs/demo.py:{args}" if args else "configs/demo.py"
    cmd = [sys.executable, "-m", "remote_jax.train", f"--config={config}",
           f"--workdir={out}", f"--config.seed={seed}", *overrides]
    with open(out / "train.log", "w") as log:
      done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not summary.exists():
      tail = (out / "train.log").read_text()[-600:]
      return {"error": f"{' '.join(cmd)} failed ({done.returncode}): {tail}"}, 0.0
  result = json.loads(summary.read_text())
  router = out / "plots" / "router_by_type.json"
  if router.exists():
    result["router_by_type"] = json.loads(router.read_text())
  return result, time.perf_counter() - t0


def aggregate(name, args, runs):
  """Mean and std (ddof 0, as metrics.seed_summary) of KEYS over the seeds' best-dev rows."""
  row = {"variant": name, "args": args, "seeds": [seed for seed, _, _ in runs]}
  errors = [r["error"] for _, r, _ in runs if "error" in r]
  if errors:
    row["errors"] = errors
  best = [r["best_dev"] for _, r, _ in runs if "best_dev" in r]
  for key in KEYS:
    values = [b[key] for b in best if key in b]
    if values:
      row[key] = {"mean": round(float(np.mean(values)), 2),
                  "std": round(float(np.std(values)), 2), "n": len(values)}
  row["seconds_per_run"] = round(float(np.mean([t for _, _, t in runs])), 1)
  routers = [r["router_by_type"] for _, r, _ in runs if "router_by_type" in r]
  if routers:
    row["router_by_type"] = {
        t: {e: round(float(np.mean([r[t][e] for r in routers if t in r])), 4)
            for e in routers[0][t] if e != "n"}
        for t in routers[0]}
  return row


def bar_plot(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = [k for k in KEYS[:-1] if any(k in r for r in rows)]
  fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(rows)), 4), dpi=100)
  width = 0.8 / len(keys)
  for i, key in enumerate(keys):
    means = [r.get(key, {}).get("mean", np.nan) for r in rows]
    stds = [r.get(key, {}).get("std", 0.0) for r in rows]
    ax.bar(np.arange(len(rows)) + (i - (len(keys) - 1) / 2) * width, means, width, yerr=stds,
           capsize=2, label=key.removeprefix("test/").removesuffix("/f1") or "all")
  ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=20, fontsize=8)
  ax.set(ylabel="test F1 at best dev (mean ± std)", ylim=(0, 105),
         title=f"demo world ablations, seeds {rows[0]['seeds']}")
  ax.legend(fontsize=7, ncol=len(keys), loc="upper center", bbox_to_anchor=(0.5, -0.18))
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return str(path)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                  help=f"comma list of {[n for n, _, _ in VARIANTS]}")
  ap.add_argument("--workdir", default="runs/demo_ablation")
  ap.add_argument("--parallel", type=int, default=2, help="runs at a time")
  # Any other flag goes to every run's remote_jax.train, e.g. --config.num_epochs=4.
  a, overrides = ap.parse_known_args()
  known = {n: (args, fields) for n, args, fields in VARIANTS}
  names = [v for v in a.variants.split(",") if v]
  unknown = [v for v in names if v not in known]
  if unknown:
    sys.exit(f"--variants: unknown {unknown}; known: {list(known)}")
  seeds = [int(s) for s in a.seeds.split(",") if s]
  workdir = pathlib.Path(a.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  jobs = [(n, s) for n in names for s in seeds]
  with concurrent.futures.ThreadPoolExecutor(a.parallel) as pool:
    futures = {job: pool.submit(run_one, job[0], known[job[0]][0], job[1], workdir,
                                [*known[job[0]][1], *overrides])
               for job in jobs}
    rows = []
    for name in names:
      runs = [(s, *futures[(name, s)].result()) for s in seeds]
      rows.append(aggregate(name, known[name][0], runs))
      print(json.dumps(rows[-1]), flush=True)
  (workdir / "demo_ablation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  print(json.dumps({"plot": bar_plot(rows, workdir / "demo_ablation.png")}))


if __name__ == "__main__":
  main()
