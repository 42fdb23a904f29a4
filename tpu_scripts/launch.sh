#!/usr/bin/env bash
# Start a cpe-jax run on every worker of a TPU VM slice, detached, one log file per worker.
set -euo pipefail

SCRIPT_SUMMARY="Run \`cpe-jax train --config=CONFIG --workdir=gs://...\` on every worker
with nohup, detached from the ssh session. Each worker appends its output to
~/cpe_jax_logs/train.log and keeps the process id in ~/cpe_jax_logs/train.pid for stop.sh.
Arguments after -- go to cpe-jax unchanged, e.g. -- --config.seed=1. The config path is
relative to ~/cpe_jax, where setup.sh puts the code. After a preemption, recreate the TPU,
run setup.sh and launch.sh again with the same workdir: training resumes from its checkpoint."
ACCEPTED_FLAGS="--name --zone --project --config --workdir --subcommand --log-dir"
REQUIRED_FLAGS="--name --zone --config --workdir"
PASSTHROUGH=1
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
[[ $WORKDIR == gs://?* ]] ||
  die_usage "--workdir must be a gs:// path that every worker can reach, got '$WORKDIR'"
scope_flags

log=$(remote_path "$LOG_DIR/train.log")
pid_file=$(remote_path "$LOG_DIR/train.pid")
train=$(remote_command_line cpe-jax "$SUBCOMMAND" "--config=$CONFIG" "--workdir=$WORKDIR" \
  "${EXTRA_ARGS[@]}")
# shellcheck disable=SC2016  # these expand on the worker
remote=(
  "set -e; cd; mkdir -p $(remote_path "$LOG_DIR");"
  "if [ -f $pid_file ] && kill -0 \"\$(cat $pid_file)\" 2>/dev/null; then"
  'echo "$(hostname): a run is still going (pid $(cat '"$pid_file"')); stop it with stop.sh" >&2;'
  'exit 1; fi;'
  'cd cpe_jax 2>/dev/null || true; export PATH="$HOME/.local/bin:$PATH";'
  "date -u \"+=== %FT%TZ launch:\" >> $log; echo $(remote_quote "$train") >> $log;"
  "setsid nohup $train >> $log 2>&1 < /dev/null &"
  "echo \$! > $pid_file;"
  'echo "$(hostname): started pid $!"'
)
ssh_workers all "${remote[*]}"
