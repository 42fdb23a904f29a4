#!/usr/bin/env bash
# Create a TPU VM slice, directly or through a queued resource (recommended for large slices).
set -euo pipefail

SCRIPT_SUMMARY="Create a TPU VM (gcloud compute tpus tpu-vm create) or request one as a
queued resource (gcloud compute tpus queued-resources create). Extra args after -- go to
gcloud unchanged, e.g. -- --network=my-net --subnetwork=my-subnet."
ACCEPTED_FLAGS="--name --zone --project --accelerator-type --runtime-version
  --queued --spot --preemptible"
REQUIRED_FLAGS="--name --zone --accelerator-type"
PASSTHROUGH=1
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# The TPU software version Cloud TPU recommends for JAX on each generation.
default_runtime_version() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

parse_args "$@"

[[ $ACCELERATOR_TYPE =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] ||
  die_usage "--accelerator-type '$ACCELERATOR_TYPE' is not like v5p-64, v4-32 or v5litepod-16"
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION=$(default_runtime_version "$ACCELERATOR_TYPE") ||
    die_usage "no default runtime version for $ACCELERATOR_TYPE; pass --runtime-version"
fi
if [[ $SPOT == 1 && $PREEMPTIBLE == 1 ]]; then
  die_usage "--spot and --preemptible exclude each other"
fi
if [[ $QUEUED == 1 && $PREEMPTIBLE == 1 ]]; then
  die_usage "queued resources have no --preemptible; use --spot"
fi
scope_flags

if [[ $QUEUED == 1 ]]; then
  command=(gcloud compute tpus queued-resources create "$TPU_NAME" "--node-id=$TPU_NAME"
    "${SCOPE_FLAGS[@]}" "--accelerator-type=$ACCELERATOR_TYPE" "--runtime-version=$RUNTIME_VERSION")
else
  command=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${SCOPE_FLAGS[@]}"
    "--accelerator-type=$ACCELERATOR_TYPE" "--version=$RUNTIME_VERSION")
fi
if [[ $SPOT == 1 ]]; then command+=(--spot); fi
if [[ $PREEMPTIBLE == 1 ]]; then command+=(--preemptible); fi
run "${command[@]}" "${EXTRA_ARGS[@]}"

if [[ $QUEUED == 1 && $DRY_RUN != 1 ]]; then
  echo "Requested. The VM exists once the request is ACTIVE; watch it with:" >&2
  echo "  $(dirname "$0")/status.sh --queued --name=$TPU_NAME --zone=$ZONE" >&2
fi
