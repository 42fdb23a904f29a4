#!/usr/bin/env bash
# Delete a TPU VM, or its queued resource together with the VM.
set -euo pipefail

SCRIPT_SUMMARY="Delete the TPU VM (gcloud compute tpus tpu-vm delete), or with --queued the queued
resource and its VM (gcloud compute tpus queued-resources delete --force). Asks for confirmation
unless --yes. Checkpoints in the gs:// workdir are kept."
ACCEPTED_FLAGS="--name --zone --project --queued --yes"
REQUIRED_FLAGS="--name --zone"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
scope_flags

if [[ $QUEUED == 1 ]]; then
  what="queued resource $TPU_NAME and its TPU VM"
  command=(gcloud compute tpus queued-resources delete "$TPU_NAME" "${SCOPE_FLAGS[@]}"
    --force --quiet)
else
  what="TPU VM $TPU_NAME"
  command=(gcloud compute tpus tpu-vm delete "$TPU_NAME" "${SCOPE_FLAGS[@]}" --quiet)
fi

if [[ $DRY_RUN != 1 && $YES != 1 ]]; then
  answer=""
  read -r -p "Delete $what in $ZONE? [y/N] " answer || true
  [[ $answer == [yY] || $answer == [yY][eE][sS] ]] || die "not deleted"
fi
run "${command[@]}"
