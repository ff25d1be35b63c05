"""Checkpoints: one orbax Composite per step in workdir/ckpt (MaxText layout).

Items of a step:
  state      the train-state pytree (params, optax state, step, rng ...)
  data_iter  the grain iterator position (grain's own orbax handler: one JSON
             file per process), present when an iterator was given
  meta       JSON: config, best metrics, anything small

Restoring goes *into* an abstract tree: every leaf's sharding is taken from
it, so a checkpoint written on one mesh restores onto another.

Where a run starts (`resume_source`): the newest step of workdir/ckpt that
restores (newer unreadable steps are set aside, see `restore_latest`), else
`config.resume` (another run's checkpoint: full state), else scratch.
"""
import logging
import os
import pathlib
import shutil
import sys
from typing import Any, NamedTuple

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp

from remote_jax.errors import CheckpointError
from remote_jax.writers import jsonable

log = logging.getLogger(__name__)


class CheckpointMismatch(CheckpointError):
  """The checkpoint reads, but its state tree is not the one the config builds."""


def _short(e, limit=300):
  """First line of an orbax/tensorstore error (they append kilobytes of specs)."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = text if len(text) <= limit else text[:limit] + " ..."
  return f"{type(e).__name__}: {text}"


def _quiet_aborted_reads():
  """After a failed restore, orbax's pending reads finish on a closed event loop and
  Python prints "Event loop is closed" tracebacks as unraisable: drop only those."""
  previous = sys.unraisablehook
  if getattr(previous, "_drops_closed_loop", False):
    return

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
      previous(unraisable)

  hook._drops_closed_loop = True
  sys.unraisablehook = hook


def _abstract(tree):
  """Leaves -> ShapeDtypeStruct carrying the leaf's sharding (restore target).

  numpy leaves stay numpy (restored on host); shapes without a sharding land
  on the first device rather than wherever they were saved from.
  """
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def one(x):
    if isinstance(x, np.ndarray) or np.isscalar(x):
      return x
    sharding = getattr(x, "sharding", None) or default
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree_util.tree_map(one, tree)


class Checkpointer:
  """orbax CheckpointManager over `directory` (normally workdir/ckpt).

  save_every: steps between saves (`save(..., force=True)` saves regardless,
  e.g. at the end). async_save: write in the background (call `wait()` or
  `close()` before exit); keep it off in tests.
  """

  def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3,
               save_every: int = 1, async_save: bool = True, read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.read_only = read_only
    # Exactly every `save_every` steps (orbax's default also saves the first
    # step it sees), plus on a preemption notice.
    policy = ocp.checkpoint_managers.AnySavePolicy([
        ocp.checkpoint_managers.FixedIntervalPolicy(save_every),
        ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_decision_policy=policy,
        enable_async_checkpointing=async_save, read_only=read_only,
        create=not read_only)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  @classmethod
  def for_workdir(cls, workdir: str | os.PathLike, **kw) -> "Checkpointer":
    return cls(pathlib.Path(workdir) / "ckpt", **kw)

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, data_iter=None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Saves if `step` is due (or `force`) and not already saved; returns whether it did."""
    step = int(step)
    if step in self._mngr.all_steps():
      return False
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(jsonable(meta or {}))}
    if data_iter is not None:
      items["data_iter"] = grain_ckpt.CheckpointSave(data_iter)
    return self._mngr.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any, data_iter=None) -> Any:
    """The state of `step` restored into `abstract_state`'s structure and
    shardings; `data_iter` (if given) is moved to the saved position in place."""
    items = {"state": ocp.args.StandardRestore(_abstract(abstract_state))}
    saved = self._item_names(step)
    if data_iter is not None:
      if "data_iter" not in saved:
        raise CheckpointError(f"checkpoint step {step} in {self.directory} has no data "
                              "iterator state, but an iterator was given to restore")
      items["data_iter"] = grain_ckpt.CheckpointRestore(data_iter)
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types; name the checkpoint
      _quiet_aborted_reads()
      if "tree structures do not match" in str(e):
        raise CheckpointMismatch(
            f"checkpoint step {step} in {self.directory} holds another state than this "
            "config builds (e.g. one saved with optim.ema set, read without it, or the "
            "reverse): give the options the run was trained with") from e
      raise CheckpointError(f"cannot restore checkpoint step {step} from {self.directory}: "
                            f"{_short(e)}") from e
    return out["state"]

  def restore_latest(self, abstract_state: Any, data_iter=None) -> tuple[Any, int] | None:
    """(state, step) of the newest checkpoint that restores, or None when there is none.

    A newer step that does not restore (a crash mid-write, a corrupt file) is logged
    with the reason and moved to <directory>_unreadable/ on process 0, so that training
    can save that step again.
    """
    steps = self.all_steps()
    for i, step in enumerate(reversed(steps)):
      try:
        state = self.restore(step, abstract_state, data_iter)
        self.load_meta(step)
      except CheckpointMismatch:
        raise   # a readable step of another config: nothing to set aside
      except CheckpointError as e:
        if i == len(steps) - 1:
          raise CheckpointError(f"no checkpoint in {self.directory} restores (steps {steps}); "
                                f"the oldest: {e}") from None
        log.warning("skipping checkpoint step %d: %s", step, e)
        self._set_aside(step)
        continue
      return state, step
    return None

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0 and not self.read_only:
      aside = self.directory.with_name(self.directory.name + "_unreadable")
      aside.mkdir(exist_ok=True)
      target = aside / str(step)
      shutil.rmtree(target, ignore_errors=True)
      shutil.move(str(self.directory / str(step)), target)
      log.warning("moved the unreadable step %d to %s", step, target)
    self._mngr.reload()

  def load_meta(self, step: int | None = None) -> dict:
    """The JSON meta item of `step` (default latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    try:
      return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
      raise CheckpointError(f"cannot read meta of step {step} in {self.directory}: "
                            f"{_short(e)}") from e

  def _item_names(self, step: int) -> set[str]:
    step_dir = self.directory / str(step)
    if not step_dir.is_dir():
      raise CheckpointError(f"no checkpoint step {step} in {self.directory} "
                            f"(have {self.all_steps()})")
    return {p.name for p in step_dir.iterdir() if p.is_dir()}

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def open_checkpoint(path: str | os.PathLike) -> tuple[Checkpointer, int]:
  """A read-only Checkpointer and step for `path`: a workdir (uses its ckpt/),
  a checkpoint root (latest step) or one step directory (that step)."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint path {path} does not exist")
  if (path / "ckpt").is_dir():
    path = path / "ckpt"
  step = None
  if path.name.isdigit() and (path / "state").is_dir():
    path, step = path.parent, int(path.name)
  ckpt = Checkpointer(path, max_to_keep=None, async_save=False, read_only=True)
  if step is None:
    step = ckpt.latest_step()
    if step is None:
      raise CheckpointError(f"no finished checkpoint step under {path}")
  return ckpt, step


class Start(NamedTuple):
  kind: str  # "workdir" | "resume" | "scratch"
  path: str | None


def resume_source(workdir: str | os.PathLike | None, resume: str | None = None) -> Start:
  """Where training starts, by precedence: workdir latest > resume > scratch.

  A preempted run restarted with the same workdir thus always continues from
  its own last step, even if its config also names `resume`. A named `resume`
  path that does not exist is an error, not a silent fall-through to scratch.
  (Pretrained encoders are not a start: the engine's build loads them into a scratch
  start, from config.model.{text,vision}.pretrained_dir.)
  """
  if workdir is not None:
    ckpt_dir = pathlib.Path(workdir) / "ckpt"
    if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
      return Start("workdir", str(ckpt_dir))
  if resume:
    if not pathlib.Path(resume).exists():
      raise FileNotFoundError(f"config.resume = {resume!r} does not exist")
    return Start("resume", str(resume))
  return Start("scratch", None)
