# Seventh run, call 1 (4 GPUs): warps and stages of mamba-ssm's SSD kernels tuned for the nested
# models' calls (scripts/gpu_ssd_tune.py), then the graphed joint step with the tuned table pinned and
# without; the full 1.4b benchmark with the autotuning cleared per model (never completed before);
# the GPU tests not re-run since partial_sums.sum_rows.
# Ran at commit f83163c.
source scripts/gpu_install.sh
for i in 0 1 2 3; do mkdir -p /tmp/o$i; done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > /tmp/o0/gpu.txt
S=scripts/gpu_chunk_sweep.sh; P=LIT_MATMAMBA_SSD_CONFIGS
(export CUDA_VISIBLE_DEVICES=0 OUT=/tmp/o0 SWEEP_TIMEOUT=120
 timeout 330 python3 scripts/gpu_ssd_tune.py --preset lm-130m --batch 16 --out /tmp/o0/ssd-tune-130m.json > /tmp/o0/ssd-tune-130m.log 2>&1
 if [ -s /tmp/o0/ssd-tune-130m.table.json ]; then env $P=/tmp/o0/ssd-tune-130m.table.json bash $S lm-130m 16 128; bash $S lm-130m 16 128
   env $P=/tmp/o0/ssd-tune-130m.table.json bash $S lm-130m 16 128; fi) > /tmp/o0/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=1 OUT=/tmp/o1 SWEEP_TIMEOUT=160
 timeout 380 python3 scripts/gpu_ssd_tune.py --preset lm-1.4b --batch 8 --out /tmp/o1/ssd-tune-1.4b.json > /tmp/o1/ssd-tune-1.4b.log 2>&1
 if [ -s /tmp/o1/ssd-tune-1.4b.table.json ]; then env $P=/tmp/o1/ssd-tune-1.4b.table.json bash $S lm-1.4b 8 128; fi) > /tmp/o1/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=2; timeout 560 python3 scripts/gpu_bench.py --seq 1024 --reps 5 --preset lm-1.4b --batch 8 \
   --out /tmp/o2/bench-lm-1.4b.json > /tmp/o2/bench-lm-1.4b.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=3; T="timeout --signal=INT"; Q="python3 -m pytest -q -p no:cacheprovider"
 $T 250 $Q tests/test_gpu_path.py > /tmp/o3/pytest-gpu-path.log 2>&1
 $T 120 $Q tests/test_graphs.py tests/test_nested_linear.py > /tmp/o3/pytest-graphs-nested-linear.log 2>&1
 $T 150 $Q tests/test_ssd_fused.py -k bf16 > /tmp/o3/pytest-ssd-fused-bf16.log 2>&1) &
# Whatever is still running at 570 s is stopped, so that what finished comes back.
for t in $(seq 57); do [ -z "$(jobs -r)" ] && break; sleep 10; done; pkill -f "python3 scripts/gpu_" 2>/dev/null; pkill -f "python3 -m pytest" 2>/dev/null
tail -n 3 /tmp/o3/pytest-*.log; grep -h "predicted\|->" /tmp/o*/ssd-tune-*.log | tail -40; grep -A14 "^== " /tmp/o2/bench-*.log
cat /tmp/o*/chunk-sweep.jsonl 2>/dev/null | python3 -c "import sys,json;[print(d['preset'],d['env'],round(d['joint']['graph']['ms'],1),round(d['wall_s'])) for d in map(json.loads,sys.stdin)]"
tar czf $OUT/all.tgz -C /tmp o0 o1 o2 o3
