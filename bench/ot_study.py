r"""The OT study: fusion variants x seeds, trained alike and compared on the same seeds (issue 34).

  python -m bench.ot_study --config ot_study.py \
      --variants none,ot_paper,uniform,skip,detached,xattn,fgw,sdiv --seeds 0-4 \
      [--extra moe=off] --out runs/ot_study

A variant is a `model.mot` value (a key of remote_jax.models.fusion.FUSIONS, also
written `mot=NAME`) or one of the named ablations in ABLATIONS (`full`, `moe=off`,
`box=pre_norm`, ...). Each (variant, seed) trains `remote_jax.train --config
CONFIG:ARGS` in a child process (`--parallel` at a time) in OUT/runs/VARIANT[__EXTRA]__HASH/seed_N (HASH: of the config, args and overrides);
`--extra` is appended to every variant's config args, and any other flag
(`--config.num_epochs=4`) goes to every run. Unknown variants stop the study before
anything trains.

Per run (OUT/results.jsonl, one JSON line each): `metrics` (test F1 overall, per
triplet type and on the compositional bucket, and dev F1, at the best-dev step),
`ot` (that step's test plan diagnostics per level, `LEVEL/DIAG`: whatever the fusion
reports), `step_ms` (median steady-state training step, evaluation excluded),
`compile_s` (the train step's compile), `peak_mb` (the child's max RSS), `wall_s`;
or `status: failed` with the `error`. A finished run (its line, or summary.json in its
directory) is not retrained; a failed one is retried on the next call.

Per variant: mean and std (ddof 0, as metrics.seed_summary) over seeds, and the paired
difference of each F1 against `none` and against `uniform` on the seeds both finished,
with a seeded bootstrap 95% interval over seeds; "separated" when it excludes 0. Written
to OUT/table.md, OUT/plots/ot_study.png and printed as one JSON object.
"""
import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import threading
import time

import numpy as np

# Test F1 at the best-dev step: overall, per triplet type, then each bucket the world writes
# (the demo's `compositional`, the attribute world's `colour` and `shape`), in this order.
F1_KEYS = ("test/f1", "test/e-e/f1", "test/o-o/f1", "test/e-o/f1")
BASELINES = ("none", "uniform")


def is_metric(key):
  """A key of a run's best-dev row that the study keeps: dev F1, and the test F1 and
  accuracy overall, per triplet type and per bucket ("test/NAME/f1", "test/NAME/acc"). A
  bucket's accuracy counts its `none` lines too: on a bucket that is half positive, F1 is
  66.7 for a model that calls every line positive, accuracy 50."""
  return key == "dev/f1" or re.fullmatch(r"test/(?:[^/]+/)?(?:f1|acc)", key) is not None


def score_keys(rows):
  """The test scores present in `rows` (summaries or records' metrics): the F1 keys, F1_KEYS
  first, then the accuracies (overall, per type, per bucket) when any row has them."""
  found = {k for r in rows for k in r if is_metric(k) and k != "dev/f1"}
  f1 = [k for k in F1_KEYS if k in found] + sorted(k for k in found - set(F1_KEYS)
                                                   if k.endswith("/f1"))
  return f1 + sorted(k for k in found if k.endswith("/acc"))


def column_name(key):
  """"test/f1" -> "F1 all", "test/colour/f1" -> "colour", "test/colour/acc" -> "colour acc"."""
  *_, middle, last = ["", *key.split("/")]
  name = "all" if middle == "test" else middle
  return ("F1 all" if name == "all" else name) if last == "f1" else f"{name} acc"
# Named ablations beyond the mot values: (config args, field overrides).
ABLATIONS = {
    "full": ("", ()),
    "moe=off": ("moe=off", ()),
    "modalities=text": ("modalities=text", ()),
    "modalities=vision": ("modalities=vision", ()),
    "box=pre_norm": ("", ("--config.model.box_position=pre_norm",)),
    "vision_ot=image": ("", ("--config.model.mot.vision_scope=image",)),
    "route=example": ("", ("--config.model.moe.route_by=example",
                           "--config.model.moe.router_norm=False")),
    "balance=0": ("", ("--config.model.moe.balance_weight=0.0",)),
    "depth_summary=off": ("", ("--config.model.depth_summary=off",)),
}
N_BOOT = 10_000


@dataclasses.dataclass(frozen=True)
class Job:
  variant: str
  seed: int
  config: str          # the --config value, args included
  overrides: tuple     # --config.x=y flags
  workdir: pathlib.Path

  @property
  def key(self):
    return run_key(self.variant, self.seed, self.config, self.overrides)


