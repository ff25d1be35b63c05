"""Train state, the pure jitted train/eval steps, and the training loops.

One engine serves REMOTE and MI2RAGE. The seam is a loss function
`loss_fn(model, params, batch, rng, train) -> (objective, metrics)`
(`remote_loss`, `classifier_loss`); `make_train_step` turns it into the pure
step `train_step(state, batch, rng) -> (state, metrics)`, which `build` jits
with explicit shardings from `remote_jax.sharding` and the state donated.
`train_steps` is the loop both use (sharded batches, progress, logged means,
the NaN check); `train_and_evaluate` adds REMOTE's data, evaluation and model
selection, `fit` / `predict` the resumable fixed-step training and batched
inference of MI2RAGE's teachers and students.
"""
import contextlib
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

  @property
  def eval_params(self):
    """What evaluation, best-dev selection and predictions use."""
    return self.params


@flax.struct.dataclass
class AveragedTrainState(TrainState):
  """A TrainState that also keeps the parameters' moving average (optim.ema > 0), which is
  what gets evaluated. A class of its own, so that a run without it saves and restores the
  same checkpoint tree as before the average existed."""
  ema: Any = None

  @property
  def eval_params(self):
    return self.ema


def with_ema(state, decay):
  """`state` with its average started at its parameters (a copy: both are donated), or
  the plain state when `decay` is 0."""
  fields = dict(step=state.step, params=state.params, opt_state=state.opt_state)
  if not decay:
    return TrainState(**fields)
  return AveragedTrainState(**fields, ema=jax.tree_util.tree_map(jnp.copy, state.params))


def model_batch(batch):
  return {k: batch[k] for k in MODEL_FIELDS if k in batch}


def cross_entropy(logits, labels, weights):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  weights = weights.astype(jnp.float32)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def mean_ot_diagnostics(ot):
  """{"text_3": {"plan_entropy": x, ...}, ...} -> flat {"ot/text_3/plan_entropy": x}."""
  return {f"ot/{lvl}/{k}": v for lvl, d in ot.items() for k, v in d.items()}


def _classification(logits, batch):
  """(loss, {"loss", "accuracy"}): cross-entropy over the rows `mask` keeps (all if absent)."""
  mask = batch.get("mask")
  mask = jnp.ones(batch["label"].shape, bool) if mask is None else mask
  loss = cross_entropy(logits, batch["label"], mask)
  acc = ((logits.argmax(-1) == batch["label"]) * mask).sum() / jnp.maximum(mask.sum(), 1)
  return loss, {"loss": loss, "accuracy": acc}


def classifier_loss(model, params, batch, rng, train):
  """The loss of a model whose output is the logits (MI2RAGE's teachers and students)."""
  logits = model.apply({"params": params}, batch, deterministic=not train,
                       rngs={"dropout": rng})
  return _classification(logits, batch)


def remote_loss(model, params, batch, rng, train):
  """REMOTE's: cross-entropy plus the model-side regularisers (the MMoE's load balancing
  when enabled; 0 otherwise); the reported loss is the cross-entropy."""
  logits, aux = model.apply({"params": params}, batch, deterministic=not train,
                            rngs={"dropout": rng})
  loss, metrics = _classification(logits, batch)
  metrics.update(missing_marker=aux["missing_marker"].mean(), aux_loss=aux["aux_loss"],
                 **mean_ot_diagnostics(aux["ot"]))
  return loss + aux["aux_loss"], metrics


