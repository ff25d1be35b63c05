"""REMOTE's task on the engine (remote_jax/engine.py): its loss with the model-side
regularisers, its Setup of a config (`setup`, `restore`), evaluation on a split, training
with dev-based model selection (`train_and_evaluate`), summaries and plots.
"""
import contextlib
import json
import logging
import pathlib
import time

import jax
import numpy as np
import optax

from remote_jax import checkpoint as ckpt_lib
from remote_jax import config as config_lib
from remote_jax import distributed, engine, errors, optim, sharding, writers, xla_cpu
from remote_jax import metrics as metrics_lib
from remote_jax.data import batch_spec, pipeline
from remote_jax.models import remote
from remote_jax.pretrained import load_pretrained

log = logging.getLogger(__name__)

# Our names for the splits -> the dataset's (UMRE calls dev "val").
SPLITS = {"train": "train", "dev": "val", "test": "test"}

# Batch fields the model reads; `index` only travels to predictions.
MODEL_FIELDS = batch_spec.MODEL_FIELDS

def model_batch(batch):
  return {k: batch[k] for k in MODEL_FIELDS if k in batch}


def mean_ot_diagnostics(ot):
  """{"text_3": {"plan_entropy": x, ...}, ...} -> flat {"ot/text_3/plan_entropy": x}."""
  return {f"ot/{lvl}/{k}": v for lvl, d in ot.items() for k, v in d.items()}


def remote_loss(model, params, batch, rng, train):
  """REMOTE's: cross-entropy plus the model-side regularisers (the MMoE's load balancing
  when enabled; 0 otherwise); the reported loss is the cross-entropy."""
  logits, aux = model.apply({"params": params}, batch, deterministic=not train,
                            rngs={"dropout": rng})
  loss, metrics = engine.classification(logits, batch)
  metrics.update(missing_marker=aux["missing_marker"].mean(), aux_loss=aux["aux_loss"],
                 **mean_ot_diagnostics(aux["ot"]))
  return loss + aux["aux_loss"], metrics


