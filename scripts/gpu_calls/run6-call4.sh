# Sixth run, call 4 (4 GPUs): both benchmarks (mamba-ssm's autotuning cleared before each model,
# and per width in the nested model: LIT_MATMAMBA_TUNE_PER_WIDTH's default), and the graphed joint
# step alone with per-width tuning off and on (A/B, both orders at 130m).
# Ran at commit d53e03a; LIT_MATMAMBA_TUNE_PER_WIDTH and per-width tuning were removed after it.
source scripts/gpu_install.sh
for i in 0 1 2 3; do mkdir -p /tmp/o$i; done
B="python3 scripts/gpu_bench.py --seq 1024 --reps 5"; S=scripts/gpu_chunk_sweep.sh; export SWEEP_TIMEOUT=220; T=LIT_MATMAMBA_TUNE_PER_WIDTH
(export CUDA_VISIBLE_DEVICES=0; timeout 430 $B --preset lm-1.4b --batch 8 --out /tmp/o0/bench-lm-1.4b.json > /tmp/o0/bench-lm-1.4b.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1; timeout 430 $B --preset lm-130m --batch 16 --out /tmp/o1/bench-lm-130m.json > /tmp/o1/bench-lm-130m.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=2 OUT=/tmp/o2; env $T=0 bash $S lm-1.4b 8 128; env $T=1 bash $S lm-1.4b 8 128) > /tmp/o2/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=3 OUT=/tmp/o3; for t in 0 1 1 0; do env $T=$t bash $S lm-130m 16 128; done) > /tmp/o3/ab.log 2>&1 &
# Whatever is still running at 440 s is stopped, so that what finished comes back.
for t in $(seq 44); do [ -z "$(jobs -r)" ] && break; sleep 10; done; pkill -f "python3 scripts/gpu_" 2>/dev/null
grep -A14 "^== " /tmp/o*/bench-*.log
cat /tmp/o*/chunk-sweep.jsonl | python3 -c "import sys,json;[print(d['preset'],d['env'],round(d['joint']['graph']['ms'],1),round(d['wall_s'])) for d in map(json.loads,sys.stdin)]"
tar czf $OUT/all.tgz -C /tmp o0 o1 o2 o3