def make_train_step(model, tx, loss_fn=remote_loss, ema=0.0):
  """The pure step: gradients of `loss_fn`'s objective, one optimizer update; the
  metrics are `loss_fn`'s plus the gradient norm. Dropout keys fold in the step.

  With `ema` > 0 the state's average moves toward the new parameters by 1 - d,
  d = min(ema, (1 + step) / (10 + step)): the warm-up keeps the average of the first
  steps from being held at the initial (pretrained) weights."""
  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    objective = lambda params: loss_fn(model, params, batch, rng, True)
    (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if ema:
      t = state.step.astype(jnp.float32)
      d = jnp.minimum(ema, (1.0 + t) / (10.0 + t))
      new_state = new_state.replace(ema=jax.tree_util.tree_map(
          lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema, params))
    return new_state, {**metrics, "grad_norm": optax.global_norm(grads)}

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


def make_logits_step(model):
  """eval_step of a model whose output is the logits."""
  return lambda params, batch: model.apply({"params": params}, batch, deterministic=True)


@dataclasses.dataclass
class Setup:
  """A model's mesh, optimizer, sharded state and jitted steps (`build`); REMOTE's also
  carries the config and dataset meta that its loop, evaluate.py and predict.py share."""
  model: nn.Module
  mesh: Any
  tx: Any
  schedule: Any
  state: TrainState
  state_sharding: Any
  train_step: Any
  eval_step: Any
  config: Any = None
  meta: Any = None

  def jit_eval(self, fn):
    """`fn(params, batch)` jitted as eval_step is."""
    return _jit_eval(fn, self.state_sharding, self.mesh)


def _jit_eval(fn, state_sh, mesh):
  """State-sharded params, batch sharded over the data axes, outputs replicated (every
  process gets every row)."""
  return jax.jit(fn, in_shardings=(state_sh.params, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def dummy_batch(meta, batch_size=2):
  """The batch contract's fill values (data/batch_spec.py), for init."""
  return batch_spec.dummy_batch(meta, batch_size)


def abstract_batch(meta, batch_size, batch_sh):
  """The global model batch as ShapeDtypeStructs, for compiling ahead of the data."""
  return batch_spec.abstract_batch(meta, batch_size, batch_sh)


def marker_pieces(text_config):
  """The word pieces whose rows the marker rows copy (model.text.marker_init); () for
  "normal" (N(0, 0.02))."""
  from remote_jax.data.tokenizer import PUNCT_MARKERS
  inits = {"normal": (), "punct": PUNCT_MARKERS}
  init = text_config["marker_init"]
  if init not in inits:
    pieces = " ".join(dict.fromkeys(PUNCT_MARKERS))
    raise ValueError(f"model.text.marker_init={init!r}: allowed 'normal' (N(0, 0.02), the "
                     f"released code's) or 'punct' (copies of the rows of {pieces})")
  return inits[init]


def load_pretrained(params, model_config, seed, **vision):
  """Replaces the `text` / `vision` encoder params by converted local checkpoints where
  `model_config.{text,vision}.pretrained_dir` is set (and the model has that encoder).

  The word embeddings gain one fresh row per marker token (the tokenizer's vocabulary
  is the checkpoint's plus MARKERS); `vision` overrides the fields of
  `model_config.vision` that `convert.load_clip_vision` takes.
  """
  from remote_jax.data.tokenizer import MARKERS
  from remote_jax.models import convert
  text_dir = model_config.text.get("pretrained_dir", "")
  vision_dir = model_config.vision.get("pretrained_dir", "")
  if text_dir and "text" in params:
    _, text = convert.load_bert(text_dir, num_extra_tokens=len(MARKERS), seed=seed,
                                extra_like=marker_pieces(model_config.text))
    params = _replace(params, "text", text, text_dir)
    log.info("loaded pretrained text encoder from %s (+%d marker rows)", text_dir, len(MARKERS))
  if vision_dir and "vision" in params:
    v = {k: model_config.vision[k] for k in ("image_size", "patch_size", "use_cls", "use_depth")
         if k in model_config.vision}
    _, weights = convert.load_clip_vision(vision_dir, **{**v, **vision}, seed=seed)
    params = _replace(params, "vision", weights, vision_dir)
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
                                  getattr(flat_old[name], "sharding", None))
  return {**params, key: flax.traverse_util.unflatten_dict(merged, sep="/")}


# Jitted functions per (model, optimizer, steps, mesh, rules, loss, eval): MI2RAGE's
# teachers of later rounds, and repeated runs in one process, reuse their compilations.
_ENGINES = {}


class CompiledPerShape:
  """A jitted train step compiled ahead once per batch shape: the first (`batch`, abstract)
  before the state exists, so the compiler's freed heap goes back to the OS and its
  transient memory does not stack on the state; the shorter batches of
  `data.pad_to_multiple_of` when first met."""

  def __init__(self, jitted, abstract_state, batch):
    self._jitted, self._state, self._compiled = jitted, abstract_state, {}
    self.compiled(batch)

  def compiled(self, batch):
    key = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))
    if key not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[key] = self._jitted.lower(self._state, batch, jax.random.key(0)).compile()
      tokens = batch.get("input_ids")
      log.info("compiled the train step in %.1f s%s", time.perf_counter() - t0,
               "" if tokens is None else f" (input_ids {tuple(tokens.shape)})")
      xla_cpu.release_freed_heap()
    return self._compiled[key]

  def __call__(self, state, batch, rng):
    return self.compiled(batch)(state, batch, rng)