def run_key(variant, seed, config, overrides):
  return json.dumps([variant, seed, config, list(overrides)])


# --- statistics -------------------------------------------------------------------------------

def bootstrap_ci(values, n_boot=N_BOOT, seed=0, level=0.95):
  """Percentile interval of the mean of `values`, resampled with replacement `n_boot`
  times from a seeded generator (the same numbers give the same interval)."""
  values = np.asarray(values, float)
  idx = np.random.default_rng(seed).integers(0, len(values), (n_boot, len(values)))
  means = values[idx].mean(axis=1)
  tail = 100 * (1 - level) / 2
  return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


ZERO = 1e-9   # bounds within this of 0 are 0


def paired_difference(values, baseline, n_boot=N_BOOT):
  """`values` - `baseline` ({seed: value} each) on their common seeds: {"mean", "n",
  "seeds", "ci" [lo, hi] and "separated" (the interval excludes 0)}; with fewer than two
  common seeds there is no interval ("ci" and "separated" None)."""
  seeds = sorted(set(values) & set(baseline))
  diffs = [values[s] - baseline[s] for s in seeds]
  out = {"mean": float(np.mean(diffs)) if diffs else None, "n": len(seeds), "seeds": seeds,
         "ci": None, "separated": None}
  if len(seeds) >= 2:
    lo, hi = bootstrap_ci(diffs, n_boot)
    # A bound that is 0 in exact arithmetic (a resample whose differences cancel) can come
    # out as -3e-15; it must not count as excluding 0.
    out.update(ci=[lo, hi], separated=bool(lo > ZERO or hi < -ZERO))
  return out


def mean_std(values):
  return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def summarise(records, variants, baselines=BASELINES):
  """One row per variant (in order) from the finished runs' records: each metric's mean,
  std and per-seed values, the paired differences against each baseline present, step ms
  and CPU s (mean), compile s and peak MB (max over seeds), and the plan diagnostics per
  level. Missing or null values are left out."""
  ok = [r for r in records if r.get("status") == "ok"]
  by_variant = {v: {r["seed"]: r for r in ok if r["variant"] == v} for v in variants}
  rows = []
  for v in variants:
    runs = by_variant[v]
    row = {"variant": v, "seeds": sorted(runs),
           "failed": {r["seed"]: r["error"] for r in records
                      if r["variant"] == v and r.get("status") == "failed"}}
    for key in score_keys([r.get("metrics", {}) for r in ok]) + ["dev/f1"]:
      per_seed = {s: r["metrics"][key] for s, r in runs.items()
                  if r.get("metrics", {}).get(key) is not None}
      if per_seed:
        row[key] = {**mean_std(list(per_seed.values())), "values": per_seed}
    row["vs"] = {}
    for base in baselines:
      if base in by_variant and base != v:
        row["vs"][base] = {
            key: paired_difference(row[key]["values"], {
                s: r["metrics"][key] for s, r in by_variant[base].items()
                if r.get("metrics", {}).get(key) is not None})
            for key in score_keys([row]) if key in row}
    for field, reduce in (("step_ms", np.mean), ("compile_s", np.max), ("peak_mb", np.max),
                          ("cpu_s", np.mean)):
      got = [r[field] for r in runs.values() if r.get(field) is not None]
      row[field] = float(reduce(got)) if got else None
    diags = {}
    for r in runs.values():
      for name, value in r.get("ot", {}).items():
        if value is None:   # non-finite, written as null
          continue
        level, _, diag = name.rpartition("/")
        diags.setdefault(level, {}).setdefault(diag, []).append(value)
    row["ot"] = {lvl: {d: mean_std(vals) for d, vals in ds.items()} for lvl, ds in diags.items()}
    rows.append(row)
  return rows


# --- formatting -------------------------------------------------------------------------------

def fmt_mean_std(stat, spec=".2f"):
  if not stat:
    return "n/a"
  mean = format(stat["mean"], spec)
  return mean if stat["n"] == 1 else f"{mean} ± {format(stat['std'], spec)}"


def fmt_diff(diff):
  """("+1.13 [-0.50, +2.70]", "yes"/"no"), or n/a where there is nothing to compare."""
  if not diff or diff["mean"] is None:
    return "n/a", "n/a"
  if diff["ci"] is None:
    return f"{diff['mean']:+.2f} (n={diff['n']})", "n/a"
  lo, hi = diff["ci"]
  return f"{diff['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]", "yes" if diff["separated"] else "no"


def fmt_num(x, digits):
  return "n/a" if x is None else f"{x:.{digits}f}"