def make_eval_step(model):
  def eval_step(params, batch):
    logits, aux = model.apply({"params": params}, batch, deterministic=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    per_example = {"logits": logits, "loss": losses, "probs": jax.nn.softmax(logits, -1)}
    if aux["router"] is not None:
      per_example["router"] = aux["router"]
    return per_example, mean_ot_diagnostics(aux["ot"])

  return eval_step


def dummy_batch(meta, batch_size=2):
  """The batch contract's fill values (data/batch_spec.py), for init."""
  return batch_spec.dummy_batch(meta, batch_size)


def abstract_batch(meta, batch_size, batch_sh):
  """The global model batch as ShapeDtypeStructs, for compiling ahead of the data."""
  return batch_spec.abstract_batch(meta, batch_size, batch_sh)


def setup(config, total_steps=1, compile_train=False, pretrained=False):
  """REMOTE's Setup: model of config.model, mesh of config.mesh (`engine.build`), with the
  pretrained encoders of config.model loaded if `pretrained` (a scratch start)."""
  config_lib.resolve(config)   # derived fields (data.num_objects...) and every check first
  meta = pipeline.dataset_meta(config.data)
  mesh = sharding.make_mesh(config.mesh)
  for field in ("batch_size", "eval_batch_size"):
    sharding.check_batch_size(mesh, config[field], field)
  model = remote.build(config.model, meta["num_classes"], meta["vocab_size"])
  compile_batch = (abstract_batch(meta, config.batch_size, sharding.batch_sharding(mesh))
                   if compile_train else None)
  load = ((lambda params: load_pretrained(params, config.model, config.seed,
                                          cache_dir=config.data.cache_dir))
          if pretrained else None)
  s = engine.build(model, dummy_batch(meta), config.optim, total_steps, mesh,
                   rules=config.sharding, seed=config.seed, loss_fn=remote_loss,
                   eval_fn=make_eval_step, compile_batch=compile_batch, load=load)
  s.config, s.meta = config, meta
  return s


def restore(config, path):
  """(Setup, state, step) with the state of checkpoint `path` (a workdir, a
  checkpoint root or a step directory), for evaluate.py and predict.py.
  Launched as several processes (launch/local.sh with MODULE=..., srun), they
  join first and each restores and scores its shard, as in training."""
  if not path:
    raise ValueError("give --workdir or --checkpoint")
  xla_cpu.apply(config.xla_cpu)   # before setup starts the backend
  distributed.maybe_initialize(config)
  s = setup(config)
  ckpt, step = ckpt_lib.open_checkpoint(path)
  return s, ckpt.restore(step, s.state), step


@contextlib.contextmanager
def restored(config, checkpoint, workdir):
  """evaluate.py's and predict.py's start: CLI logging, then (Setup, state, step, path) of
  checkpoint `checkpoint` or else `workdir` (`restore`); a user error in the block is one
  line (errors.user_errors)."""
  writers.setup_cli_logging()
  with errors.user_errors():
    path = checkpoint or workdir
    s, state, step = restore(config, path)
    yield s, state, step, path


def evaluate(s: engine.Setup, params, split, *, collect=False):
  """Metrics of `params` on a split; every example counts once (padding masked)."""
  meta = s.meta
  # Buckets of the split (e.g. the demo's `compositional` test examples), scored like a type.
  acc = metrics_lib.MetricsAccumulator(meta["num_classes"], meta["negative_id"],
                                       relation_names=meta["relations"],
                                       buckets=meta.get("buckets", {}).get(SPLITS[split]))
  # Each process reads its shard (padded to the same batch count on every
  # host); outputs come back gathered, with every process's rows of the batch.
  rows, shard, shards = sharding.host_rows(s.mesh, s.config.eval_batch_size, "eval_batch_size")
  ds = pipeline.build_dataset(s.config.data, SPLITS[split], batch_size=rows,
                              shard_index=shard, shard_count=shards,
                              shuffle=False, seed=0, drop_remainder=False)
  collected = {"router": [], "label": [], "probs": [], "index": [], "triplet_type": [],
               "mask": []}
  ot_sums, n_batches = {}, 0
  for batch in ds:
    out, ot = jax.device_get(
        s.eval_step(params, sharding.global_batch(model_batch(batch), s.mesh)))
    batch = sharding.all_rows({k: batch[k] for k in ("label", "mask", "triplet_type", "index")},
                              s.mesh)
    acc.add(batch["label"], logits=out["logits"], mask=batch["mask"],
            triplet_type=batch["triplet_type"], loss=out["loss"], index=batch["index"])
    for k, v in ot.items():
      ot_sums[k] = ot_sums.get(k, 0.0) + float(v)
    n_batches += 1
    if collect:
      for k in ("router", "probs"):
        if k in out:
          collected[k].append(np.asarray(out[k]))
      for k in ("label", "index", "triplet_type", "mask"):
        collected[k].append(np.asarray(batch[k]))
  result = acc.compute()
  result["ot"] = {k[3:]: v / max(n_batches, 1) for k, v in ot_sums.items()}
  if collect:
    keep = np.concatenate(collected["mask"]) if collected["mask"] else np.zeros(0, bool)
    result["collected"] = {k: np.concatenate(v)[keep] for k, v in collected.items()
                           if v and k != "mask"}
  return result


def steps_per_epoch(config, meta):
  n = meta["splits"]["train"]
  return max(n // config.batch_size, 1)


def train_and_evaluate(config, workdir):
  """Trains with dev-based model selection; returns the final summary dict."""
  t_start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  main = distributed.is_main()
  meta = pipeline.dataset_meta(config.data)
  spe = steps_per_epoch(config, meta)
  total_steps = spe * config.num_epochs
  if config.max_steps:
    total_steps = min(total_steps, config.max_steps)
  # Pretrained encoders are loaded into a scratch start only.
  start = ckpt_lib.resume_source(workdir, config.resume or None)
  s = setup(config, total_steps, compile_train=True, pretrained=start.kind == "scratch")
  writer = writers.MetricWriter(workdir)
  writer.write_config(config.to_dict())
  ckpt = ckpt_lib.Checkpointer.for_workdir(workdir, max_to_keep=config.max_to_keep,
                                           async_save=False)
  rows, shard, shards = sharding.host_rows(s.mesh, config.batch_size)
  train_ds = pipeline.build_dataset(
      config.data, "train", batch_size=rows, shard_index=shard, shard_count=shards,
      shuffle=True, seed=config.seed, num_epochs=None, drop_remainder=True,
      worker_count=config.data.worker_count, augment=True)
  train_iter = iter(train_ds)
  history = []
  state = s.state
  if start.kind == "workdir":
    state, step = ckpt.restore_latest(state, train_iter)
    history = ckpt.load_meta(step).get("history", [])
    log.info("resumed from %s step %d", start.path, step)
  elif start.kind == "resume":
    other, step = ckpt_lib.open_checkpoint(start.path)
    state = other.restore(step, state)
    log.info("initialised from checkpoint %s step %d (data restarts)", start.path, step)
  if main:
    groups = optim.group_summary(config.optim, state.params)
    log.info("parameter groups: %s", json.dumps(groups))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    log.info("model: %.2fM parameters; %d steps (%d per epoch)", n_params / 1e6,
             total_steps, spe)

  eval_every = config.eval_every_steps or max(int(spe * config.eval_every_epochs), 1)
  ckpt_every = config.checkpoint_every_steps

  def after_step(step, state):
    evaluates = step % eval_every == 0 or step == total_steps
    if ckpt_every and step % ckpt_every == 0 and not evaluates:
      ckpt.save(step, state, train_iter, meta={"history": history}, force=True)
    if evaluates:
      record = {"step": step, "epoch": step / spe}
      for split in ("dev", "test"):
        if SPLITS[split] in meta["splits"]:
          res = evaluate(s, state.eval_params, split)
          record.update(metrics_lib.scalar_metrics(loggable(res), prefix=split))
          record.update({f"{split}/ot/{k}": v for k, v in res["ot"].items()})
          writer.write(step, {**loggable(res), "ot": res["ot"]}, split=split)
      history.append(record)
      best = metrics_lib.select_best(history, "dev/f1") if "val" in meta["splits"] else {}
      ckpt.save(step, state, train_iter, meta={"history": history, "best": best}, force=True)
      if main:
        f1 = lambda d, k: f"{d[k]:.2f}" if k in d else "n/a (no split)"
        log.info("step %d: dev f1 %s test f1 %s (best dev %s at step %s)", step,
                 f1(record, "dev/f1"), f1(record, "test/f1"), f1(best, "dev/f1"),
                 best.get("step"))
    # As if the job were killed here: no summary; a rerun with the same workdir
    # resumes from the last checkpoint.
    return bool(config.stop_after_step) and total_steps > step >= config.stop_after_step

  state = engine.train_steps(s, state, lambda _: model_batch(next(train_iter)), total_steps,
                             jax.random.key(config.seed + 1), writer=writer,
                             log_every=config.log_every_steps, after_step=after_step)
  step = int(state.step)
  if step < total_steps:
    log.warning("stopping at step %d (config.stop_after_step)", step)
    ckpt.wait()
    ckpt.close()
    writer.close()
    return {"stopped_at": step, "history": history}
  ckpt.wait()
  summary = summarise(config, history)
  # This process's time from start to the last evaluation (a resumed run: since the restart).
  summary["wall_s"] = round(time.perf_counter() - t_start, 1)
  if main:
    summary.update(train_timing(s.train_step, writers.read_metrics(workdir, split="train")))
  writer.write(step, summary, split="summary")
  writer.close()
  if main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if config.plots:   # every process evaluates (the step is collective), process 0 draws
    make_plots(s, state.eval_params, workdir, draw=main)
  ckpt.close()
  return summary


def train_timing(train_step, records):
  """{"compile_s": the train step's ahead-of-time compilations, "step_ms": the median of the
  logged windows' milliseconds per step (evaluation excluded), the first window (warm-up)
  left out when there are others}, of what exists."""
  timing = {}
  if hasattr(train_step, "total_compile_s"):
    timing["compile_s"] = round(train_step.total_compile_s, 2)
  windows = [r["step_ms"] for r in records if r.get("step_ms") is not None]
  if windows:
    timing["step_ms"] = round(float(np.median(windows[1:] or windows)), 2)
  return timing


def loggable(res):
  return {k: v for k, v in res.items() if k not in ("confusion", "collected", "ot")}


def summarise(config, history):
  """Test at the best-dev evaluation (our protocol); max-over-epochs only if asked."""
  summary = {}
  if history and "dev/f1" in history[0]:
    best = metrics_lib.select_best(history, "dev/f1")
    summary["best_dev"] = {k: v for k, v in best.items()
                           if k.startswith(("dev/", "test/")) or k in ("step", "epoch")}
  if config.report_max_over_epochs and history and "test/f1" in history[0]:
    mx = metrics_lib.max_over_epochs(history, "test/f1")
    summary["max_over_epochs_test (reference protocol, selected on test)"] = {
        "test/f1": mx["test/f1"], "step": mx["step"]}
  if history:
    summary["last"] = history[-1]
  return summary


def make_plots(s, params, workdir, draw=True):
  from remote_jax import plots
  split = "test" if "test" in s.meta["splits"] else "dev"
  res = evaluate(s, params, split, collect=True)
  if not draw:
    return []
  out = pathlib.Path(workdir) / "plots"
  out.mkdir(parents=True, exist_ok=True)
  records = writers.read_metrics(workdir)
  paths = [plots.training_curves(records, out / "training_curves.png")]
  paths.append(plots.confusion_matrix(res["confusion"], s.meta["relations"],
                                      out / f"confusion_{split}.png"))
  col = res["collected"]
  if "router" in col and col["router"].ndim == 2 and col["router"].shape[1] > 1:
    names = remote.expert_names(s.config.model)
    paths.append(plots.router_weights(col["router"], col["label"], s.meta["relations"],
                                      names, out / "router_weights.png"))
    paths.append(plots.router_weights(col["router"], col["triplet_type"],
                                      metrics_lib.TRIPLET_TYPES, names,
                                      out / "router_by_type.png", row_kind="triplet type"))
    by_type, counts = plots.mean_by_row(col["router"], col["triplet_type"],
                                        len(metrics_lib.TRIPLET_TYPES))
    (out / "router_by_type.json").write_text(json.dumps(
        {t: dict(zip(names, np.round(w, 4).tolist()), n=int(n))
         for t, w, n in zip(metrics_lib.TRIPLET_TYPES, by_type, counts) if n}, indent=1) + "\n")
  if res["ot"]:
    paths.append(plots.ot_diagnostics(res["ot"], out / "ot_diagnostics.png"))
  log.info("plots: %s", ", ".join(str(p) for p in paths if p))
  return paths


def format_summary(summary, config):
  """The final table printed at the end of a run."""
  lines = [f"== {config.data.name}: model selected on dev (test reported at that step) =="]
  best = summary.get("best_dev", {})
  if best:
    lines.append(f"best dev at step {best.get('step')} (epoch {best.get('epoch', 0):.1f})")
    lines.append(f"{'split':<6} {'bucket':<13} {'acc':>7} {'P':>7} {'R':>7} {'F1':>7}")
    for split in ("dev", "test"):
      # Extra buckets (e.g. `compositional`) follow the per-type rows.
      extra = sorted({k.split("/")[1] for k in best if k.count("/") == 2
                      and k.startswith(f"{split}/") and k.endswith("/gold_pos")}
                     - set(metrics_lib.TRIPLET_TYPES))
      for bucket in ["", "e-e/", "o-o/", "e-o/"] + [f"{b}/" for b in extra]:
        key = f"{split}/{bucket}"
        if f"{key}f1" in best:
          lines.append(f"{split:<6} {bucket.rstrip('/') or 'all':<13} "
                       f"{best.get(key + 'acc', float('nan')):7.2f} "
                       f"{best[key + 'precision']:7.2f} {best[key + 'recall']:7.2f} "
                       f"{best[key + 'f1']:7.2f}")
  for k, v in summary.items():
    if k.startswith("max_over_epochs"):
      lines.append(f"{k}: test f1 {v['test/f1']:.2f} at step {v['step']}")
  return "\n".join(lines)


def format_seed_summary(agg):
  lines = ["== mean +- std over seeds (test at best dev) =="]
  for key in ("dev/f1", "dev/acc", "test/f1", "test/acc", "test/e-e/f1", "test/o-o/f1", "test/e-o/f1",
              "test/compositional/f1", "wall_s"):
    if key in agg:
      lines.append(f"{key:<21} {agg[key]['mean']:7.2f} +- {agg[key]['std']:.2f} "
                   f"(n={agg[key]['n']})")
  return "\n".join(lines)
