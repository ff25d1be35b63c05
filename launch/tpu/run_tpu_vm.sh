#!/usr/bin/env bash
# Runs on every worker of a Cloud TPU VM (a pod slice is several hosts), from a
# checkout of this repo installed (pip install -e .) in the python of each worker.
#
#   TPU_NAME=remote-v5e-32 ZONE=us-west4-a launch/tpu/run_tpu_vm.sh \
#     --config configs/umre.py --workdir gs://BUCKET/runs/umre
#
# Arguments go to remote_jax.train unchanged. REMOTE_JAX_DISTRIBUTED=1 makes
# every host join through jax.distributed, which reads the pod from the TPU
# metadata. PROJECT and REPO_DIR (default ~/remote-jax) are optional.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR="${REPO_DIR:-~/remote-jax}"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
  --worker=all \
  --command="cd $REPO_DIR && REMOTE_JAX_DISTRIBUTED=1 python -m remote_jax.train $(printf '%q ' "$@")"