def build(model, init_batch, optim_config, total_steps, mesh, *, rules="dp", seed=0,
          loss_fn=classifier_loss, eval_fn=make_logits_step, compile_batch=None):
  """Setup of `model` on `mesh`: sharded state initialised from `seed` on `init_batch`
  (numpy, any batch size), the optimizer of `optim_config` over `total_steps`, the train
  step of `loss_fn` (state donated) and the eval step `eval_fn(model)(params, batch)`.

  With `compile_batch` (abstract global batch) the train step is compiled before the
  state exists, and the compiler's freed heap goes back to the OS: its transient memory
  then does not stack on parameters and optimizer state.
  """
  rules = rules if isinstance(rules, str) else tuple(map(tuple, rules))
  key = (model, json.dumps(writers.jsonable(dict(optim_config)), sort_keys=True),
         max(total_steps, 1), mesh, rules, loss_fn, eval_fn)
  try:
    cached = compile_batch is None and key in _ENGINES
  except TypeError:   # an unhashable model config: no reuse
    cached = False
  if not cached:
    init = lambda r, b: model.init({"params": r, "dropout": r}, b)["params"]
    abstract_params = jax.eval_shape(init, jax.random.key(seed), init_batch)
    tx, schedule = optim.make_optimizer(optim_config, nn.meta.unbox(abstract_params),
                                        max(total_steps, 1))

    ema = float(optim_config["ema"])

    def init_fn(r, b):
      params = init(r, b)
      return with_ema(TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(nn.meta.unbox(params))), ema)

    replicated = sharding.replicated(mesh)
    batch_sh = sharding.batch_sharding(mesh)
    abstract_state = jax.eval_shape(init_fn, jax.random.key(seed), init_batch)
    state_sh = sharding.state_shardings(abstract_state, mesh, rules)
    # Straight into the shardings, so no host holds a full copy.
    init_jit = jax.jit(lambda r, b: nn.meta.unbox(init_fn(r, b)),
                       in_shardings=(replicated, replicated), out_shardings=state_sh)
    train_step = jax.jit(make_train_step(model, tx, loss_fn, ema), donate_argnums=(0,),
                         in_shardings=(state_sh, batch_sh, replicated),
                         out_shardings=(state_sh, replicated))
    if compile_batch is not None:
      train_step = CompiledPerShape(train_step, nn.meta.unbox(abstract_state), compile_batch)
    eval_step = _jit_eval(eval_fn(model), state_sh, mesh)
    engine = (tx, schedule, state_sh, init_jit, train_step, eval_step)
    if compile_batch is None:   # a compiled step takes its batch shape only
      with contextlib.suppress(TypeError):
        _ENGINES[key] = engine
  else:
    engine = _ENGINES[key]
  tx, schedule, state_sh, init_jit, train_step, eval_step = engine
  with mesh:
    state = init_jit(jax.random.key(seed), init_batch)
  return Setup(model, mesh, tx, schedule, state, state_sh, train_step, eval_step)


def check_padding_cut(config):
  """Cutting padding (data.pad_to_multiple_of) leaves a masked model's outputs unchanged, not
  the released code's, whose attention and transport see the padding."""
  attends = {k: v for k, v in (("model.respect_masks", config.model.respect_masks),
                               ("model.mot.mask", config.model.mot.mask)) if not v}
  if config.data.pad_to_multiple_of and attends:
    raise ValueError(f"data.pad_to_multiple_of={config.data.pad_to_multiple_of} with "
                     f"{', '.join(f'{k}=False' for k in attends)}: this model attends padding "
                     "(the released code's behaviour), so cutting it would change its outputs; "
                     "set --config.data.pad_to_multiple_of=0 or mask the padding")


def setup(config, total_steps=1, compile_train=False):
  """REMOTE's Setup: model of config.model, mesh of config.mesh (`build`)."""
  meta = pipeline.dataset_meta(config.data)
  check_padding_cut(config)
  marker_pieces(config.model.text)   # a bad value fails here, before compiling
  mesh = sharding.make_mesh(config.mesh)
  for field in ("batch_size", "eval_batch_size"):
    sharding.check_batch_size(mesh, config[field], field)
  model = remote.build(config.model, meta["num_classes"], meta["vocab_size"])
  compile_batch = (abstract_batch(meta, config.batch_size, sharding.batch_sharding(mesh))
                   if compile_train else None)
  s = build(model, dummy_batch(meta), config.optim, total_steps, mesh, rules=config.sharding,
            seed=config.seed, loss_fn=remote_loss, eval_fn=make_eval_step,
            compile_batch=compile_batch)
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


