#!/usr/bin/env bash
# Graphed joint-step time at several SSD chunk sizes: `gpu_bench.py --joint-only`, one process per
# chunk size. Each result is appended, as one JSON line, to $OUT/chunk-sweep.jsonl.
# Usage: bash scripts/gpu_chunk_sweep.sh PRESET BATCH CHUNK [CHUNK ...]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
preset=$1 batch=$2; shift 2
for chunk in "$@"; do
  tmp=$(mktemp --suffix .json)
  timeout "${SWEEP_TIMEOUT:-150}" python3 scripts/gpu_bench.py --preset "$preset" --batch "$batch" --seq 1024 \
    --reps "${REPS:-5}" --chunk-size "$chunk" --joint-only --out "$tmp" 2>&1 | grep -E "^(joint|bf16)|Error" \
    || echo "$preset chunk $chunk: no result (exit status ${PIPESTATUS[0]})"
  [ -s "$tmp" ] && python3 -c 'import json, sys; print(json.dumps(json.load(open(sys.argv[1]))))' "$tmp" >> "$OUT/chunk-sweep.jsonl"
  rm -f "$tmp"
done
