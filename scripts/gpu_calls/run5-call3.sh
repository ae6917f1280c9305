# Fifth run, call 3 (4 GPUs): the graphed joint step with the conv backward's default vs the
# pipelined variant (LIT_MATMAMBA_CONV_BWD), both orders on two GPUs per preset; the frozen-weight
# graph test; the forced-configuration check of the fused SSD core.
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for i in 0 1 2 3; do mkdir -p /tmp/o$i; done
V=unroll4-stages3; S=scripts/gpu_chunk_sweep.sh; export SWEEP_TIMEOUT=230
(export CUDA_VISIBLE_DEVICES=0 OUT=/tmp/o0; bash $S lm-1.4b 8 128; LIT_MATMAMBA_CONV_BWD=$V bash $S lm-1.4b 8 128) > /tmp/o0/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=1 OUT=/tmp/o1; LIT_MATMAMBA_CONV_BWD=$V bash $S lm-1.4b 8 128; bash $S lm-1.4b 8 128) > /tmp/o1/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=2 OUT=/tmp/o2; bash $S lm-130m 16 128; LIT_MATMAMBA_CONV_BWD=$V bash $S lm-130m 16 128; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py -k graphed_forward > /tmp/o2/pytest-graphed-forward.log 2>&1) > /tmp/o2/ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=3 OUT=/tmp/o3; LIT_MATMAMBA_CONV_BWD=$V bash $S lm-130m 16 128; bash $S lm-130m 16 128; timeout 260 python3 scripts/gpu_ssd_config_check.py --rounds 1 --shape 1,16,2,8,1,16,16 > /tmp/o3/ssd-configs.log 2>&1) > /tmp/o3/ab.log 2>&1 &
wait; tail -n 3 /tmp/o2/pytest-graphed-forward.log /tmp/o3/ssd-configs.log; cat /tmp/o*/chunk-sweep.jsonl | python3 -c "import sys,json;[print(d['preset'],d['env'],round(d['joint']['graph']['ms'],1)) for d in map(json.loads,sys.stdin)]"
tar czf $OUT/all.tgz -C /tmp o0 o1 o2 o3
