#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create the TPU VM (or reuse it), copy this repository to
# every worker and install it there (idempotent), then run the same command on all workers.
#
#   TPU_NAME=ppow-v5p ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-8 \
#   RUNTIME_VERSION=v2-alpha-tpuv5 WORKDIR=gs://my-bucket/ppow/llama31_8b \
#   CONFIG=configs/llama31_8b_eagle3.py:tpu_v5p launch/tpu_pod.sh [extra ppow_jax.main flags]
#
# DRY_RUN=1 prints the commands of a fresh launch (it skips the check for an existing VM).
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

: "${TPU_NAME:?set TPU_NAME, the TPU VM to create or reuse}"
: "${ZONE:?set ZONE, e.g. us-east5-a}"
: "${PROJECT:?set PROJECT, the Google Cloud project}"
: "${WORKDIR:?set WORKDIR, a gs:// path for checkpoints and logs}"
: "${CONFIG:?set CONFIG, e.g. configs/llama31_8b_eagle3.py:tpu_v5p}"
: "${ACCELERATOR_TYPE:?set ACCELERATOR_TYPE, e.g. v5p-8}"
: "${RUNTIME_VERSION:?set RUNTIME_VERSION, e.g. v2-alpha-tpuv5}"
[[ "$WORKDIR" == gs://* ]] || { echo "WORKDIR must be a gs:// path, got $WORKDIR" >&2; exit 1; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
tarball="${TMPDIR:-/tmp}/ppow_jax-$TPU_NAME.tar.gz"
where=(--zone="$ZONE" --project="$PROJECT")

if [[ "${DRY_RUN:-0}" == 1 ]] || ! gcloud compute tpus tpu-vm describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${where[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
fi
run tar -czf "$tarball" -C "$repo" --exclude=.git --exclude=.venv --exclude=workdir --exclude=__pycache__ .
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME":ppow_jax.tar.gz "${where[@]}" --worker=all
setup='rm -rf ppow_jax && mkdir ppow_jax && tar -xzf ppow_jax.tar.gz -C ppow_jax && { [ -d ppow_venv ] || python3 -m venv ppow_venv; } && ppow_venv/bin/pip install -q "jax[tpu]" -e ./ppow_jax'
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$setup"
train="cd ppow_jax && PPOW_DISTRIBUTED=1 ../ppow_venv/bin/python -m ppow_jax.main $(printf '%q ' --config="$CONFIG" --workdir="$WORKDIR" "$@")"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --worker=all --command="${train% }"
