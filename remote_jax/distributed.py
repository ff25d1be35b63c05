"""Joining the processes of a multi-process run (MaxText's maybe_initialize_jax_distributed_system).

`maybe_initialize(config)` is the first thing train.py does, before any other
JAX call. It calls `jax.distributed.initialize()` when this is one process of
several, and does nothing for a plain single-process run:

- explicit coordinator: `config.distributed.coordinator_address`, or env
  REMOTE_JAX_COORDINATOR (host:port) with REMOTE_JAX_NUM_PROCESSES and
  REMOTE_JAX_PROCESS_ID (what launch/local.sh sets);
- SLURM (srun with SLURM_NTASKS > 1), Open MPI, and TPU pods on GKE are
  detected here from their env, and jax fills in the coordinator itself;
- REMOTE_JAX_DISTRIBUTED=1 (or `config.distributed.enabled=True`) forces
  jax's own auto-detection, for TPU VM pods whose topology lives in the VM
  metadata rather than the env (launch/tpu, launch/gke); =0 turns it all off.
"""
import logging
import os

import jax

from remote_jax.config import distributed_field as _field

log = logging.getLogger(__name__)

ENV_COORDINATOR = "REMOTE_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "REMOTE_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "REMOTE_JAX_PROCESS_ID"
ENV_ENABLED = "REMOTE_JAX_DISTRIBUTED"


def _int(value):
  return None if value in (None, "") else int(value)


def _cluster_launched():
  """The launcher's name when it started this as one of several processes."""
  env = os.environ
  if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env:
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  if "," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", ""):
    return "tpu"
  return None


def maybe_initialize(config=None):
  """Calls jax.distributed.initialize() when launched as several processes."""
  if jax.distributed.is_initialized():
    return
  enabled = os.environ.get(ENV_ENABLED, "").lower()
  if enabled in ("0", "false", "off"):
    return
  enabled = enabled in ("1", "true", "on") or _field(config, "enabled") is True
  coordinator = _field(config, "coordinator_address") or os.environ.get(ENV_COORDINATOR)
  kwargs = {}
  timeout = _field(config, "initialization_timeout")
  if timeout is not None:
    kwargs["initialization_timeout"] = int(timeout)
  if coordinator:
    # 0 processes is configs/common.py's "unset".
    num_processes = _int(_field(config, "num_processes") or os.environ.get(ENV_NUM_PROCESSES))
    process_id = _field(config, "process_id")
    process_id = _int(os.environ.get(ENV_PROCESS_ID) if process_id is None else process_id)
    if num_processes is None or process_id is None:
      raise ValueError(f"coordinator {coordinator} given but not the process count and id: set "
                       f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or config.distributed.*)")
    log.info("jax.distributed: process %d of %d, coordinator %s", process_id, num_processes,
                 coordinator)
    jax.distributed.initialize(coordinator, num_processes, process_id, **kwargs)
  else:
    cluster = _cluster_launched()
    if not (enabled or cluster):
      log.info("single process: jax.distributed not initialized")
      return
    log.info("jax.distributed: auto-detecting the cluster (%s)", cluster or "forced")
    jax.distributed.initialize(**kwargs)
  log.info("process %d of %d: %d local / %d global devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)


def is_main():
  """The process that writes logs, configs and metrics (orbax coordinates checkpoints)."""
  return jax.process_index() == 0


def barrier(name):
  """Every process waits here until all arrive (a no-op in one process): files that the
  main process wrote before it are then visible to the others."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
