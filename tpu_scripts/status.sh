#!/usr/bin/env bash
# Show the state of a TPU VM and its queued resource, and the tail of every worker's log.
set -euo pipefail

SCRIPT_SUMMARY="Describe the TPU VM (and the queued resource with --queued). With
--logs, print whether the run is alive on each worker and the last --lines of its log, each
line prefixed with the worker's hostname; --follow keeps streaming."
ACCEPTED_FLAGS="--name --zone --project --queued --logs --follow --lines --worker --log-dir"
REQUIRED_FLAGS="--name --zone"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
[[ $TAIL_LINES =~ ^[0-9]+$ ]] || die_usage "--lines must be a whole number, got '$TAIL_LINES'"
[[ $WORKER =~ ^(all|[0-9]+(,[0-9]+)*)$ ]] ||
  die_usage "--worker must be all or worker numbers like 0 or 0,3, got '$WORKER'"
scope_flags

if [[ $QUEUED == 1 ]]; then
  run gcloud compute tpus queued-resources describe "$TPU_NAME" "${SCOPE_FLAGS[@]}"
  # The VM only exists once the request is ACTIVE.
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${SCOPE_FLAGS[@]}" ||
    echo "$SCRIPT_NAME: no TPU VM $TPU_NAME yet (the queued resource is not ACTIVE)" >&2
else
  run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${SCOPE_FLAGS[@]}"
fi

if [[ $LOGS == 1 ]]; then
  log=$(remote_path "$LOG_DIR/train.log")
  pid_file=$(remote_path "$LOG_DIR/train.pid")
  tail_flags="-n $TAIL_LINES"
  if [[ $FOLLOW == 1 ]]; then tail_flags+=" -F"; fi
  # shellcheck disable=SC2016  # these expand on the worker
  remote=(
    'host=$(hostname);'
    "if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null;"
    "then echo \"[\$host] running, pid \$(cat $pid_file)\"; else echo \"[\$host] not running\"; fi;"
    "tail $tail_flags $log 2>&1 | sed -u \"s/^/[\$host] /\""
  )
  ssh_workers "$WORKER" "${remote[*]}"
fi
