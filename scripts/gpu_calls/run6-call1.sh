# Sixth run, call 1 (4 GPUs): the gated-norm tile sweep and the GPU kernel tests (all of
# test_kernels.py, conv included, add + RMSNorm, the fused core in bf16); the graphed joint step with
# the tiled gated norm (default) against one row a tile (LIT_MATMAMBA_NORM_TILES=1,1, the kernels
# before tiling), in both orders; the 130m memory check with the default allocator and with
# expandable segments.
# Ran at commit 66046f8; LIT_MATMAMBA_NORM_TILES and the tiled kernels were removed after it.
source scripts/gpu_install.sh
for i in 0 1 2 3; do mkdir -p /tmp/o$i; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/o0/gpu.txt
S=scripts/gpu_chunk_sweep.sh; export SWEEP_TIMEOUT=230; OLD="LIT_MATMAMBA_NORM_TILES=1,1"
(export CUDA_VISIBLE_DEVICES=0 OUT=/tmp/o0; timeout 100 python3 scripts/gpu_norm_sweep.py --out /tmp/o0/norm-sweep.json > /tmp/o0/norm-sweep.log 2>&1
 timeout 180 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_add_rmsnorm.py > /tmp/o0/pytest-kernels-addnorm.log 2>&1
 timeout 160 python3 -m pytest -q -p no:cacheprovider tests/test_ssd_fused.py -k "bf16 and not dda" > /tmp/o0/pytest-ssd-fused-bf16.log 2>&1
 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout 90 python3 scripts/gpu_memory_check.py --preset lm-130m --batch 16 --out /tmp/o0/memory-lm-130m-expandable.json > /tmp/o0/memory-130m-expandable.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1 OUT=/tmp/o1; bash $S lm-1.4b 8 128; env $OLD bash $S lm-1.4b 8 128; env $OLD bash $S lm-130m 16 128) > /tmp/o1/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=2 OUT=/tmp/o2; env $OLD bash $S lm-1.4b 8 128; bash $S lm-1.4b 8 128; bash $S lm-130m 16 128) > /tmp/o2/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=3 OUT=/tmp/o3; bash $S lm-130m 16 128; env $OLD bash $S lm-130m 16 128
 timeout 150 python3 scripts/gpu_memory_check.py --preset lm-130m --batch 16 --out /tmp/o3/memory-lm-130m.json > /tmp/o3/memory-130m.log 2>&1) > /tmp/o3/ab.log 2>&1 &
# Whatever is still running at 540 s is stopped, so that what finished comes back.
for t in $(seq 54); do [ -z "$(jobs -r)" ] && break; sleep 10; done; pkill -f "python3 scripts/gpu_" 2>/dev/null; pkill -f "python3 -m pytest" 2>/dev/null
tail -n 12 /tmp/o0/norm-sweep.log; tail -n 3 /tmp/o0/pytest*.log; tail -n 2 /tmp/o*/memory*.log
cat /tmp/o*/chunk-sweep.jsonl | python3 -c "import sys,json;[print(d['preset'],d['env'],round(d['joint']['graph']['ms'],1)) for d in map(json.loads,sys.stdin)]"
tar czf $OUT/all.tgz -C /tmp o0 o1 o2 o3
