r"""Device scaling: the trainer's sharded train step over 1, 2, 4, 8 devices.

  python -m bench.scaling                                   # CPU: virtual devices, small model
  python -m bench.scaling --sharding fsdp --mode weak
  python -m bench.scaling --platform gpu --config 'configs/demo.py:size=base' \
      --dtype bfloat16 --batch 64                           # on a GPU machine

Prints one JSON object per device count. Each count runs in its own process
(XLA fixes the device list when its backend starts): on the CPU with
`--xla_force_host_platform_device_count=N`, on GPUs with CUDA_VISIBLE_DEVICES
naming the first N. The step is `task.setup`'s, exactly what training
runs: the mesh from config.mesh, the state laid out by the sharding rules,
explicit in/out shardings, donated state, one real demo batch.

`--mode strong` keeps the global batch (per-device batch = batch / N);
`--mode weak` keeps the per-device batch (global = batch x N). `speedup` and
`efficiency` compare samples/s with the 1-device run (weak: efficiency =
speedup / N; strong the same). `state_mib_device0` is the parameters plus
Adam moments held by the first device: constant under data parallelism,
divided by N under FSDP.

Virtual CPU devices share the machine's cores (2 here), so on a CPU this
measures what sharding costs (collectives, smaller per-device matmuls), not a
speedup; real scaling needs real devices.
"""
import argparse
import json
import os
import time

import numpy as np

from bench import load_config, run_child
from remote_jax import xla_cpu as xla_cpu_presets


def device_env(n, platform):
  env = dict(os.environ)
  if platform == "cpu":
    flag = f"--xla_force_host_platform_device_count={n}"
    env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS", ""), flag]))
    env["JAX_PLATFORMS"] = "cpu"
  elif platform == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in range(n))
  else:
    raise ValueError(f"--platform {platform!r}: allowed cpu, gpu")
  return env


def state_mib_on_first_device(state):
  """MiB of `state` (parameters + optimiser) that the first device holds."""
  import jax
  first = jax.devices()[0]
  total = 0
  for leaf in jax.tree_util.tree_leaves(state):
    for shard in getattr(leaf, "addressable_shards", []):
      if shard.device == first:
        total += shard.data.nbytes
  return round(total / 2 ** 20, 2)


def run_one(config_arg, n, batch, mode, sharding_name, dtype, steps, xla_cpu):
  import jax

  from remote_jax import sharding, task
  from remote_jax.data import pipeline
  xla_cpu_presets.apply(xla_cpu)   # before the backend starts
  jax.config.update("jax_threefry_partitionable", True)

  config = load_config(config_arg)
  global_batch = batch if mode == "strong" else batch * n
  if global_batch % n:
    raise ValueError(f"--batch {batch} does not split over {n} devices ({mode} scaling)")
  if jax.device_count() < n:
    raise RuntimeError(f"{n} devices asked, {jax.device_count()} present")
  with config.unlocked():
    config.batch_size = config.eval_batch_size = global_batch
    config.sharding = sharding_name
    config.mesh = [("data", n)] if sharding_name == "dp" else [("fsdp", n)]
    config.model.dtype = dtype
  t0 = time.perf_counter()
  s = task.setup(config, total_steps=1000)
  setup_s = time.perf_counter() - t0
  ds = pipeline.build_dataset(config.data, task.SPLITS["train"], batch_size=global_batch,
                              shuffle=True, seed=0, num_epochs=None, drop_remainder=True)
  local = next(iter(ds))
  b = sharding.global_batch(task.model_batch(local), s.mesh)
  rng = jax.random.key(0)
  state = s.state
  t0 = time.perf_counter()
  state, m = s.train_step(state, b, rng)
  jax.block_until_ready(m)
  first_s = time.perf_counter() - t0   # compile + one step
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = s.train_step(state, b, rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  step_s = float(np.median(times))
  return dict(devices=n, backend=jax.default_backend(), mode=mode, sharding=sharding_name,
              dtype=dtype, global_batch=global_batch, per_device_batch=global_batch // n,
              mesh=dict(s.mesh.shape), step_s=round(step_s, 4),
              samples_per_s=round(global_batch / step_s, 2),
              compile_and_first_step_s=round(first_s, 2), setup_s=round(setup_s, 2),
              state_mib_device0=state_mib_on_first_device(state),
              loss=round(float(m["loss"]), 4), cpu_cores=os.cpu_count())


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/demo.py:size=small")
  ap.add_argument("--devices", default="1,2,4,8")
  ap.add_argument("--batch", type=int, default=32,
                  help="strong: the global batch; weak: the per-device batch")
  ap.add_argument("--mode", default="strong", choices=("strong", "weak"))
  ap.add_argument("--sharding", default="dp", choices=("dp", "fsdp"))
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--platform", default="cpu", choices=("cpu", "gpu"))
  ap.add_argument("--xla-cpu", default="auto", choices=xla_cpu_presets.CHOICES,
                  help="XLA:CPU flag preset (remote_jax/xla_cpu.py)")
  ap.add_argument("--one", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.one:
    print(json.dumps(run_one(**json.loads(args.one))), flush=True)
    return
  base = None
  for n in [int(d) for d in args.devices.split(",") if d]:
    one = dict(config_arg=args.config, n=n, batch=args.batch, mode=args.mode,
               sharding_name=args.sharding, dtype=args.dtype, steps=args.steps,
               xla_cpu=args.xla_cpu)
    row = run_child("bench.scaling", one, device_env(n, args.platform))
    if "samples_per_s" in row:
      base = base or (row["devices"], row["samples_per_s"])
      speedup = row["samples_per_s"] / base[1]
      row["speedup"] = round(speedup, 3)
      row["efficiency"] = round(speedup / (row["devices"] / base[0]), 3)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
