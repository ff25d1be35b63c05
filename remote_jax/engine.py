"""The engine: train states, the pure jitted train step, build, fit and predict. It knows
no paper: it imports no model and no data package, so a new task brings its own.

The seam is a loss function `loss_fn(model, params, batch, rng, train) -> (objective,
metrics)` (`classifier_loss` here, REMOTE's `task.remote_loss`); `make_train_step` turns it
into the pure step `train_step(state, batch, rng) -> (state, metrics)`, which `build` jits
with explicit shardings from `remote_jax.sharding` and the state donated. `train_steps` is
the loop every task uses (sharded batches, progress, logged means, the NaN check); `fit` /
`predict` are the resumable fixed-step training and batched inference of MI2RAGE's teachers
and students, and REMOTE's `task.train_and_evaluate` adds its data, evaluation and model
selection.
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
from remote_jax import metrics as metrics_lib
from remote_jax import optim, sharding, writers, xla_cpu

log = logging.getLogger(__name__)

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


def cross_entropy(logits, labels, weights):
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  weights = weights.astype(jnp.float32)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def classification(logits, batch):
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
  return classification(logits, batch)
def make_train_step(model, tx, loss_fn=classifier_loss, ema=0.0):
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


# Jitted functions per (model, optimizer, steps, mesh, rules, loss, eval): MI2RAGE's
# teachers of later rounds, and repeated runs in one process, reuse their compilations.
_ENGINES = {}


class CompiledPerShape:
  """A jitted train step compiled ahead once per batch shape: the first (`batch`, abstract)
  before the state exists, so the compiler's freed heap goes back to the OS and its
  transient memory does not stack on the state; the shorter batches of
  `data.pad_to_multiple_of` when first met. `compile_s`: the last compilation's seconds;
  `total_compile_s`: all of them."""

  def __init__(self, jitted, abstract_state, batch):
    self._jitted, self._state, self._compiled = jitted, abstract_state, {}
    self.compile_s = self.total_compile_s = 0.0
    self.compiled(batch)

  def compiled(self, batch):
    key = tuple((k, tuple(v.shape)) for k, v in sorted(batch.items()))
    if key not in self._compiled:
      t0 = time.perf_counter()
      self._compiled[key] = self._jitted.lower(self._state, batch, jax.random.key(0)).compile()
      self.compile_s = time.perf_counter() - t0
      self.total_compile_s += self.compile_s
      tokens = batch.get("input_ids")
      log.info("compiled the train step in %.1f s%s", self.compile_s,
               "" if tokens is None else f" (input_ids {tuple(tokens.shape)})")
      xla_cpu.release_freed_heap()
    return self._compiled[key]

  def __call__(self, state, batch, rng):
    return self.compiled(batch)(state, batch, rng)


def build(model, init_batch, optim_config, total_steps, mesh, *, rules="dp", seed=0,
          loss_fn=classifier_loss, eval_fn=make_logits_step, compile_batch=None, load=None):
  """Setup of `model` on `mesh`: sharded state initialised from `seed` on `init_batch`
  (numpy, any batch size), the optimizer of `optim_config` over `total_steps`, the train
  step of `loss_fn` (state donated) and the eval step `eval_fn(model)(params, batch)`.

  `load(params) -> params` (e.g. pretrained encoders) replaces the initial parameters; the
  average of `optim_config.ema` > 0 then starts at the loaded ones.

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
  if load is not None:
    state = with_ema(state.replace(params=load(state.params)), optim_config["ema"])
  return Setup(model, mesh, tx, schedule, state, state_sh, train_step, eval_step)


def train_steps(s: Setup, state, next_batch, total_steps, rng, *, writer=None, split="train",
                log_every=50, after_step=None):
  """Runs `s.train_step` from `state.step` to `total_steps`; returns the state.

  `next_batch(step)` gives this process's rows of the global batch of (0-based) `step`.
  Every `log_every` steps (and at the last) the mean metrics, with the learning rate,
  examples/s since the start (`after_step`'s time included) and `step_ms` (this window's
  milliseconds per step, `after_step`'s time excluded), go to `writer` under `split`; a
  non-finite loss or gradient norm raises there. `after_step(step, state)` (checkpoints,
  evaluation) may return True to stop early.
  """
  step = int(state.step)
  progress = writers.Progress(total_steps, initial=step, desc=split, log_every=log_every)
  t0, examples, pending = time.perf_counter(), 0, []
  window_start, hook_s = t0, 0.0
  try:
    while step < total_steps:
      batch = sharding.global_batch(next_batch(step), s.mesh)
      state, m = s.train_step(state, batch, rng)
      step += 1
      n = len(jax.tree.leaves(batch)[0])
      examples += n
      pending.append(m)
      if step % log_every == 0 or step == total_steps:
        window = len(pending)
        pending = jax.device_get(pending)
        mean = {k: float(np.mean([x[k] for x in pending])) for k in pending[0]}
        pending = []
        metrics_lib.check_finite(step, loss=mean["loss"], grad_norm=mean["grad_norm"])
        mean["lr"] = float(s.schedule(step))
        now = time.perf_counter()
        mean["examples_per_s"] = examples / max(now - t0, 1e-9)
        mean["step_ms"] = 1e3 * (now - window_start - hook_s) / window
        window_start, hook_s = now, 0.0
        if writer is not None:
          writer.write(step, mean, split=split)
        progress.update(step, examples=n, loss=mean["loss"])
      else:
        progress.update(step, examples=n)
      if after_step is not None:
        t_hook = time.perf_counter()
        stop = after_step(step, state)
        hook_s += time.perf_counter() - t_hook
        if stop:
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


