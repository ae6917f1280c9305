# Eighth run, call 3 (1 GPU): the full 1.4b benchmark at the closing code (the pin lookup was
# reworked after the seventh run's benchmarks), alone on the GPU; then, in the time left, the GPU
# tests of the graphs, nested linears, add + RMSNorm and cross-entropy kernels at this commit.
# Ran at commit 7417c73. The benchmark was stopped by its 430 s limit after the eager joint step
# with autograd's weight gradients (log: call3-bench-lm-1.4b-cut.log); the tests ran.
source scripts/gpu_install.sh
mkdir -p /tmp/o
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > /tmp/o/gpu.txt
timeout 430 python3 scripts/gpu_bench.py --preset lm-1.4b --batch 8 --seq 1024 --reps 5 \
  --out /tmp/o/bench-lm-1.4b.json > /tmp/o/bench-lm-1.4b.log 2>&1
left=$((545 - SECONDS)); T="timeout --signal=INT --kill-after=10 $left"
[ $left -gt 30 ] && $T python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_nested_linear.py \
  tests/test_add_rmsnorm.py tests/test_cross_entropy.py > /tmp/o/pytest-graphs-linear-norm-ce.log 2>&1
grep -A14 "^== " /tmp/o/bench-*.log; tail -n 3 /tmp/o/pytest-*.log
tar czf $OUT/all.tgz -C /tmp o