def format_table(rows, baselines=BASELINES, metric="test/f1"):
  """Markdown: test F1 (mean ± std over seeds), the paired differences of `metric` against
  each baseline with their 95% intervals, timing and memory; then the plan diagnostics
  per level; then the failed runs."""
  keys = score_keys(rows)
  heads = ["variant", "seeds"] + [column_name(k) for k in keys]
  name = column_name(metric).removeprefix("F1 ")
  for base in baselines:
    heads += [f"Δ {name} vs {base} [95% CI]", "separated"]
  heads += ["step ms", "compile s", "peak MB", "CPU s"]
  lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
  for row in rows:
    cells = [f"`{row['variant']}`", str(len(row["seeds"]))]
    cells += [fmt_mean_std(row.get(k)) for k in keys]
    for base in baselines:
      cells += list(fmt_diff(row["vs"].get(base, {}).get(metric)))
    cells += [fmt_num(row["step_ms"], 1), fmt_num(row["compile_s"], 1),
              fmt_num(row["peak_mb"], 0), fmt_num(row["cpu_s"], 0)]
    lines.append("| " + " | ".join(cells) + " |")
  diag_names = sorted({d for row in rows for ds in row["ot"].values() for d in ds})
  if diag_names:
    lines += ["", "Plan diagnostics at the best-dev step (test split, mean ± std over seeds):",
              "", "| variant | level | " + " | ".join(diag_names) + " |",
              "|" + "---|" * (len(diag_names) + 2)]
    for row in rows:
      for level, ds in sorted(row["ot"].items()):
        cells = [f"`{row['variant']}`", level] + [
            fmt_mean_std(ds[d], ".3g") if d in ds else "" for d in diag_names]
        lines.append("| " + " | ".join(cells) + " |")
  failed = [(row["variant"], s, e) for row in rows for s, e in sorted(row["failed"].items())]
  if failed:
    lines += ["", "Failed runs:", ""] + [f"- `{v}` seed {s}: {e}" for v, s, e in failed]
  return "\n".join(lines) + "\n"


def plot(rows, path):
  """Per F1 key a panel: each seed's point and the mean with its bootstrap 95% interval."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  keys = score_keys(rows)
  if not keys:
    return None
  fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.6), dpi=100,
                           sharey=True, squeeze=False)
  jitter = np.random.default_rng(0)
  for ax, key in zip(axes[0], keys):
    for i, row in enumerate(rows):
      if key not in row:
        continue
      vals = list(row[key]["values"].values())
      ax.scatter(i + jitter.uniform(-0.12, 0.12, len(vals)), vals, s=10, alpha=0.6, color="C0")
      mean = row[key]["mean"]
      lo, hi = bootstrap_ci(vals) if len(vals) > 1 else (mean, mean)
      ax.errorbar(i + 0.25, mean, yerr=[[mean - lo], [hi - mean]], fmt="o", color="C3",
                  capsize=3, ms=4)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=45, ha="right",
                  fontsize=7)
    ax.set_xlim(-0.5, len(rows) - 0.25)
    ax.set_title(column_name(key), fontsize=9)
    ax.grid(axis="y", alpha=0.3)
  axes[0][0].set_ylabel("test score at best dev (seeds; mean, 95% CI)")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path)
  plt.close(fig)
  return str(path)


# --- runs -------------------------------------------------------------------------------------

def record_from_summary(summary):
  """A run's record fields from its summary.json: the best-dev row's metrics and test
  plan diagnostics (`test/ot/LEVEL/DIAG` -> `LEVEL/DIAG`), and its timing."""
  best = summary.get("best_dev", {})
  return {"status": "ok", "best_step": best.get("step"),
          "metrics": {k: v for k, v in best.items() if is_metric(k)},
          "ot": {k[len("test/ot/"):]: v for k, v in best.items() if k.startswith("test/ot/")},
          "step_ms": summary.get("step_ms"), "compile_s": summary.get("compile_s"),
          "wall_s": summary.get("wall_s")}


def last_error(log_path, limit=400):
  """The last non-empty line of a run's log (our CLIs end a failure with one line)."""
  try:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
  except OSError:
    return ""
  return lines[-1][-limit:] if lines else ""


def train_command(job):
  return [sys.executable, "-m", "remote_jax.train", f"--config={job.config}",
          f"--workdir={job.workdir}", f"--config.seed={job.seed}", *job.overrides]


