#!/usr/bin/env bash
# Throughput of asa against the PyTorch reference, same config, device and threads, same run.
#
#   scripts/compare_reference.sh REF_DIR [DEVICE] [CONFIG...]
#
# REF_DIR: a checkout of github.com/digitaldaimyo/ASA (its package under REF_DIR/src/asa).
# DEVICE: cpu (default) or cuda. CONFIG: bench presets (default: cpu-small on cpu, practice-run
# on cuda). Environment: ASA (the asa binary; default target/release/asa), PYTHON (a Python with
# PyTorch; default python3), THREADS (CPU threads on both sides; default: all), WARMUP (2),
# ITERS (5). Prints asa's table per config; exits non-zero on the first failure.
set -euo pipefail
ref=${1:?usage: $0 REF_DIR [cpu|cuda] [CONFIG...]}
device=${2:-cpu}
shift $(( $# >= 2 ? 2 : 1 ))
if [ $# -eq 0 ]; then
  if [ "$device" = cuda ]; then set -- practice-run; else set -- cpu-small; fi
fi
asa=${ASA:-target/release/asa}
threads=()
if [ -n "${THREADS:-}" ]; then threads=(--threads "$THREADS"); fi
for cfg in "$@"; do
  "$asa" bench --config "$cfg" --device "$device" --reference "$ref" \
    --python "${PYTHON:-python3}" --warmup "${WARMUP:-2}" --iters "${ITERS:-5}" "${threads[@]}"
done
