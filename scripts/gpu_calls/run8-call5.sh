# Eighth run, call 5 (1 GPU): the full 1.4b benchmark, alone, at the closing code, so that one
# process gives every row of issue 5's targets (calls 3 and 4 ran it in the time left after other
# work and stopped after the eager joint step). The log is packed even if the bench is stopped.
# Ran at commit 30e3f59.
source scripts/gpu_install.sh
mkdir -p /tmp/o
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > /tmp/o/gpu.txt
timeout $((570 - SECONDS)) python3 scripts/gpu_bench.py --preset lm-1.4b --batch 8 --seq 1024 --reps 5 \
  --out /tmp/o/bench-lm-1.4b.json > /tmp/o/bench-lm-1.4b.log 2>&1
echo "bench exit $?" >> /tmp/o/bench-lm-1.4b.log
cat /tmp/o/bench-lm-1.4b.log
tar czf $OUT/all.tgz -C /tmp o