def train_subprocess(job, env=None):
  """Trains `job` in a child process (isolated, its memory returned at exit) -> its
  record; the child's max RSS is its peak memory. Raises RuntimeError when it fails."""
  job.workdir.mkdir(parents=True, exist_ok=True)
  cmd = train_command(job)
  t0 = time.perf_counter()
  with open(job.workdir / "train.log", "a") as log:
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  summary = job.workdir / "summary.json"
  if proc.returncode != 0 or not summary.exists():
    raise RuntimeError(f"exit {proc.returncode}: {last_error(job.workdir / 'train.log')} "
                       f"({shlex.join(cmd)}; log {job.workdir / 'train.log'})")
  record = record_from_summary(json.loads(summary.read_text()))
  # ru_maxrss is in KiB on Linux; the CPU seconds estimate a run's cost on an idle machine.
  record.update(peak_mb=round(usage.ru_maxrss / 1024, 1),
                cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
                child_wall_s=round(time.perf_counter() - t0, 1))
  return record


def load_results(path):
  """{run key: record} of a results.jsonl (the last line of a key wins)."""
  done = {}
  if path.exists():
    for line in path.read_text().splitlines():
      if line.strip():
        r = json.loads(line)
        done[run_key(r["variant"], r["seed"], r["config"], r["overrides"])] = r
  return done


def rescore(jobs, out):
  """Rebuilds every finished run's record in OUT/results.jsonl from its summary.json (after
  a change of what a record keeps), keeping the child's timing and memory; -> how many."""
  path = pathlib.Path(out) / "results.jsonl"
  done = load_results(path)
  n = 0
  for job in jobs:
    summary = job.workdir / "summary.json"
    if job.key in done and summary.exists():
      done[job.key] = {**done[job.key], **record_from_summary(json.loads(summary.read_text()))}
      n += 1
  path.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
  return n


