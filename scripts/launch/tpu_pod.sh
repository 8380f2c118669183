#!/usr/bin/env bash
# Train on every host of a Cloud TPU VM pod slice (or several slices): one process per host, each
# running the same command as a local run. JAX finds the other hosts from the TPU metadata
# (rmjax.main --distributed=auto picks 'tpu' on a TPU VM).
#
#   scripts/launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   e.g. scripts/launch/tpu_pod.sh rm-v5e-32 us-west4-a configs/synthetic.py /mnt/shared/runs/demo \
#          --config.mesh.shape='(-1,4,1)'
#
# Every worker needs the repository at $REPO (default ~/rmjax) with rmjax installed
# (pip install -e .), and WORKDIR must be one directory all workers see (Filestore / NFS / a
# gcsfuse mount): checkpoints are written by all hosts together, metrics by host 0 only.
# Multi-slice: add --config.mesh.dcn_shape='(2,1,1)' (mesh.shape is then per slice).
set -euo pipefail
if [[ $# -lt 4 ]]; then
  sed -n '6,8p' "$0" >&2
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4
REPO=${REPO:-'~/rmjax'}
COMMAND="cd $REPO && python -m rmjax.main --config=$(printf '%q' "$CONFIG") \
--workdir=$(printf '%q' "$WORKDIR")$(printf ' %q' "$@")"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="$COMMAND"
