"""Metric logging: JSONL + TensorBoard (tensorboardX, no TensorFlow) and progress.

Layout of a workdir: `config.json`, `metrics.jsonl` (one JSON object per
write: {"step", "split", <metrics>}) and `tb/` (TensorBoard events, scalars
tagged "<split>/<name>"). Only JAX process 0 writes; the others get a writer
whose methods do nothing, so call sites need no `if process_index == 0`.
"""
import json
import logging
import math
import os
import pathlib
import sys
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def setup_cli_logging() -> None:
  """Our INFO logs as `HH:MM:SS LEVEL message` on stderr; library chatter (orbax's
  per-save INFO lines go through absl) only from WARNING up."""
  from absl import logging as absl_logging  # late: absl is a CLI concern
  root = logging.getLogger()
  for h in list(root.handlers):
    if isinstance(h, absl_logging.ABSLHandler):
      root.removeHandler(h)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger("absl").setLevel(logging.WARNING)
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)   # "no TPU/GPU" notes


def _is_main_process() -> bool:
  import jax  # late: writers are usable (and tested) without touching devices
  return jax.process_index() == 0


def to_json(x):
  """json.dumps `default`: numpy/jax scalars and arrays, ConfigDicts, sets; else str (paths).

  The project's one JSON conversion: metrics, config.json, checkpoint meta, cache keys.
  """
  if hasattr(x, "to_dict"):
    return x.to_dict()
  if isinstance(x, (np.generic, np.ndarray)) or type(x).__module__.startswith("jax"):
    return np.asarray(x).tolist()
  if isinstance(x, (set, frozenset)):
    return sorted(x)
  return str(x)


def jsonable(x: Any) -> Any:
  """`x` as plain JSON types (numpy, jax, ConfigDict converted)."""
  return json.loads(json.dumps(x, default=to_json))


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a/b": 1}."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, key + "/"))
    else:
      out[key] = v
  return out


class MetricWriter:
  """Writes metrics to `workdir/metrics.jsonl` and `workdir/tb`.

  enabled: None means "only on JAX process 0"; False makes every call a no-op.
  Non-finite floats are written to JSONL as null (JSON has no NaN).
  """

  def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None):
    self.workdir = pathlib.Path(workdir)
    self.enabled = _is_main_process() if enabled is None else bool(enabled)
    self._tb = None
    self._jsonl = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.workdir.mkdir(parents=True, exist_ok=True)
      # Held open for the writer's lifetime; closed in close().
      self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")
      self._tb = SummaryWriter(logdir=str(self.workdir / "tb"))

  def write_config(self, config: Any) -> None:
    """Saves the run config as workdir/config.json (ConfigDicts via to_dict)."""
    if not self.enabled:
      return
    text = json.dumps(config, default=to_json, indent=2, sort_keys=True)
    (self.workdir / "config.json").write_text(text + "\n", encoding="utf-8")
    self._tb.add_text("config", "```\n" + text + "\n```", 0)

  def write(self, step: int, metrics: Mapping[str, Any], split: str | None = None) -> None:
    """One JSONL line; every scalar also goes to TensorBoard as "<split>/<name>".

    Nested dicts are flattened with "/"; arrays stay in JSONL only.
    """
    if not self.enabled:
      return
    flat = flatten(metrics)
    record = {"step": int(step), "split": split}
    for k, v in flat.items():
      v = jsonable(v)
      if isinstance(v, float) and not math.isfinite(v):
        v = None
      record[k] = v
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in flat.items():
      if np.ndim(v) == 0 and not isinstance(v, (str, bytes, type(None))):
        try:
          self._tb.add_scalar(f"{split}/{k}" if split else k, float(v), int(step))
        except (TypeError, ValueError):
          pass  # non-numeric scalar (a name, a tag): JSONL only

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled and self._tb is not None:
      self._jsonl.close()
      self._tb.close()
      self._tb = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(path: str | os.PathLike, split: str | None = None) -> list[dict]:
  """Records of a metrics.jsonl (or of workdir/metrics.jsonl), optionally one split."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "metrics.jsonl"
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        rec = json.loads(line)
        if split is None or rec.get("split") == split:
          records.append(rec)
  return records


class Progress:
  """A tqdm bar with loss and examples/s; a log line every `log_every` steps instead
  when stderr is not a TTY (batch jobs); silent on JAX processes > 0.

    progress = Progress(total_steps, initial=start_step)
    for step in ...:
      progress.update(step + 1, loss=float(loss), examples=batch_size)
    progress.close()
  """

  def __init__(self, total: int | None, initial: int = 0, desc: str = "train",
               log_every: int = 100, enabled: bool | None = None,
               tty: bool | None = None):
    self.enabled = _is_main_process() if enabled is None else bool(enabled)
    self.tty = sys.stderr.isatty() if tty is None else tty
    self.total, self.desc, self.log_every = total, desc, log_every
    self.step = initial
    self._examples = 0
    self._loss = None
    self._t0 = time.perf_counter()
    self._bar = None
    if self.enabled and self.tty:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

  def update(self, step: int, loss: float | None = None, examples: int = 0) -> str:
    """Moves to `step`; returns the status text (also shown or logged).

    The last loss given stays shown on steps without one; examples/s appears
    once examples are counted.
    """
    if not self.enabled:
      return ""
    advanced, self.step = step - self.step, step
    self._examples += examples
    self._loss = self._loss if loss is None else float(loss)
    dt = time.perf_counter() - self._t0
    parts = [] if self._loss is None else [f"loss={self._loss:.4f}"]
    if self._examples:
      parts.append(f"ex/s={self._examples / max(dt, 1e-9):.1f}")
    status = " ".join(parts)
    if self._bar is not None:
      self._bar.set_postfix_str(status, refresh=False)
      self._bar.update(advanced)
    elif self.log_every and step % self.log_every == 0:
      total = f"/{self.total}" if self.total else ""
      log.info("%s step %d%s %s", self.desc, step, total, status)
    return status

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
