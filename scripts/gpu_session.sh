#!/usr/bin/env bash
# One GPU-machine session (see shared/docs/gpu.md): install the project and the carried mamba-ssm
# wheel (.whl/, built with MAMBA_SKIP_CUDA_BUILD), run the GPU tests, the kernel check and the
# benchmark and the profile. Everything lands in $OUT.
# Usage: bash scripts/gpu_session.sh [tests] [kernels] [bench:PRESET:BATCH ...] [profile:PRESET:BATCH ...]
#        [memory:PRESET:BATCH ...]
# Several sessions can share a multi-GPU machine: CUDA_VISIBLE_DEVICES, OUT and NO_INSTALL=1 apart.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# NO_INSTALL=1: a concurrent session on the same machine installed already (one GPU each).
if [ -z "${NO_INSTALL:-}" ]; then
  source scripts/gpu_install.sh || exit 1
fi
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
for step in "$@"; do
  case "$step" in
    tests) timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/test_kernels.py tests/test_add_rmsnorm.py tests/test_gpu_path.py tests/test_ssd_fused.py tests/test_cross_entropy.py} 2>&1 | tee "$OUT/pytest-gpu.log" | tail -25 ;;
    kernels) timeout "${KERNELS_TIMEOUT:-300}" python3 scripts/gpu_kernel_check.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    bench:*) IFS=: read -r _ preset batch <<< "$step"
      timeout "${BENCH_TIMEOUT:-420}" python3 scripts/gpu_bench.py --preset "$preset" --batch "$batch" --seq 1024 --reps "${REPS:-10}" --out "$OUT/bench-$preset.json" 2>&1 | tee "$OUT/bench-$preset.log" | tail -25 ;;
    profile:*) IFS=: read -r _ preset batch <<< "$step"
      timeout "${PROFILE_TIMEOUT:-150}" python3 scripts/gpu_profile.py --preset "$preset" --batch "$batch" --glue --out "$OUT/profile-$preset.txt" 2>&1 | tail -3 ;;
    memory:*) IFS=: read -r _ preset batch <<< "$step"
      timeout "${MEMORY_TIMEOUT:-200}" python3 scripts/gpu_memory_check.py --preset "$preset" --batch "$batch" --out "$OUT/memory-$preset.json" 2>&1 | tail -2 ;;
  esac
done
