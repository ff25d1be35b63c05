r"""MI2RAGE ablation (paper table 3) on the demo world: student F1 per variant over seeds.

  python -m bench.mi2rage_ablation --workdir runs/mi2rage_ablation \
      --setting no_real_text --seeds 0,1,2 --parallel 2

Runs `python -m mi2rage_jax.train --config configs/mi2rage_demo.py:ARGS
--seeds ...` for each variant (MI2RAGE, no CCG, similarity teacher, random
teacher, no teacher, unimodal), `--parallel` variants at a time, each in its
own workdir (a rerun skips finished stages). Then prints and writes
(`ablation.jsonl`) one JSON line per variant: mean and standard deviation of
the student's test F1 and accuracy over the seeds, the per-seed F1, and the
demo generators' ground truth: the fraction of faithful views among all
generated train views and among those the student was trained on (mean over
seeds); on the knowledge world also, per example family, the student's test accuracy
(`acc_by_family`, mean and std) and the faithful and label-consistent fractions of the
views (`faithful_by_family`). Then the diversity of the views per chained-generation round of the
trained teacher's first seed, and `ablation.png` (bars with std error bars).
The paper's ordering (teacher > random and none > unimodal) is what this
measures, not what it assumes.
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

from remote_jax import metrics

# Paper table 3: MI2RAGE, no CCG, similarity ("CLIP") teacher, random teacher, no teacher,
# unimodal.
VARIANTS = {"teacher": "teacher=trained", "no_ccg": "teacher=trained,rounds=0",
            "similarity": "teacher=similarity", "random": "teacher=random",
            "none": "teacher=none", "unimodal": "unimodal=True",
            # Not in the paper: the analysis's upper bound, a selection that knows which
            # views the demo generators made faithfully.
            "oracle": "teacher=oracle",
            # Not in the paper: test views ranked by agreement with the consensus of the
            # instance's candidates instead of by confidence (selection.py).
            "agree": "teacher=trained,test_by=agree",
            # ... or by agreement with the teacher's reading of the real test view.
            "real": "teacher=trained,test_by=real",
            # ... or by the teacher's confidence alone (the default before 2026-12-04).
            "maxprob": "teacher=trained,test_by=maxprob"}


def faithful_by_family(run_dir, n=3):
  """{family: {split_all, split_kept}}: the generators' faithful fraction of all final-round
  candidates and of the first n of the final ranking (what the student sees), per example
  family of the knowledge world (kn_seen, kn_stated, oo, eo); {} for other worlds. For
  kn_seen and kn_stated also {split_all_consistent, split_kept_consistent}: the fraction
  that shows the cue of the true label (knowledge_world.label_consistent), what the paper's teacher
  selects for."""
  from mi2rage_jax import knowledge_world  # pylint: disable=import-outside-toplevel
  from mi2rage_jax import views as views_lib  # pylint: disable=import-outside-toplevel
  data = json.loads((run_dir.parent / "config.json").read_text())["data"]
  sels = sorted((run_dir / "selections").glob("train_round*.json"))
  if data["name"] != "demo_knowledge" or not sels:
    return {}
  rows = knowledge_world.examples(pathlib.Path("data_cache") / "demo", data["demo"])
  last = sels[-1].stem.split("round")[1]
  out = {}
  for split in ("train", "test"):
    store = views_lib.load_store(run_dir / "views" / split, check_files=False)
    sel = json.loads((run_dir / "selections" / f"{split}_round{last}.json").read_text())
    for iid, entry in sel["instances"].items():
      row = rows[iid]
      cue = row["family"] in ("kn_seen", "kn_stated")
      views = {v.id: v for r in range(store.num_rounds(iid)) for v in store.views(iid, r, cue)}
      f = out.setdefault(row["family"], {})
      for part, ids in (("all", entry["candidates"]), ("kept", entry["ranking"][:n])):
        f.setdefault(f"{split}_{part}", []).extend(views[v].meta["faithful"] for v in ids)
        if cue:
          f.setdefault(f"{split}_{part}_consistent", []).extend(
              knowledge_world.label_consistent(row, views[v].data) for v in ids)
  return {k: {p: sum(v) / len(v) for p, v in d.items()} for k, d in sorted(out.items())}


def faithful(run_dir):
  """(generated, trained-on) faithful fractions of one run's train views, or None."""
  path = run_dir / "results" / "diversity.json"
  if not path.exists():
    return None
  rounds = json.loads(path.read_text())["rounds"]
  gen = [r["generated"] for r in rounds]
  total = sum(g["n"] for g in gen)
  return (sum(g["n"] * g.get("faithful_fraction", 0.0) for g in gen) / total,
          rounds[-1]["kept"].get("faithful_fraction"))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", default="runs/mi2rage_ablation")
  ap.add_argument("--setting", default="no_real_text", choices=["no_real_text", "no_real_image"])
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--variants", default=",".join(VARIANTS))
  ap.add_argument("--extra", default="", help="more config args, e.g. noise=0.5")
  ap.add_argument("--parallel", type=int, default=2)
  a = ap.parse_args()
  root = pathlib.Path(a.workdir)
  root.mkdir(parents=True, exist_ok=True)
  names = [v for v in a.variants.split(",") if v]
  pending, running, seconds = list(names), {}, {}
  while pending or running:
    while pending and len(running) < a.parallel:
      name = pending.pop(0)
      arg = ",".join(x for x in (f"setting={a.setting}", VARIANTS[name], a.extra) if x)
      log = open(root / f"{name}.log", "w")
      cmd = [sys.executable, "-m", "mi2rage_jax.train",
             "--config", f"configs/mi2rage_demo.py:{arg}", "--seeds", a.seeds,
             "--workdir", str(root / name)]
      running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log,
                       time.perf_counter())
      print(f"started {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    for name, (proc, log, t0) in list(running.items()):
      if proc.poll() is not None:
        log.close()
        seconds[name] = round(time.perf_counter() - t0, 1)
        del running[name]
        if proc.returncode:
          sys.exit(f"{name} failed (exit {proc.returncode}); see {root / f'{name}.log'}")
    time.sleep(2)

  rows = []
  for name in names:
    runs = [root / name / f"seed_{s}" / a.setting for s in a.seeds.split(",") if s]
    # The per-seed result files of this table's view numbers (bench.mi2rage_views may have
    # trained other students in the same workdirs since; seeds_summary.json is the last run's).
    views = {"n_train": "3", "n_test": "3", **dict(
        x.split("=") for x in a.extra.split(",") if x.startswith(("n_train=", "n_test=")))}
    res = [json.loads((r / "results" / f"test_ntr{views['n_train']}_nte{views['n_test']}.json")
                      .read_text()) for r in runs]
    agg = metrics.seed_summary(res)
    f1s = [round(x["f1"], 2) for x in res]
    fa = [f for f in (faithful(r) for r in runs) if f is not None]
    row = dict(variant=name, args=VARIANTS[name], setting=a.setting,
               f1_mean=round(agg["f1"]["mean"], 2), f1_std=round(agg["f1"]["std"], 2),
               acc_mean=round(agg["acc"]["mean"], 2), acc_std=round(agg["acc"]["std"], 2),
               seeds=agg["f1"]["n"], f1_per_seed=f1s, seconds=seconds.get(name),
               extra=a.extra)
    fams = sorted({k.split("/")[1] for k in agg if k.startswith("buckets/")})
    if fams:   # accuracy per knowledge-world family (kn_seen: only the image decides)
      row["acc_by_family"] = {f: [round(agg[f"buckets/{f}/acc"]["mean"], 2),
                                  round(agg[f"buckets/{f}/acc"]["std"], 2)] for f in fams}
    if fa:
      row.update(faithful_generated=round(sum(f[0] for f in fa) / len(fa), 3),
                 faithful_trained_on=round(sum(f[1] for f in fa) / len(fa), 3))
    fams = [f for f in (faithful_by_family(r) for r in runs) if f]
    if fams:   # mean over seeds
      row["faithful_by_family"] = {
          k: {p: round(sum(f[k][p] for f in fams) / len(fams), 3) for p in fams[0][k]}
          for k in fams[0]}
    rows.append(row)
    print(json.dumps(row), flush=True)
  (root / "ablation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  first = a.seeds.split(",")[0]
  div = root / "teacher" / f"seed_{first}" / a.setting / "results" / "diversity.json"
  if div.exists():
    for r in json.loads(div.read_text())["rounds"]:
      print(json.dumps({"diversity_round": r["round"], **{
          part: {"n": r[part]["n"], "log10_gv": round(r[part]["log10"], 3),
                 "faithful": round(r[part].get("faithful_fraction", float("nan")), 3)}
          for part in ("generated", "candidates", "kept")}}), flush=True)

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows)), 3.4))
  ax.bar([r["variant"] for r in rows], [r["f1_mean"] for r in rows],
         yerr=[r["f1_std"] for r in rows], capsize=4, color="#4c72b0")
  ax.tick_params(axis="x", labelrotation=20, labelsize=8)
  ax.set_ylabel(f"student test F1 (mean ± std, {rows[0]['seeds']} seeds)")
  ax.set_title(f"MI²RAGE demo, {a.setting}")
  fig.tight_layout()
  fig.savefig(root / "ablation.png", dpi=120)
  print(f"plot: {root / 'ablation.png'}", file=sys.stderr)


if __name__ == "__main__":
  main()