def train_steps(s: Setup, state, next_batch, total_steps, rng, *, writer=None, split="train",
                log_every=50, after_step=None):
  """Runs `s.train_step` from `state.step` to `total_steps`; returns the state.

  `next_batch(step)` gives this process's rows of the global batch of (0-based) `step`.
  Every `log_every` steps (and at the last) the mean metrics, with the learning rate
  and examples/s, go to `writer` under `split`; a non-finite loss or gradient norm
  raises there. `after_step(step, state)` (checkpoints, evaluation) may return True to
  stop early.
  """
  step = int(state.step)
  progress = writers.Progress(total_steps, initial=step, desc=split, log_every=log_every)
  t0, examples, pending = time.perf_counter(), 0, []
  try:
    while step < total_steps:
      batch = sharding.global_batch(next_batch(step), s.mesh)
      state, m = s.train_step(state, batch, rng)
      step += 1
      n = len(jax.tree.leaves(batch)[0])
      examples += n
      pending.append(m)
      if step % log_every == 0 or step == total_steps:
        pending = jax.device_get(pending)
        mean = {k: float(np.mean([x[k] for x in pending])) for k in pending[0]}
        pending = []
        metrics_lib.check_finite(step, loss=mean["loss"], grad_norm=mean["grad_norm"])
        mean["lr"] = float(s.schedule(step))
        mean["examples_per_s"] = examples / max(time.perf_counter() - t0, 1e-9)
        if writer is not None:
          writer.write(step, mean, split=split)
        progress.update(step, examples=n, loss=mean["loss"])
      else:
        progress.update(step, examples=n)
      if after_step is not None and after_step(step, state):
        break
  finally:
    progress.close()
  return state


def process_rows(mesh, rows, field="batch_size"):
  """This process's part of a global batch's row array (its slice, by the mesh)."""
  n, shard, _ = sharding.host_rows(mesh, len(rows), field)
  return rows[shard * n:(shard + 1) * n]


def fit(s: Setup, draw, make, steps, seed, ckpt_dir, *, ckpt_every=0, writer=None,
        name="train", log_every=50):
  """Trains `s.state` (donated) for `steps` steps; returns the trained params.

  Step i's global batch holds the rows `draw(np.random.default_rng([seed, i]))`
  (indices); each process builds its part with `make(indices) -> numpy batch`.
  Dropout keys fold the step into key(seed). The state is saved to `ckpt_dir` every
  `ckpt_every` steps and at the end (meta {"done": true}); called again with the same
  directory it resumes from the newest step that restores, or returns the finished
  run's params at once.
  """
  ckpt = ckpt_lib.Checkpointer(pathlib.Path(ckpt_dir).absolute(), max_to_keep=1,
                               async_save=False)
  try:
    state = s.state
    restored = ckpt.restore_latest(state)
    if restored is not None:
      state, start = restored
      if ckpt.load_meta(start).get("done"):
        return state.eval_params
      log.info("%s: resuming at step %d", name, start)

    def next_batch(i):
      return make(process_rows(s.mesh, np.asarray(draw(np.random.default_rng([seed, i])))))

    def after_step(i, state):
      if ckpt_every and i % ckpt_every == 0 and i < steps:
        ckpt.save(i, state, meta={"done": False}, force=True)

    state = train_steps(s, state, next_batch, steps, jax.random.key(seed), writer=writer,
                        split=name, log_every=log_every, after_step=after_step)
    ckpt.save(steps, state, meta={"done": True, "steps": steps}, force=True)
    ckpt.wait()
    return state.eval_params
  finally:
    ckpt.close()


def predict(s: Setup, params, n, batch_size, make, fn=None):
  """Outputs of `fn` (default `s.eval_step`) for rows 0..n-1, as numpy (n, ...).

  Batches have the fixed global size `batch_size` (the last is padded by repeating
  its last row), so one compiled function serves every call; each process makes its
  rows with `make(indices)`, and the outputs come back with every row.
  """
  fn = s.eval_step if fn is None else fn
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    valid = len(idx)
    idx = np.concatenate([idx, np.full(batch_size - valid, idx[-1])])
    local = make(process_rows(s.mesh, idx, "eval_batch_size"))
    out.append(np.asarray(jax.device_get(fn(params, sharding.global_batch(local, s.mesh))))
               [:valid])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


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
  s = setup(config, total_steps, compile_train=True)
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
    state = with_ema(state.replace(params=load_pretrained(state.params, config.model, config.seed)),
                     config.optim.ema)
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

  state = train_steps(s, state, lambda _: model_batch(next(train_iter)), total_steps,
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
  writer.write(step, summary, split="summary")
  writer.close()
  if main:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  if config.plots:   # every process evaluates (the step is collective), process 0 draws
    make_plots(s, state.eval_params, workdir, draw=main)
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
  for key in ("dev/f1", "dev/acc", "test/f1", "test/acc", "test/e-e/f1", "test/o-o/f1", "test/e-o/f1",
              "test/compositional/f1", "wall_s"):
    if key in agg:
      lines.append(f"{key:<21} {agg[key]['mean']:7.2f} +- {agg[key]['std']:.2f} "
                   f"(n={agg[key]['n']})")
  return "\n".join(lines)
