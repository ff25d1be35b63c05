r"""MI2RAGE paper fig. 5 on the demo world: test F1 against the number of synthetic views.

  python -m bench.mi2rage_views --workdir runs/mi2rage_ablation_no_real_image/teacher \
      --setting no_real_image --seeds 0,1,2 --n_train 1,3,5 --n_test 0,1,3,5 --parallel 2

Trains the student with N synthetic views per train instance for each N of
`--n_train` (`configs/mi2rage_demo.py:n_train=N`, in the given MI2RAGE
workdir, so generation, teachers and selections are reused: point it at the
`teacher` variant of bench/mi2rage_ablation.py) and evaluates each with M
teacher-ranked test views (+ the real view) for each M of `--n_test`
(`--eval_views`). Jobs are (N, seed) pairs, `--parallel` at a time, never two of
one seed at once (they share the seed's workdir). Prints and writes
(`views.jsonl`) one JSON line per (N, M): mean and std of F1 over the seeds;
writes `views.png` (left: F1 against N at the default M; right: F1 against M,
one line per N).
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--setting", default="no_real_image", choices=["no_real_text", "no_real_image"])
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--n_train", default="1,3,5")
  ap.add_argument("--n_test", default="0,1,3,5")
  ap.add_argument("--default_n_test", type=int, default=3)
  ap.add_argument("--extra", default="", help="config args of the ablation's teacher variant")
  ap.add_argument("--parallel", type=int, default=2)
  ap.add_argument("--out", default="", help="where views.jsonl/png go (default: workdir)")
  a = ap.parse_args()
  root = pathlib.Path(a.workdir)
  out = pathlib.Path(a.out or root)
  out.mkdir(parents=True, exist_ok=True)
  seeds = [int(s) for s in a.seeds.split(",") if s]
  n_train = [int(n) for n in a.n_train.split(",") if n]
  n_test = sorted({int(n) for n in a.n_test.split(",") if n} | {a.default_n_test})
  pending = [(n, s) for n in n_train for s in seeds]
  running, t_start = {}, time.perf_counter()
  while pending or running:
    busy = {s for _, s in running}
    start = next((j for j in pending if j[1] not in busy), None)
    if start is not None and len(running) < a.parallel:
      pending.remove(start)
      n, s = start
      arg = ",".join(x for x in (f"setting={a.setting}", "teacher=trained", f"n_train={n}",
                                 a.extra) if x)
      cmd = [sys.executable, "-m", "mi2rage_jax.train", "--config",
             f"configs/mi2rage_demo.py:{arg}", "--seeds", str(s), "--workdir", str(root),
             "--eval_views", ",".join(map(str, n_test))]
      log = open(out / f"views_ntr{n}_seed{s}.log", "w")
      running[start] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log)
      print(f"started n_train={n} seed={s}: {' '.join(cmd)}", file=sys.stderr, flush=True)
      continue
    for job, (proc, log) in list(running.items()):
      if proc.poll() is not None:
        log.close()
        del running[job]
        if proc.returncode:
          sys.exit(f"n_train={job[0]} seed={job[1]} failed (exit {proc.returncode}); see "
                   f"{out / f'views_ntr{job[0]}_seed{job[1]}.log'}")
    time.sleep(2)
  seconds = round(time.perf_counter() - t_start, 1)

  rows = []
  for n in n_train:
    for m in n_test:
      f1 = [json.loads((root / f"seed_{s}" / a.setting / "results" /
                        f"test_ntr{n}_nte{m}.json").read_text())["f1"] for s in seeds]
      rows.append(dict(setting=a.setting, n_train=n, n_test=m, f1_mean=round(np.mean(f1), 2),
                       f1_std=round(np.std(f1, ddof=1) if len(f1) > 1 else 0.0, 2),
                       f1_per_seed=[round(x, 2) for x in f1], seeds=len(f1)))
      print(json.dumps(rows[-1]), flush=True)
  (out / "views.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  print(f"wall {seconds} s", file=sys.stderr)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
  at = [r for r in rows if r["n_test"] == a.default_n_test]
  left.errorbar([r["n_train"] for r in at], [r["f1_mean"] for r in at],
                yerr=[r["f1_std"] for r in at], marker="o", capsize=3)
  left.set_xlabel(f"synthetic views at training (test: {a.default_n_test})")
  left.set_ylabel(f"student test F1 (mean ± std, {len(seeds)} seeds)")
  for n in n_train:
    rs = [r for r in rows if r["n_train"] == n]
    right.errorbar([r["n_test"] for r in rs], [r["f1_mean"] for r in rs],
                   yerr=[r["f1_std"] for r in rs], marker="o", capsize=3, label=f"train {n}")
  right.set_xlabel("synthetic views at test (+ the real view)")
  right.legend(fontsize=8)
  fig.suptitle(f"MI²RAGE demo (knowledge world), {a.setting}")
  fig.tight_layout()
  fig.savefig(out / "views.png", dpi=120)
  print(f"plot: {out / 'views.png'}", file=sys.stderr)


if __name__ == "__main__":
  main()
