# Sixth run, call 3 (2 GPUs, nothing else on the host while the benchmarks run): both benchmarks with
# this session's defaults (partial_sums.sum_rows for the norms' weight gradients), then the memory
# checks (a single width measured with the joint step's own code) and the conv GPU tests.
# Ran at commit 0eaf7b8.
source scripts/gpu_install.sh
mkdir -p /tmp/o0 /tmp/o1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > /tmp/o0/gpu.txt
B="python3 scripts/gpu_bench.py --seq 1024 --reps 10"
(export CUDA_VISIBLE_DEVICES=0; timeout 360 $B --preset lm-1.4b --batch 8 --out /tmp/o0/bench-lm-1.4b.json > /tmp/o0/bench-lm-1.4b.log 2>&1
 timeout 150 python3 scripts/gpu_memory_check.py --preset lm-1.4b --batch 8 --out /tmp/o0/memory-lm-1.4b.json > /tmp/o0/memory-1.4b.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1; timeout 300 $B --preset lm-130m --batch 16 --out /tmp/o1/bench-lm-130m.json > /tmp/o1/bench-lm-130m.log 2>&1
 timeout 110 python3 scripts/gpu_memory_check.py --preset lm-130m --batch 16 --out /tmp/o1/memory-lm-130m.json > /tmp/o1/memory-130m.log 2>&1
 timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k conv > /tmp/o1/pytest-conv.log 2>&1) &
# Whatever is still running at 550 s is stopped, so that what finished comes back.
for t in $(seq 55); do [ -z "$(jobs -r)" ] && break; sleep 10; done; pkill -f "python3 scripts/gpu_" 2>/dev/null; pkill -f "python3 -m pytest" 2>/dev/null
tail -n 2 /tmp/o1/pytest-conv.log /tmp/o*/memory-*.log; grep -A14 "^== " /tmp/o*/bench-*.log
tar czf $OUT/all.tgz -C /tmp o0 o1
