#!/usr/bin/env bash
# Install JAX for TPU and this package on every worker of a TPU VM slice.
set -euo pipefail

SCRIPT_SUMMARY="Install JAX for TPU and cpe_jax on every worker. By default this checkout is packed,
copied to ~/cpe_jax on each worker (gcloud compute tpus tpu-vm scp --worker=all) and pip-installed;
with --repo-url the workers clone that repository instead. Run it again after changing the code."
ACCEPTED_FLAGS="--name --zone --project --repo-url --repo-ref --repo-dir --jax-spec"
REQUIRED_FLAGS="--name --zone"
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

parse_args "$@"
scope_flags

REMOTE_REPO=cpe_jax
# shellcheck disable=SC2016  # $(hostname) expands on the worker
install=(
  "python3 -m pip install --upgrade $(remote_quote "$JAX_SPEC") &&"
  "python3 -m pip install $(remote_path "$REMOTE_REPO");"
  'python3 -c "import cpe_jax, jax" && echo "cpe_jax ready on $(hostname)"'
)

if [[ -n $REPO_URL ]]; then
  clone=(git clone --depth=1)
  if [[ -n $REPO_REF ]]; then clone+=("--branch=$REPO_REF"); fi
  clone+=("$REPO_URL" "$REMOTE_REPO")
  fetch="$(remote_command_line "${clone[@]}");"
else
  [[ -f $REPO_DIR/setup.py ]] || die_usage "--repo-dir '$REPO_DIR' has no setup.py"
  archive_name=cpe_jax-src-$TPU_NAME.tar.gz
  archive=${TMPDIR:-/tmp}/$archive_name
  run tar -czf "$archive" -C "$REPO_DIR" --exclude=.git --exclude=__pycache__ \
    --exclude=.pytest_cache --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:$archive_name" "${SCOPE_FLAGS[@]}" \
    --worker=all
  run rm -f "$archive"
  fetch="mkdir -p $REMOTE_REPO; tar -xzf $archive_name -C $REMOTE_REPO; rm -f $archive_name;"
fi
ssh_workers all "set -e; cd; rm -rf $REMOTE_REPO; $fetch ${install[*]}"
