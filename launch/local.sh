#!/usr/bin/env bash
# N processes on this machine joined by jax.distributed, on CPU devices: a
# rehearsal of a multi-host run (data loading per process, global batches,
# cross-process sharding) without a cluster.
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local.sh \
#     --config configs/demo.py:runlocal --workdir /tmp/remote_local
#
# Arguments go to remote_jax.train unchanged (MODULE=remote_jax.evaluate or
# remote_jax.predict runs those instead). A process that fails stops the rest.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PYTHON="${PYTHON:-python}"
MODULE="${MODULE:-remote_jax.train}"
PORT="${PORT:-$("$PYTHON" -c 'import portpicker; print(portpicker.pick_unused_port())')}"

export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS} ${XLA_FLAGS:-}"
export REMOTE_JAX_COORDINATOR="localhost:${PORT}"
export REMOTE_JAX_NUM_PROCESSES="${NUM_PROCESSES}"

trap 'kill $(jobs -p) 2>/dev/null || true' EXIT
for ((i = 0; i < NUM_PROCESSES; i++)); do
  REMOTE_JAX_PROCESS_ID="$i" "$PYTHON" -m "$MODULE" "$@" &
done
for ((i = 0; i < NUM_PROCESSES; i++)); do
  wait -n
done
