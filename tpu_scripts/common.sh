# shellcheck shell=bash
# Shared by every tpu_scripts/*.sh: flag table, argument parsing, --dry-run, gcloud scope flags.
#
# A script sets SCRIPT_SUMMARY, ACCEPTED_FLAGS, REQUIRED_FLAGS (and PASSTHROUGH=1 if it takes extra
# arguments after `--`), sources this file and calls `parse_args "$@"`. Every value flag --foo-bar
# fills the variable named in VALUE_FLAGS and defaults to the env var CPE_TPU_<VARIABLE>, so a
# shell session can `export CPE_TPU_NAME=... CPE_TPU_ZONE=...` once and omit those flags.

SCRIPT_NAME=$(basename "$0")
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Value flags -> variable (default: env CPE_TPU_<variable>, else the fallback given here).
# shellcheck disable=SC2034  # the scripts that source this file read these
{
  TPU_NAME=${CPE_TPU_NAME:-}
  ZONE=${CPE_TPU_ZONE:-}
  PROJECT=${CPE_TPU_PROJECT:-}
  ACCELERATOR_TYPE=${CPE_TPU_ACCELERATOR_TYPE:-}
  RUNTIME_VERSION=${CPE_TPU_RUNTIME_VERSION:-}
  REPO_URL=${CPE_TPU_REPO_URL:-}
  REPO_REF=${CPE_TPU_REPO_REF:-}
  REPO_DIR=${CPE_TPU_REPO_DIR:-$REPO_ROOT}
  JAX_SPEC=${CPE_TPU_JAX_SPEC:-jax[tpu]}
  CONFIG=${CPE_TPU_CONFIG:-}
  WORKDIR=${CPE_TPU_WORKDIR:-}
  SUBCOMMAND=${CPE_TPU_SUBCOMMAND:-train}
  LOG_DIR=${CPE_TPU_LOG_DIR:-cpe_jax_logs}
  TAIL_LINES=${CPE_TPU_TAIL_LINES:-50}
  WORKER=${CPE_TPU_WORKER:-all}
  TIMEOUT=${CPE_TPU_TIMEOUT:-120}
  # Switches: 1 when given (or when the env var is 1).
  DRY_RUN=${CPE_TPU_DRY_RUN:-0}
  QUEUED=${CPE_TPU_QUEUED:-0}
  SPOT=${CPE_TPU_SPOT:-0}
  PREEMPTIBLE=${CPE_TPU_PREEMPTIBLE:-0}
  LOGS=${CPE_TPU_LOGS:-0}
  FOLLOW=${CPE_TPU_FOLLOW:-0}
  STOP_VM=${CPE_TPU_STOP_VM:-0}
  YES=${CPE_TPU_YES:-0}
  EXTRA_ARGS=()
}

declare -A VALUE_FLAGS=(
  [--name]=TPU_NAME [--zone]=ZONE [--project]=PROJECT
  [--accelerator-type]=ACCELERATOR_TYPE [--runtime-version]=RUNTIME_VERSION
  [--repo-url]=REPO_URL [--repo-ref]=REPO_REF [--repo-dir]=REPO_DIR [--jax-spec]=JAX_SPEC
  [--config]=CONFIG [--workdir]=WORKDIR [--subcommand]=SUBCOMMAND [--log-dir]=LOG_DIR
  [--lines]=TAIL_LINES [--worker]=WORKER [--timeout]=TIMEOUT
)
declare -A SWITCH_FLAGS=(
  [--dry-run]=DRY_RUN [--queued]=QUEUED [--spot]=SPOT [--preemptible]=PREEMPTIBLE
  [--logs]=LOGS [--follow]=FOLLOW [--stop-vm]=STOP_VM [--yes]=YES
)
declare -A FLAG_HELP=(
  [--name]="TPU VM name (also the queued-resource id with --queued)"
  [--zone]="zone, e.g. us-east5-a"
  [--project]="GCP project (default: gcloud's configured project)"
  [--accelerator-type]="slice type, e.g. v5p-64, v4-32, v5litepod-16, v6e-8"
  [--runtime-version]="TPU software version (default: picked from the accelerator generation)"
  [--repo-url]="install from this git URL (cloned on every worker) instead of copying this checkout"
  [--repo-ref]="branch or tag to clone with --repo-url"
  [--repo-dir]="local checkout to copy to the workers (default: this repository)"
  [--jax-spec]="pip requirement for JAX (default: jax[tpu])"
  [--config]="config file for cpe-jax, relative to the repository on the workers"
  [--workdir]="gs:// directory for checkpoints and metrics, shared by all workers"
  [--subcommand]="cpe-jax subcommand to run (default: train)"
  [--log-dir]="log directory on each worker, relative to its home (default: cpe_jax_logs)"
  [--lines]="number of log lines to show per worker (default: 50)"
  [--worker]="worker(s) to read logs from: all, 0, 0,3 (default: all)"
  [--timeout]="seconds to wait after SIGTERM before SIGKILL (default: 120)"
  [--dry-run]="print every command (prefixed with '+ ') and run nothing"
  [--queued]="use a queued resource (gcloud compute tpus queued-resources)"
  [--spot]="Spot TPU: cheaper, preemptible at any time"
  [--preemptible]="preemptible TPU (direct create only; with --queued use --spot)"
  [--logs]="also show the tail of the training log of every worker"
  [--follow]="with --logs: keep streaming the logs (Ctrl-C to stop)"
  [--stop-vm]="after the processes exit, also stop the TPU VM (gcloud compute tpus tpu-vm stop)"
  [--yes]="do not ask for confirmation"
)

