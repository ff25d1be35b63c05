"""Train state, the pure jitted train/eval steps, and the training loop.

The steps are pure functions `train_step(state, batch, rng) -> (state, metrics)`
and `eval_step(params, batch) -> outputs`, jitted with explicit shardings from
`remote_jax.sharding` and the state donated. The loop only moves data, logs,
evaluates, checkpoints and plots.
"""
import dataclasses
import json
import logging
import pathlib
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from remote_jax import checkpoint as ckpt_lib
from remote_jax import distributed, optim, sharding, writers, xla_cpu
from remote_jax import metrics as metrics_lib
from remote_jax.data import batch_spec, pipeline
from remote_jax.models import remote

log = logging.getLogger(__name__)

# Our names for the splits -> the dataset's (UMRE calls dev "val").
SPLITS = {"train": "train", "dev": "val", "test": "test"}

# Batch fields the model reads; `index` only travels to predictions.
MODEL_FIELDS = batch_spec.MODEL_FIELDS


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def model_batch(batch):
  return {k: batch[k] for k in MODEL_FIELDS if k in batch}


def cross_entropy(logits, labels, weights):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = weights.astype(jnp.float32)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def mean_ot_diagnostics(ot):
  """{"text_3": {"plan_entropy": x, ...}, ...} -> flat {"ot/text_3/plan_entropy": x}."""
  return {f"ot/{lvl}/{k}": v for lvl, d in ot.items() for k, v in d.items()}


