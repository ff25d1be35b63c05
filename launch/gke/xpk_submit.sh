#!/usr/bin/env bash
# Submits a TPU training job to a GKE cluster with xpk: one container per TPU
# host, from IMAGE (this repo installed with jax[tpu]; see docs/scaling.md).
#
#   CLUSTER=my-cluster TPU_TYPE=v5litepod-32 IMAGE=gcr.io/PROJECT/remote-jax \
#     launch/gke/xpk_submit.sh --config configs/umre.py --workdir gs://BUCKET/runs/umre
#
# Arguments go to remote_jax.train unchanged. GKE sets TPU_WORKER_HOSTNAMES,
# from which jax.distributed finds the other hosts. Optional: WORKLOAD, PROJECT,
# ZONE. One slice: make_mesh does not build multislice meshes.
set -euo pipefail
: "${CLUSTER:?set CLUSTER}" "${TPU_TYPE:?set TPU_TYPE}" "${IMAGE:?set IMAGE}"
WORKLOAD="${WORKLOAD:-remote-jax-$(date +%m%d-%H%M%S)}"

xpk workload create --cluster="$CLUSTER" --workload="$WORKLOAD" --tpu-type="$TPU_TYPE" \
  --docker-image="$IMAGE" ${PROJECT:+--project="$PROJECT"} ${ZONE:+--zone="$ZONE"} \
  --command="REMOTE_JAX_DISTRIBUTED=1 python -m remote_jax.train $(printf '%q ' "$@")"
