# Seventh run, call 3 (4 GPUs): both benchmarks with the tuned SSD table for the H200
# (kernels/ssd/tuned_configs.py, pinned by default); block sizes x warps x stages explored at lm-130m
# for the five backward kernels the warps/stages tuning left alone, then the graphed joint step with
# the shipped table plus what that found, against the shipped table alone; the GPU tests of the
# pinned configurations and those calls 1 and 2 did not reach.
# Ran at commit 96e6229.
source scripts/gpu_install.sh
for i in 0 1 2 3; do mkdir -p /tmp/o$i; done
B="python3 scripts/gpu_bench.py --seq 1024 --reps 5"; S=scripts/gpu_chunk_sweep.sh; P=LIT_MATMAMBA_SSD_CONFIGS
K=_chunk_scan_bwd_ddAcs_stable_kernel,_chunk_scan_bwd_dcb_kernel,_chunk_state_bwd_db_kernel,_chunk_scan_bwd_dc_kernel,_chunk_scan_bwd_dstates_kernel
(export CUDA_VISIBLE_DEVICES=0; timeout 540 $B --preset lm-1.4b --batch 8 --out /tmp/o0/bench-lm-1.4b.json > /tmp/o0/bench-lm-1.4b.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1; timeout 540 $B --preset lm-130m --batch 16 --out /tmp/o1/bench-lm-130m.json > /tmp/o1/bench-lm-130m.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=2 OUT=/tmp/o2 SWEEP_TIMEOUT=90
 timeout 340 python3 scripts/gpu_ssd_tune.py --preset lm-130m --batch 16 --widths full --all-blocks --warps 2,4 --stages 1,2,3 \
   --kernels $K --out /tmp/o2/ssd-explore-130m.json > /tmp/o2/ssd-explore-130m.log 2>&1
 python3 -c "
import json, sys
from lit_matmamba.kernels.ssd.tuned_configs import TABLES
table = {k: list(v) for k, v in TABLES['NVIDIA H200'].items()}
for k, v in json.load(open('/tmp/o2/ssd-explore-130m.table.json')).items(): table.setdefault(k, []).extend(v)
json.dump(table, open('/tmp/o2/merged.json', 'w'), indent=1)" && {
 env $P=/tmp/o2/merged.json bash $S lm-130m 16 128; bash $S lm-130m 16 128; env $P=/tmp/o2/merged.json bash $S lm-130m 16 128; }) > /tmp/o2/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=3; timeout --signal=INT 530 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py \
   -k "tuned or lightning or direct_weight" > /tmp/o3/pytest-gpu-path-tuned.log 2>&1) &
# Whatever is still running at 555 s is stopped, so that what finished comes back.
for t in $(seq 111); do [ -z "$(jobs -r)" ] && break; sleep 5; done; pkill -f "python3 scripts/gpu_" 2>/dev/null; pkill -f "python3 -m pytest" 2>/dev/null
tail -n 3 /tmp/o3/pytest-*.log; grep -h "predicted" /tmp/o2/ssd-explore-*.log; grep -A14 "^== " /tmp/o[01]/bench-*.log
cat /tmp/o2/chunk-sweep.jsonl 2>/dev/null | python3 -c "import sys,json;[print(d['preset'],d['env'],round(d['joint']['graph']['ms'],1),round(d['wall_s'])) for d in map(json.loads,sys.stdin)]"
tar czf $OUT/all.tgz -C /tmp o0 o1 o2 o3
