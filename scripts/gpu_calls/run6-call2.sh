# Sixth run, call 2 (4 GPUs): the gated-norm backward's variants and the partial-sum kernel alone
# (scripts/gpu_norm_sweep.py) and their GPU tests; the graphed joint step with each backward variant
# (LIT_MATMAMBA_NORM_BWD), in both orders at 1.4b and at 130m.
# Ran at commit d6a9cdb; LIT_MATMAMBA_NORM_BWD and the variants were removed after it.
source scripts/gpu_install.sh
for i in 0 1 2 3; do mkdir -p /tmp/o$i; done
S=scripts/gpu_chunk_sweep.sh; export SWEEP_TIMEOUT=200; V=LIT_MATMAMBA_NORM_BWD
(export CUDA_VISIBLE_DEVICES=0 OUT=/tmp/o0; timeout 100 python3 scripts/gpu_norm_sweep.py --out /tmp/o0/norm-sweep.json > /tmp/o0/norm-sweep.log 2>&1
 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "gated or sum_rows" > /tmp/o0/pytest-norm.log 2>&1
 for v in rows-stages3-fill rows-stages3 rows; do env $V=$v bash $S lm-130m 16 128; done) > /tmp/o0/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=1 OUT=/tmp/o1; for v in rows rows-stages3 rows-stages3-fill; do env $V=$v bash $S lm-1.4b 8 128; done) > /tmp/o1/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=2 OUT=/tmp/o2; for v in rows-stages3-fill rows-stages3 rows; do env $V=$v bash $S lm-1.4b 8 128; done) > /tmp/o2/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=3 OUT=/tmp/o3; for v in rows rows-stages3 rows-stages3-fill; do env $V=$v bash $S lm-130m 16 128; done
 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_add_rmsnorm.py > /tmp/o3/pytest-add-rmsnorm.log 2>&1) > /tmp/o3/ab.log 2>&1 &
# Whatever is still running at 530 s is stopped, so that what finished comes back.
for t in $(seq 53); do [ -z "$(jobs -r)" ] && break; sleep 10; done; pkill -f "python3 scripts/gpu_" 2>/dev/null; pkill -f "python3 -m pytest" 2>/dev/null
tail -n 40 /tmp/o0/norm-sweep.log; tail -n 3 /tmp/o*/pytest*.log
cat /tmp/o*/chunk-sweep.jsonl | python3 -c "import sys,json;[print(d['preset'],d['env'],round(d['joint']['graph']['ms'],1)) for d in map(json.loads,sys.stdin)]"
tar czf $OUT/all.tgz -C /tmp o0 o1 o2 o3