# True if $1 is one of the whitespace-separated words of $2.
in_words() {
  local word
  for word in $2; do
    if [[ $word == "$1" ]]; then return 0; fi
  done
  return 1
}

# The environment variable that gives a flag's variable its default.
env_name() {
  echo "CPE_TPU_${1#TPU_}"
}

usage() {
  local flag
  echo "usage: $SCRIPT_NAME [flags]${PASSTHROUGH:+ [-- extra args]}"
  echo
  echo "$SCRIPT_SUMMARY"
  echo
  echo "flags (env var in brackets; * = required):"
  for flag in $ACCEPTED_FLAGS --dry-run; do
    local var=${VALUE_FLAGS[$flag]:-${SWITCH_FLAGS[$flag]:-}}
    local mark=" "
    if in_words "$flag" "$REQUIRED_FLAGS"; then mark="*"; fi
    printf '  %s %-20s %s [%s]\n' "$mark" "$flag" "${FLAG_HELP[$flag]}" "$(env_name "$var")"
  done
  printf '    %-20s %s\n' "--help" "show this help"
  if [[ -n ${USAGE_NOTES:-} ]]; then
    echo
    echo "$USAGE_NOTES"
  fi
}

# One line on stderr, exit 2: the user's invocation is wrong.
die_usage() {
  echo "$SCRIPT_NAME: $*" >&2
  exit 2
}

die() {
  echo "$SCRIPT_NAME: $*" >&2
  exit 1
}

parse_args() {
  while (($#)); do
    local flag=$1 value="" inline=0
    if [[ $flag == --*=* ]]; then
      value=${flag#*=}
      flag=${flag%%=*}
      inline=1
    fi
    case $flag in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        [[ -n ${PASSTHROUGH:-} ]] || die_usage "this script takes no arguments after --"
        shift
        # shellcheck disable=SC2034  # read by the scripts that take extra args
        EXTRA_ARGS=("$@")
        break
        ;;
    esac
    if [[ $flag != --* ]]; then
      die_usage "unexpected argument '$flag'; see $SCRIPT_NAME --help"
    fi
    if ! in_words "$flag" "$ACCEPTED_FLAGS --dry-run"; then
      die_usage "unknown flag $flag; see $SCRIPT_NAME --help"
    fi
    if [[ -n ${VALUE_FLAGS[$flag]:-} ]]; then
      if ((!inline)); then
        (($# >= 2)) || die_usage "flag $flag needs a value"
        value=$2
        shift
      fi
      printf -v "${VALUE_FLAGS[$flag]}" '%s' "$value"
    else
      ((!inline)) || die_usage "flag $flag takes no value"
      printf -v "${SWITCH_FLAGS[$flag]}" '%s' 1
    fi
    shift
  done
  local required
  for required in $REQUIRED_FLAGS; do
    local var=${VALUE_FLAGS[$required]}
    [[ -n ${!var} ]] || die_usage "missing required flag $required (or set $(env_name "$var"))"
  done
}

# Quote one word for a POSIX shell only when it needs it, so printed commands stay readable and
# can be pasted back into a shell (Python's shlex.split reads them back exactly).
shell_quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/\'\\\'\'}"
  fi
}

# The quoted command line for "$@", on one line.
command_line() {
  local word out=""
  for word in "$@"; do
    out+="${out:+ }$(shell_quote "$word")"
  done
  printf '%s' "$out"
}

# Every external command goes through run: with --dry-run it is printed on stdout and not run;
# otherwise it is echoed on stderr (like `set -x`) and run.
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$(command_line "$@")"
  else
    printf '+ %s\n' "$(command_line "$@")" >&2
    "$@"
  fi
}

# --zone and --project for every gcloud call.
scope_flags() {
  SCOPE_FLAGS=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then
    SCOPE_FLAGS+=("--project=$PROJECT")
  fi
}

# Quote one word for a remote command with double quotes, so the whole remote command can sit
# inside single quotes when printed and stay readable.
remote_quote() {
  local word=$1
  if [[ -n $word && $word =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$word"
  else
    word=${word//\\/\\\\}
    word=${word//\$/\\\$}
    word=${word//\`/\\\`}
    word=${word//\"/\\\"}
    printf '"%s"' "$word"
  fi
}

# The remote-quoted command line for "$@".
remote_command_line() {
  local word out=""
  for word in "$@"; do
    out+="${out:+ }$(remote_quote "$word")"
  done
  printf '%s' "$out"
}

# A path on a worker, relative to its home unless absolute, as a word for a remote command.
remote_path() {
  local path=${1#\~/}
  if [[ $path == /* ]]; then
    remote_quote "$path"
  else
    local quoted
    quoted=$(remote_quote "$path")
    # shellcheck disable=SC2016  # $HOME expands on the worker, not here
    printf '"$HOME"/%s' "$quoted"
  fi
}

# Run a one-line bash command on the workers of the TPU VM (all of them unless told otherwise).
ssh_workers() {
  local worker=$1 command=$2
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${SCOPE_FLAGS[@]}" "--worker=$worker" \
    "--command=$command"
}
