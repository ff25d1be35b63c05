"""Shared config pieces: the `:arg` mini-language and defaults (big_vision style).

`python -m remote_jax.train --config configs/umre.py:fusion=xattn,moe=off` passes
"fusion=xattn,moe=off" to `get_config(arg)`, which calls `parse_arg`.
"""
import ml_collections


def parse_arg(arg, lazy=False, **spec):
  """Parses "a=1,b=foo,flag" into a ConfigDict, typed by the defaults in `spec`.

  A bare name sets a bool to True. Unknown keys raise unless `lazy`.
  """
  config = ml_collections.ConfigDict(spec)
  if not arg:
    return config
  for item in arg.split(","):
    if not item:
      continue
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in spec:
      if not lazy:
        raise ValueError(
            f"config arg: unknown key {key!r} in {arg!r}; allowed: {sorted(spec)}")
      config[key] = value if sep else True
      continue
    default = spec[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config arg: {key!r} needs a value ({key}=...)")
      config[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0", "on", "off"):
        raise ValueError(f"config arg: {key}={value!r} is not a bool")
      config[key] = value.lower() in ("true", "1", "on")
    elif default is None:
      config[key] = value
    else:
      try:
        config[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(
            f"config arg: {key}={value!r} is not a {type(default).__name__}") from e
  return config
