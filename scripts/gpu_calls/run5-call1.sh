python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for i in 0 1 2 3; do mkdir -p /tmp/o$i; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > /tmp/o0/gpu.txt
(export CUDA_VISIBLE_DEVICES=0 OUT=/tmp/o0; S=scripts/gpu_chunk_sweep.sh; bash $S lm-1.4b 8 128; LIT_MATMAMBA_FUSED_DDA=1 bash $S lm-1.4b 8 128; bash $S lm-130m 16 128; LIT_MATMAMBA_FUSED_DDA=1 bash $S lm-130m 16 128) > /tmp/o0/dda-ab.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=1; timeout 540 python3 -m pytest -q -p no:cacheprovider tests/test_ssd_fused.py -k "fp32 or dcb_dda or backend or missing") > /tmp/o1/pytest-ssd-fused-fp32.log 2>&1 &
(export CUDA_VISIBLE_DEVICES=2; timeout 400 python3 -m pytest -q -p no:cacheprovider tests/test_ssd_fused.py -k bf16 > /tmp/o2/pytest-ssd-fused-bf16.log 2>&1; timeout 150 python3 scripts/gpu_memory_check.py --preset lm-130m --batch 16 --out /tmp/o2/memory-lm-130m.json > /tmp/o2/memory-130m.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=3; timeout 280 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py > /tmp/o3/pytest-gpu-path.log 2>&1; timeout 260 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_add_rmsnorm.py tests/test_cross_entropy.py > /tmp/o3/pytest-kernels-addnorm-ce.log 2>&1) &
wait; tail -n 3 /tmp/o*/*.log; cat /tmp/o0/chunk-sweep.jsonl | python3 -c "import sys,json;[print(d['preset'],d['env'],d['joint']['graph']['ms']) for d in map(json.loads,sys.stdin)]"
tar czf $OUT/all.tgz -C /tmp o0 o1 o2 o3
