#!/usr/bin/env bash
# Stop the run on every worker: SIGTERM first (the trainer saves a checkpoint), then SIGKILL.
set -euo pipefail

SCRIPT_SUMMARY="Stop the run started by launch.sh on every worker. Each worker sends SIGTERM to the
run's process group (the trainer writes a checkpoint on SIGTERM), waits up to --timeout seconds,
then sends SIGKILL. With --stop-vm the TPU VM is stopped afterwards (not every slice type
supports stop/start; deleting and recreating is the usual way to free a pod)."
ACCEPTED_FLAGS="--name --zone --project --timeout --log-dir --stop-vm"
REQUIRED_FLAGS="--name --zone"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die_usage "--timeout must be whole seconds, got '$TIMEOUT'"
scope_flags

pid_file=$(remote_path "$LOG_DIR/train.pid")
# alive: the pid is a live (not zombie) cpe-jax process, so a recycled pid is never signalled.
# shellcheck disable=SC2016  # these expand on the worker
remote=(
  'host=$(hostname);'
  "if [ ! -f $pid_file ]; then echo \"[\$host] no run to stop\"; exit 0; fi;"
  "pid=\$(cat $pid_file);"
  'alive() { ps -o stat=,args= -p "$pid" | grep -q "^ *[^Z ].*cpe-jax"; };'
  'if alive; then'
  "echo \"[\$host] SIGTERM to pid \$pid, waiting up to $TIMEOUT s for it to save and exit\";"
  'kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid";'
  "waited=0; while alive && [ \$waited -lt $TIMEOUT ]; do sleep 1; waited=\$((waited + 1)); done;"
  "if alive; then echo \"[\$host] still running after $TIMEOUT s, SIGKILL\";"
  'kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid"; else echo "[$host] stopped"; fi;'
  'else echo "[$host] pid $pid is not running"; fi;'
  "rm -f $pid_file"
)
ssh_workers all "${remote[*]}"

if [[ $STOP_VM == 1 ]]; then
  run gcloud compute tpus tpu-vm stop "$TPU_NAME" "${SCOPE_FLAGS[@]}"
fi
