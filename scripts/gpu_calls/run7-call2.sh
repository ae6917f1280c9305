# Seventh run, call 2 (4 GPUs): SSD warps and stages tuned at the full width only (call 1's tuning of
# every width ran out of time), then the graphed joint step with the table pinned and without; the
# full 130m benchmark with the autotuning cleared per model; the GPU tests call 1 did not reach.
# Ran at commit c46f0bd.
source scripts/gpu_install.sh
for i in 0 1 2 3; do mkdir -p /tmp/o$i; done
S=scripts/gpu_chunk_sweep.sh; P=LIT_MATMAMBA_SSD_CONFIGS; TUNE="python3 scripts/gpu_ssd_tune.py --widths full"
(export CUDA_VISIBLE_DEVICES=0 OUT=/tmp/o0 SWEEP_TIMEOUT=110
 timeout 250 $TUNE --preset lm-130m --batch 16 --out /tmp/o0/ssd-tune-130m.json > /tmp/o0/ssd-tune-130m.log 2>&1
 if [ -s /tmp/o0/ssd-tune-130m.table.json ]; then env $P=/tmp/o0/ssd-tune-130m.table.json bash $S lm-130m 16 128; bash $S lm-130m 16 128
   env $P=/tmp/o0/ssd-tune-130m.table.json bash $S lm-130m 16 128; fi) > /tmp/o0/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=1 OUT=/tmp/o1 SWEEP_TIMEOUT=150
 timeout 260 $TUNE --preset lm-1.4b --batch 8 --out /tmp/o1/ssd-tune-1.4b.json > /tmp/o1/ssd-tune-1.4b.log 2>&1
 if [ -s /tmp/o1/ssd-tune-1.4b.table.json ]; then env $P=/tmp/o1/ssd-tune-1.4b.table.json bash $S lm-1.4b 8 128; bash $S lm-1.4b 8 128; fi) > /tmp/o1/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=2; timeout 560 python3 scripts/gpu_bench.py --seq 1024 --reps 5 --preset lm-130m --batch 16 \
   --out /tmp/o2/bench-lm-130m.json > /tmp/o2/bench-lm-130m.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=3; T="timeout --signal=INT"; Q="python3 -m pytest -q -p no:cacheprovider"
 $T 150 $Q tests/test_gpu_path.py -k "joint_step or lightning or direct_weight" > /tmp/o3/pytest-gpu-path-rest.log 2>&1
 $T 390 $Q tests/test_ssd_fused.py -k "bf16 and not dda and not (gate-then-norm-2x37 or gate-then-norm-1x16)" > /tmp/o3/pytest-ssd-fused-bf16-rest.log 2>&1) &
# Whatever is still running at 570 s is stopped, so that what finished comes back.
for t in $(seq 57); do [ -z "$(jobs -r)" ] && break; sleep 10; done; pkill -f "python3 scripts/gpu_" 2>/dev/null; pkill -f "python3 -m pytest" 2>/dev/null
tail -n 2 /tmp/o3/pytest-*.log; grep -h "predicted" /tmp/o*/ssd-tune-*.log; grep -A14 "^== " /tmp/o2/bench-*.log
cat /tmp/o*/chunk-sweep.jsonl 2>/dev/null | python3 -c "import sys,json;[print(d['preset'],d['env'],round(d['joint']['graph']['ms'],1),round(d['wall_s'])) for d in map(json.loads,sys.stdin)]"
tar czf $OUT/all.tgz -C /tmp o0 o1 o2 o3
