"""User-facing errors: one clear line instead of a deep traceback.

Errors that describe bad input (a data file, a config field, a checkpoint
directory) are raised by our own code as ValueError / FileNotFoundError
(subclasses) whose message already names the file, line or field.
`user_errors()` prints such a message alone and exits with status 2. The same
exception types raised inside a library (jax, flax, ...) keep their traceback:
they are bugs, not bad input.
"""
import contextlib
import os
import pathlib
import sys
import traceback

OUR_CODE = tuple(str(pathlib.Path(__file__).resolve().parents[1] / d)
                 for d in ("remote_jax", "mi2rage_jax", "configs"))

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


class CheckpointError(ValueError):
  """A checkpoint that exists but cannot be read: a training checkpoint (corrupt,
  incomplete, another model's) or a pretrained one that does not fit our modules."""


@contextlib.contextmanager
def user_errors():
  try:
    yield
  except USER_ERRORS as e:
    if os.environ.get("REMOTE_JAX_TRACEBACK") or not raised_by_us(e):
      raise
    print_error(e.args[0] if isinstance(e, KeyError) and e.args else e)
    sys.exit(2)


def print_error(msg, hint=""):
  """`error: msg` on a line of its own: open progress bars are closed first, so the
  line does not start after a bar's residue."""
  tqdm = sys.modules.get("tqdm")
  for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
    bar.close()
  hint = f"{hint}; " if hint else ""
  print(f"error: {msg}\n({hint}set REMOTE_JAX_TRACEBACK=1 for the traceback)", file=sys.stderr)


def raised_by_us(exc):
  """True when the innermost frame of `exc` is in this project's code."""
  frames = traceback.extract_tb(exc.__traceback__)
  return bool(frames) and str(pathlib.Path(frames[-1].filename).resolve()).startswith(OUR_CODE)
