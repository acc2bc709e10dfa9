#!/usr/bin/env bash
# Train rf_jax on a Cloud TPU VM pod slice: create or reuse the VM, copy the
# committed code to every worker, install requirements-tpu.txt there and run the
# trainer on all workers at once.
#
#   bash launch/tpu_pod.sh --name NAME --zone ZONE --accelerator TYPE \
#       --config experiments/FILE.py --workdir gs://BUCKET/PATH \
#       [--project PROJECT] [--version RUNTIME] [--dry-run] [-- TRAIN_ARGS...]
#
# --dry-run prints every gcloud command instead of running it. Arguments after
# "--" go to rf_jax.train unchanged (e.g. --config.train.steps=1000). The code
# sent is the last commit (git archive HEAD): commit local edits first.

set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

fail() {
  echo "tpu_pod.sh: $1" >&2
  exit 2
}

name="" zone="" accelerator="" config="" workdir="" project="" dry_run=0
version="tpu-ubuntu2204-base"
train_args=()
# Print the value of option $1, or fail when it is missing or is another option.
value_of() {
  if [[ $# -lt 2 || -z "$2" || "$2" == --* ]]; then
    fail "option $1 needs a value; run with --help for the usage."
  fi
  echo "$2"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$(value_of "$@"); shift 2 ;;
    --zone) zone=$(value_of "$@"); shift 2 ;;
    --accelerator) accelerator=$(value_of "$@"); shift 2 ;;
    --config) config=$(value_of "$@"); shift 2 ;;
    --workdir) workdir=$(value_of "$@"); shift 2 ;;
    --project) project=$(value_of "$@"); shift 2 ;;
    --version) version=$(value_of "$@"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; train_args=("$@"); break ;;
    *) fail "unknown argument '$1'; run with --help for the usage." ;;
  esac
done

for pair in "name:$name" "zone:$zone" "accelerator:$accelerator" "config:$config" "workdir:$workdir"; do
  [[ -n "${pair#*:}" ]] || fail "missing --${pair%%:*}; run with --help for the usage."
done
cd "$(dirname "$0")/.."
[[ -f "${config%%:*}" ]] || fail "config file '${config%%:*}' not found (give a path inside this checkout)."
if [[ "$workdir" != gs://* ]]; then
  fail "--workdir must be a Cloud Storage path (gs://BUCKET/PATH) that every worker can reach, got '$workdir'."
fi
if [[ $dry_run -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  fail "gcloud not found on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk) or use --dry-run."
fi

common=(--zone "$zone")
[[ -n "$project" ]] && common+=(--project "$project")

run() {
  if [[ $dry_run -eq 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

# Create the VM unless it exists.
if [[ $dry_run -eq 1 ]]; then
  echo "# The VM is created only if this describe command fails:"
  run gcloud compute tpus tpu-vm describe "$name" "${common[@]}"
  run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$accelerator" --version "$version"
elif gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1; then
  echo "Reusing TPU VM $name in $zone."
else
  echo "Creating TPU VM $name ($accelerator) in $zone."
  run gcloud compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$accelerator" --version "$version"
fi

# Copy the code (the last commit) and install it on every worker.
if [[ $dry_run -eq 1 ]]; then
  archive=/tmp/rf_jax.tar.gz
else
  archive=$(mktemp -d)/rf_jax.tar.gz
fi
run git archive --format=tar.gz -o "$archive" HEAD
run gcloud compute tpus tpu-vm scp "$archive" "$name:~/rf_jax.tar.gz" "${common[@]}" --worker=all
install="rm -rf ~/rf_jax && mkdir -p ~/rf_jax && tar xzf ~/rf_jax.tar.gz -C ~/rf_jax && cd ~/rf_jax && python3 -m pip install -q -r requirements-tpu.txt && python3 -m pip install -q -e . --no-deps"
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$install"

# Train on all workers; each one joins jax.distributed and reads its own data shard.
train="cd ~/rf_jax && python3 -m rf_jax.train --config $(printf '%q' "$config") --workdir $(printf '%q' "$workdir") --distributed"
for arg in "${train_args[@]}"; do
  train+=" $(printf '%q' "$arg")"
done
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command "$train"