def run_study(jobs, out, runner=train_subprocess, parallel=2, log=print):
  """Runs the jobs not finished before (a line with status ok in OUT/results.jsonl, or a
  summary.json in the run's directory), `parallel` at a time; each finished or failed run
  is appended to OUT/results.jsonl as it ends, and the file is rewritten with one line
  per run at the end. -> the jobs' records, in the jobs' order.

  Seed by seed: every variant's first seed comes early (paired comparisons from the
  first finished seeds; no two seeds of a variant compile its steps at once, the later
  read them from the compilation cache). The first run trains alone: it writes the
  data set the others read."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / "results.jsonl"
  done = load_results(path)
  lock = threading.Lock()

  def base(job):
    return {"variant": job.variant, "seed": job.seed, "config": job.config,
            "overrides": list(job.overrides), "workdir": str(job.workdir)}

  def finish(job, record):
    with lock:
      done[job.key] = record
      with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
    state = record["status"] if record["status"] == "failed" else (
        f"test F1 {record['metrics'].get('test/f1', float('nan')):.2f}")
    log(f"{job.variant} seed {job.seed}: {state}")

  def run(job):
    try:
      record = {**base(job), **runner(job)}
    except Exception as e:  # a run's failure is data: the study goes on
      record = {**base(job), "status": "failed", "error": f"{type(e).__name__}: {e}"}
    finish(job, record)

  todo = []
  for job in jobs:
    if done.get(job.key, {}).get("status") == "ok":
      continue
    summary = job.workdir / "summary.json"
    if summary.exists():   # trained before its line was written (an interrupted study)
      finish(job, {**base(job), **record_from_summary(json.loads(summary.read_text()))})
    else:
      todo.append(job)
  log(f"{len(jobs) - len(todo)} of {len(jobs)} runs finished before; training {len(todo)}")
  todo.sort(key=lambda job: job.seed)
  for job in todo[:1]:
    run(job)
  with concurrent.futures.ThreadPoolExecutor(max(parallel, 1)) as pool:
    list(pool.map(run, todo[1:]))
  path.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
  return [done[job.key] for job in jobs]


# --- command line -----------------------------------------------------------------------------

def parse_seeds(text):
  """"0-4" or "0,1,2" or "0-2,5" -> [0, 1, 2, 3, 4] ..."""
  seeds = []
  for part in filter(None, (p.strip() for p in text.split(","))):
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not m:
      raise ValueError(f"--seeds={text}: {part!r} is not N or N-M")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    seeds += range(lo, hi + 1)
  return list(dict.fromkeys(seeds))


def variant_spec(token, fusions):
  """A --variants token -> (name, config args, overrides). Raises ValueError naming the
  known ones."""
  name = token.removeprefix("mot=")
  if name in fusions:
    return name, f"mot={name}", ()
  if token in ABLATIONS:
    return (token, *ABLATIONS[token])
  raise ValueError(f"--variants: unknown mot variant {name!r}; known: {', '.join(fusions)} "
                   f"(remote_jax.models.fusion.FUSIONS), or the ablations "
                   f"{', '.join(ABLATIONS)}")


def config_value(config, *args):
  path, _, arg = config.partition(":")
  arg = ",".join(a for a in (arg, *args) if a)
  return f"{path}:{arg}" if arg else path


def slug(text):
  return re.sub(r"[^\w.-]+", "-", text).strip("-")


def make_jobs(config, variants, seeds, extra, overrides, out, fusions):
  """The study's jobs, after checking every variant's config loads (a bad name or arg
  fails here, before anything trains)."""
  from remote_jax import cli
  # `none` and `mot=none` are one variant: trained once.
  specs = list({spec[0]: spec for spec in (variant_spec(t, fusions) for t in variants)}.values())
  jobs = []
  for name, arg, fields in specs:
    value = config_value(config, arg, extra)
    cli.load_config(value)
    # The directory names the variant and hashes what it trains (config, args, overrides):
    # a rerun with another config or --config.x never picks up this one's runs.
    key = hashlib.sha1(json.dumps([value, *fields, *overrides]).encode()).hexdigest()[:8]
    run_dir = pathlib.Path(out) / "runs" / (
        slug(name) + (f"__{slug(extra)}" if extra else "") + f"__{key}")
    jobs += [Job(name, s, value, (*fields, *overrides), run_dir / f"seed_{s}") for s in seeds]
  return jobs


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="ot_study.py",
                  help="configs/NAME.py[:arg] every run starts from")
  ap.add_argument("--variants", default="none,ot_paper,xattn",
                  help="comma list of mot variants (FUSIONS) and named ablations (ABLATIONS)")
  ap.add_argument("--seeds", default="0-4", help="N-M or a comma list")
  ap.add_argument("--extra", default="", help="config args added to every variant, e.g. moe=off")
  ap.add_argument("--out", default="runs/ot_study")
  ap.add_argument("--parallel", type=int, default=2, help="runs at a time")
  ap.add_argument("--baselines", default=",".join(BASELINES),
                  help="variants every other is compared with, paired by seed")
  ap.add_argument("--metric", default="test/f1",
                  help="the score whose paired differences the table shows (test/f1, "
                       "test/NAME/f1 or test/NAME/acc; all are in the JSON)")
  ap.add_argument("--rescore", action="store_true",
                  help="rebuild the finished runs' records from their summary.json first")
  ap.add_argument("--xla_cache", default="OUT/xla_cache",
                  help="persistent compilation cache shared by the runs (later seeds of a "
                       "variant read its compiled steps); '' for none")
  # Any other flag goes to every run's remote_jax.train, e.g. --config.num_epochs=4.
  a, overrides = ap.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith("--config.")]
  from remote_jax import errors
  from remote_jax.models.fusion import FUSIONS
  try:
    if bad:
      raise ValueError(f"unknown arguments {bad}: only --config.FIELD=VALUE passes to the runs")
    seeds = parse_seeds(a.seeds)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    jobs = make_jobs(a.config, variants, seeds, a.extra, tuple(overrides), a.out, FUSIONS)
    baselines = [b.strip() for b in a.baselines.split(",") if b.strip()]
    names = list(dict.fromkeys(j.variant for j in jobs))
    if set(baselines) - set(names):
      raise ValueError(f"--baselines: {sorted(set(baselines) - set(names))} not among the "
                       f"variants {names}")
    if not is_metric(a.metric) or a.metric == "dev/f1":
      raise ValueError(f"--metric={a.metric}: a test score, test/f1, test/NAME/f1 or "
                       "test/NAME/acc")
  except (ValueError, OSError) as e:
    errors.print_error(str(e), "python -m bench.ot_study --help")
    sys.exit(2)
  out = pathlib.Path(a.out)
  env = dict(os.environ)
  if a.xla_cache:
    env.setdefault("JAX_COMPILATION_CACHE_DIR",
                   str(out / "xla_cache") if a.xla_cache == "OUT/xla_cache" else a.xla_cache)
  t0 = time.perf_counter()
  if a.rescore:
    print(f"rescored {rescore(jobs, out)} finished runs", file=sys.stderr)
  records = run_study(jobs, out, lambda job: train_subprocess(job, env), a.parallel,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
  rows = summarise(records, names, baselines)
  (out / "table.md").write_text(format_table(rows, baselines, a.metric))
  print(json.dumps({"out": str(out), "runs": len(records),
                    "failed": sum(r["status"] == "failed" for r in records),
                    "wall_s": round(time.perf_counter() - t0, 1),
                    "table": str(out / "table.md"),
                    "plot": plot(rows, out / "plots" / "ot_study.png"),
                    "variants": rows}))


if __name__ == "__main__":
  main()
