# Eighth run, call 4 (1 GPU): the graphed 1.4b joint step at the closing code, with the tuned table
# and without, then with it again (each recording its first eager step's losses); then the full
# 1.4b benchmark again in the time left (call 3's stopped after its per-width rows; the rows print
# as they finish, so a stopped run still gives a second sample of them). The outputs are packed
# after each step, so a call cut short still brings back what finished.
# Ran at commit cb7009c (the first launch, at be8f78e, never returned: the session restarted).
# The first tuned joint run met its 100 s limit while its kernels compiled on the fresh machine (no
# row); the run without the table and the second tuned run finished; the full benchmark was stopped
# after the eager joint step (call4-bench-lm-1.4b-cut.log).
source scripts/gpu_install.sh
mkdir -p /tmp/o
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > /tmp/o/gpu.txt
pack() { tar czf $OUT/all.tgz -C /tmp o; }
B="python3 scripts/gpu_bench.py --preset lm-1.4b --batch 8 --seq 1024 --reps 5"
timeout 100 $B --joint-only --out /tmp/o/joint-1.4b-tuned.json > /tmp/o/joint-1.4b-tuned.log 2>&1; pack
LIT_MATMAMBA_SSD_CONFIGS=off timeout 100 $B --joint-only --out /tmp/o/joint-1.4b-off.json > /tmp/o/joint-1.4b-off.log 2>&1; pack
timeout 100 $B --joint-only --out /tmp/o/joint-1.4b-tuned2.json > /tmp/o/joint-1.4b-tuned2.log 2>&1; pack
timeout $((555 - SECONDS)) $B --out /tmp/o/bench-lm-1.4b.json > /tmp/o/bench-lm-1.4b.log 2>&1
grep -h "^joint\|ceiling" /tmp/o/joint-*.log; tail -n 12 /tmp/o/bench-lm-1.4b.log
pack
