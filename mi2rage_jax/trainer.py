"""Training and inference of one classifier (a teacher or a student), resumable.

`fit` runs `steps` AdamW updates (remote_jax.optim) on batches drawn by
`sample(rng) -> batch`, saving {params, opt_state} with remote_jax.checkpoint
every `ckpt_every` steps and at the end (meta {"done": true}). Called again
with the same directory it resumes from the latest step, or returns the saved
parameters at once when the run had finished.
"""
import json
import logging
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from remote_jax import checkpoint as ckpt_lib
from remote_jax import optim as optim_lib
from remote_jax import writers

log = logging.getLogger(__name__)

# Compiled functions are cached per (hashable) module, so teachers of later rounds
# and repeated runs in one process reuse them.
_INIT, _STEP, _APPLY = {}, {}, {}


def init_params(model, batch, seed: int):
  if model not in _INIT:
    _INIT[model] = jax.jit(lambda key, b: model.init({"params": key}, b, True))
  return nn.meta.unbox(_INIT[model](jax.random.key(seed), batch)["params"])


def train_step(model, optim_cfg, params, steps: int):
  """(tx, jitted step(state, batch, rng) -> (state, loss)), cached."""
  key = (model, json.dumps(writers.jsonable(optim_cfg), sort_keys=True), int(steps))
  if key not in _STEP:
    tx, _ = optim_lib.make_optimizer(optim_cfg, params, max(steps, 1))

    @jax.jit
    def step_fn(state, batch, rng):
      def loss_fn(p):
        logits = model.apply({"params": p}, batch, False, rngs={"dropout": rng})
        return softmax_ce(logits, batch["label"]).mean()
      loss, grads = jax.value_and_grad(loss_fn)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
              "step": state["step"] + 1}, loss

    _STEP[key] = (tx, step_fn)
  return _STEP[key]


def load_pretrained(params, model_cfg, num_extra_tokens: int):
  """Replaces `text` / `vision` subtrees by converted HF weights when their dirs are set."""
  text_dir = model_cfg.text.get("pretrained_dir", "")
  vision_dir = model_cfg.vision.get("pretrained_dir", "")
  if not (text_dir or vision_dir):
    return params
  from remote_jax.models import convert
  params = dict(params)
  if text_dir and "text" in params:
    _, loaded = convert.load_bert(text_dir, num_extra_tokens=num_extra_tokens, seed=0)
    params["text"] = _check_same("text", params["text"], loaded)
  if vision_dir and "vision" in params:
    v = model_cfg.vision
    _, loaded = convert.load_clip_vision(vision_dir, image_size=v.image_size,
                                         patch_size=v.patch_size, use_cls=True,
                                         use_depth=False, seed=0)
    params["vision"] = _check_same("vision", params["vision"], loaded)
  return params


def _check_same(name, ours, loaded):
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)
  if jax.tree_util.tree_structure(ours) != jax.tree_util.tree_structure(loaded) or \
      shapes(ours) != shapes(loaded):
    raise ValueError(f"pretrained {name} weights do not fit the {name} encoder built from "
                     "config.model (check the vocabulary: tokenizer_dir must be the "
                     "checkpoint's)")
  return jax.tree.map(lambda x, y: np.asarray(y, x.dtype), ours, loaded)


def softmax_ce(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def fit(model, params, sample, steps: int, optim_cfg, seed: int, ckpt_dir, ckpt_every: int = 0,
        writer=None, name: str = "train", log_every: int = 50):
  """Returns the trained params (restored if `ckpt_dir` holds a finished run)."""
  tx, step_fn = train_step(model, optim_cfg, params, steps)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  ckpt = ckpt_lib.Checkpointer(pathlib.Path(ckpt_dir).absolute(), max_to_keep=1,
                               async_save=False)
  try:
    start = 0
    latest = ckpt.latest_step()
    if latest is not None:
      state = ckpt.restore(latest, state)
      start = int(latest)
      if ckpt.load_meta(latest).get("done"):
        return state["params"]
      log.info("%s: resuming at step %d", name, start)

    key = jax.random.key(seed)
    losses = []
    progress = writers.Progress(steps, initial=start, desc=name, log_every=log_every)
    for i in range(start, steps):
      rng = np.random.default_rng([seed, i])
      batch = sample(rng)
      state, loss = step_fn(state, batch, jax.random.fold_in(key, i))
      losses.append(loss)
      n = len(jax.tree.leaves(batch)[0])
      if (i + 1) % log_every == 0 or i + 1 == steps:
        mean = float(np.mean(jax.device_get(losses)))
        if not np.isfinite(mean):
          raise FloatingPointError(f"{name}: non-finite loss {mean} at step {i + 1}")
        if writer is not None:
          writer.write(i + 1, {f"{name}/loss": mean})
        losses = []
        progress.update(i + 1, loss=mean, examples=n)
      else:
        progress.update(i + 1, examples=n)
      if ckpt_every and (i + 1) % ckpt_every == 0 and i + 1 < steps:
        ckpt.save(i + 1, state, meta={"done": False}, force=True)
    progress.close()
    ckpt.save(steps, state, meta={"done": True, "steps": steps}, force=True)
    ckpt.wait()
    return state["params"]
  finally:
    ckpt.close()


def predict(model, params, n: int, batch_size: int, make):
  """Deterministic logits (n, C) of rows 0..n-1; `make(indices) -> batch`.

  Batches have a fixed size (the last is padded by repeating a row), so one
  compiled function serves every call.
  """
  apply = _apply_fn(model)
  out = []
  for s in range(0, n, batch_size):
    idx = np.arange(s, min(s + batch_size, n))
    valid = len(idx)
    if valid < batch_size:
      idx = np.concatenate([idx, np.full(batch_size - valid, idx[-1])])
    out.append(np.asarray(jax.device_get(apply(params, make(idx))))[:valid])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)



def _apply_fn(model):
  if model not in _APPLY:
    _APPLY[model] = jax.jit(lambda p, b: model.apply({"params": p}, b, True))
  return _APPLY[model]