def make_train_step(model, tx):
  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      logits, aux = model.apply({"params": params}, batch, deterministic=False,
                                rngs={"dropout": rng})
      loss = cross_entropy(logits, batch["label"], batch["mask"])
      # Model-side regularisers (the MMoE's load balancing when enabled; 0 otherwise).
      return loss + aux["aux_loss"], (logits, aux, loss)

    (_, (logits, aux, loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    acc = ((logits.argmax(-1) == batch["label"]) * batch["mask"]).sum() / jnp.maximum(
        batch["mask"].sum(), 1)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "accuracy": acc,
               "missing_marker": aux["missing_marker"].mean(), "aux_loss": aux["aux_loss"]}
    metrics.update(mean_ot_diagnostics(aux["ot"]))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def make_eval_step(model):
  def eval_step(params, batch):
    logits, aux = model.apply({"params": params}, batch, deterministic=True)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    per_example = {"logits": logits, "loss": losses, "probs": jax.nn.softmax(logits, -1)}
    if aux["router"] is not None:
      per_example["router"] = aux["router"]
    return per_example, mean_ot_diagnostics(aux["ot"])

  return eval_step


@dataclasses.dataclass
class Setup:
  """Everything the loop, evaluate.py and predict.py share."""
  config: Any
  meta: Any
  model: nn.Module
  mesh: Any
  tx: Any
  schedule: Any
  state: TrainState
  state_sharding: Any
  train_step: Any
  eval_step: Any


def dummy_batch(meta, batch_size=2):
  """The batch contract's fill values (data/batch_spec.py), for init."""
  return batch_spec.dummy_batch(meta, batch_size)


def abstract_batch(meta, batch_size, batch_sh):
  """The global model batch as ShapeDtypeStructs, for compiling ahead of the data."""
  return batch_spec.abstract_batch(meta, batch_size, batch_sh)


def load_pretrained(config, params, meta):
  """Replaces the encoder params by converted local checkpoints, if configured."""
  from remote_jax.models import convert
  text_dir, vision_dir = config.model.text.pretrained_dir, config.model.vision.pretrained_dir
  if text_dir:
    extra = meta["vocab_size"] - convert.read_hf_config(text_dir)["vocab_size"]
    _, text = convert.load_bert(text_dir, num_extra_tokens=extra, seed=config.seed)
    params = _replace(params, "text", text, text_dir)
    log.info("loaded pretrained text encoder from %s (+%d marker rows)", text_dir, extra)
  if vision_dir:
    v = config.model.vision
    _, vision = convert.load_clip_vision(
        vision_dir, image_size=v.image_size, patch_size=v.patch_size,
        use_cls=v.use_cls, use_depth=v.use_depth, seed=config.seed)
    params = _replace(params, "vision", vision, vision_dir)
    log.info("loaded pretrained vision tower from %s", vision_dir)
  return params


def _replace(params, key, new, where):
  old = params[key]
  mismatch = []
  flat_old = flax.traverse_util.flatten_dict(old, sep="/")
  flat_new = flax.traverse_util.flatten_dict(new, sep="/")
  # The model may hold encoder params the checkpoint lacks (e.g. fusion_dense of
  # the released co-encoder): those keep their fresh init.
  for name, value in flat_new.items():
    if name not in flat_old:
      mismatch.append(f"{name}: not in the model")
    elif flat_old[name].shape != value.shape:
      mismatch.append(f"{name}: model {flat_old[name].shape} vs checkpoint {value.shape}")
  if mismatch:
    raise ValueError(f"pretrained {key} weights from {where} do not fit the model config "
                     f"(model.{key}): " + "; ".join(mismatch[:10]))
  merged = dict(flat_old)
  for name, value in flat_new.items():
    merged[name] = jax.device_put(jnp.asarray(value, flat_old[name].dtype),
                                  flat_old[name].sharding)
  return {**params, key: flax.traverse_util.unflatten_dict(merged, sep="/")}


def setup(config, total_steps=1, compile_train=False):
  """Model, optimizer, mesh, sharded state and the jitted steps.

  With `compile_train` the train step is compiled from abstract shapes before
  the state exists, and the compiler's freed heap goes back to the OS: its
  transient memory then does not stack on parameters and optimizer state.
  """
  meta = pipeline.dataset_meta(config.data)
  mesh = sharding.make_mesh(config.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  for field in ("batch_size", "eval_batch_size"):
    if config[field] % shards:
      raise ValueError(f"config.{field}={config[field]} must be a multiple of the mesh's "
                       f"data x fsdp size ({shards}, config.mesh={list(config.mesh)})")
  model = remote.build(config.model, meta["num_classes"], meta["vocab_size"])
  init_batch = dummy_batch(meta)
  rng = jax.random.key(config.seed)
  abstract_params = jax.eval_shape(
      lambda r: model.init({"params": r, "dropout": r}, init_batch)["params"], rng)
  tx, schedule = optim.make_optimizer(config.optim, nn.meta.unbox(abstract_params), total_steps)

  def init_fn(r):
    params = model.init({"params": r, "dropout": r}, init_batch)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(nn.meta.unbox(params)))

  replicated = sharding.replicated(mesh)
  batch_sh = sharding.batch_sharding(mesh)
  abstract_state = jax.eval_shape(init_fn, rng)
  state_sh = sharding.state_shardings(abstract_state, mesh, config.sharding)
  train_step = jax.jit(make_train_step(model, tx), donate_argnums=(0,),
                       in_shardings=(state_sh, batch_sh, replicated),
                       out_shardings=(state_sh, replicated))
  if compile_train:
    t0 = time.perf_counter()
    train_step = train_step.lower(nn.meta.unbox(abstract_state),
                                  abstract_batch(meta, config.batch_size, batch_sh),
                                  jax.random.key(0)).compile()
    log.info("compiled the train step in %.1f s", time.perf_counter() - t0)
    xla_cpu.release_freed_heap()
  with mesh:
    state, _ = sharding.create_sharded_state(init_fn, rng, mesh, config.sharding, state_sh)
  # Outputs replicated: every process reads all rows (multi-host metrics).
  eval_step = jax.jit(make_eval_step(model), in_shardings=(state_sh.params, batch_sh),
                      out_shardings=(replicated, replicated))
  return Setup(config, meta, model, mesh, tx, schedule, state, state_sh, train_step,
               eval_step)


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


def evaluate(s: Setup, params, split, *, collect=False):
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
  workdir = pathlib.Path(workdir)
  main = distributed.is_main()
  meta = pipeline.dataset_meta(config.data)
  spe = steps_per_epoch(config, meta)
  total_steps = spe * config.num_epochs
  if config.max_steps:
    total_steps = min(total_steps, config.max_steps)
  s = setup(config, total_steps, compile_train=True)
  writer = writers.MetricWriter(workdir)
  writer.write_config(config.to_dict())
  ckpt = ckpt_lib.Checkpointer.for_workdir(workdir, max_to_keep=config.max_to_keep,
                                           async_save=False)
  rows, shard, shards = sharding.host_rows(s.mesh, config.batch_size)
  train_ds = pipeline.build_dataset(
      config.data, "train", batch_size=rows, shard_index=shard, shard_count=shards,
      shuffle=True, seed=config.seed, num_epochs=None, drop_remainder=True,
      worker_count=config.data.worker_count)
  train_iter = iter(train_ds)
  history = []
  state = s.state
  start = ckpt_lib.resume_source(workdir, config.resume or None)
  if start.kind == "workdir":
    state, step = ckpt.restore_latest(state, train_iter)
    history = ckpt.load_meta(step).get("history", [])
    log.info("resumed from %s step %d", start.path, step)
  elif start.kind == "resume":
    other, step = ckpt_lib.open_checkpoint(start.path)
    state = other.restore(step, state)
    log.info("initialised from checkpoint %s step %d (data restarts)", start.path, step)
  else:
    if config.model.text.pretrained_dir or config.model.vision.pretrained_dir:
      state = state.replace(params=load_pretrained(config, state.params, s.meta))
  if main:
    groups = optim.group_summary(config.optim, state.params)
    log.info("parameter groups: %s", json.dumps(groups))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state.params))
    log.info("model: %.2fM parameters; %d steps (%d per epoch)", n_params / 1e6,
             total_steps, spe)

  rng = jax.random.key(config.seed + 1)
  step = int(state.step)
  progress = writers.Progress(total_steps, initial=step, log_every=config.log_every_steps)
  eval_every = config.eval_every_steps or max(int(spe * config.eval_every_epochs), 1)
  ckpt_every = config.checkpoint_every_steps
  t0, examples = time.perf_counter(), 0
  train_metrics = []
  while step < total_steps:
    batch = next(train_iter)
    state, m = s.train_step(state, sharding.global_batch(model_batch(batch), s.mesh), rng)
    step += 1
    examples += config.batch_size
    train_metrics.append(m)
    if not (step % config.log_every_steps == 0 or step == total_steps):
      progress.update(step, examples=config.batch_size)
    else:
      m = jax.device_get(train_metrics)
      train_metrics = []
      mean = {k: float(np.mean([x[k] for x in m])) for k in m[0]}
      metrics_lib.check_finite(step, loss=mean["loss"], grad_norm=mean["grad_norm"])
      mean["lr"] = float(s.schedule(step))
      mean["examples_per_s"] = examples / max(time.perf_counter() - t0, 1e-9)
      writer.write(step, mean, split="train")
      progress.update(step, examples=config.batch_size, loss=mean["loss"])
    if ckpt_every and step % ckpt_every == 0 and not (step % eval_every == 0
                                                      or step == total_steps):
      ckpt.save(step, state, train_iter, meta={"history": history}, force=True)
    if step % eval_every == 0 or step == total_steps:
      record = {"step": step, "epoch": step / spe}
      for split in ("dev", "test"):
        if SPLITS[split] in meta["splits"]:
          res = evaluate(s, state.params, split)
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
    if config.stop_after_step and step >= config.stop_after_step and step < total_steps:
      # As if the job were killed here: no summary; a rerun with the same
      # workdir resumes from the last checkpoint.
      log.warning("stopping at step %d (config.stop_after_step)", step)
      progress.close()
      ckpt.wait()
      ckpt.close()
      writer.close()
      return {"stopped_at": step, "history": history}
  progress.close()
  ckpt.wait()
  summary = summarise(config, history)
  writer.write(step, summary, split="summary")
  writer.close()
  if main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if config.plots:   # every process evaluates (the step is collective), process 0 draws
    make_plots(s, state.params, workdir, draw=main)
  ckpt.close()
  return summary


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
  for key in ("dev/f1", "test/f1", "test/acc", "test/e-e/f1", "test/o-o/f1", "test/e-o/f1",
              "test/compositional/f1"):
    if key in agg:
      lines.append(f"{key:<21} {agg[key]['mean']:7.2f} +- {agg[key]['std']:.2f} "
                   f"(n={agg[key]['n']})")
  return "\n".join(lines)
