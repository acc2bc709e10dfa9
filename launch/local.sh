#!/usr/bin/env bash
# Train on this machine: install rf_jax if needed, then run the trainer.
#
#   bash launch/local.sh [CONFIG] [WORKDIR] [--config.field=value ...]
#
# CONFIG defaults to experiments/quickstart.py and WORKDIR to
# workdirs/<config name>. Extra arguments go to rf_jax.train unchanged.
# Set FAKE_DEVICES=8 to simulate an 8-device mesh on the CPU.
set -euo pipefail

cd "$(dirname "$0")/.."
config=${1:-experiments/quickstart.py}
name=$(basename "${config%%:*}" .py)
workdir=${2:-workdirs/${name}}
shift $(( $# > 2 ? 2 : $# ))

if [[ ! -f "${config%%:*}" ]]; then
  echo "Config file ${config%%:*} not found; pass a file under experiments/." >&2
  exit 2
fi
if ! python -c "import rf_jax" 2>/dev/null; then
  python -m pip install -e .
fi
if [[ -n "${FAKE_DEVICES:-}" ]]; then
  export XLA_FLAGS="--xla_force_host_platform_device_count=${FAKE_DEVICES} ${XLA_FLAGS:-}"
fi
exec python -m rf_jax.train --config "${config}" --workdir "${workdir}" "$@"
