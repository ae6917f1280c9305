# Fifth run, call 2 (4 GPUs): conv-backward variants, the GPU tests of this session's code, both
# benchmarks (new: stock with bf16 weights, frozen-weight graphs), the one-pass dCB/ddA A/B at 1.4b.
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for i in 0 1 2 3; do mkdir -p /tmp/o$i; done
(export CUDA_VISIBLE_DEVICES=0; timeout 300 python3 scripts/gpu_conv_bwd_sweep.py --out /tmp/o0/conv-bwd-sweep.json > /tmp/o0/conv-bwd-sweep.log 2>&1; timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k conv > /tmp/o0/pytest-conv.log 2>&1; for p in lm-130m:16 lm-1.4b:8; do timeout 170 python3 scripts/gpu_memory_check.py --preset ${p%:*} --batch ${p#*:} --out /tmp/o0/memory-${p%:*}.json > /tmp/o0/memory-${p%:*}.log 2>&1; done) &
(export CUDA_VISIBLE_DEVICES=1; timeout 520 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py tests/test_nested_linear.py tests/test_graphs.py > /tmp/o1/pytest-gpu-path.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=2 OUT=/tmp/o2 BENCH_TIMEOUT=390 NO_INSTALL=1; bash scripts/gpu_session.sh bench:lm-1.4b:8 > /dev/null 2>&1; LIT_MATMAMBA_FUSED_DDA=1 SWEEP_TIMEOUT=150 bash scripts/gpu_chunk_sweep.sh lm-1.4b 8 128 > /tmp/o2/dda.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=3 OUT=/tmp/o3 BENCH_TIMEOUT=300 NO_INSTALL=1; bash scripts/gpu_session.sh bench:lm-130m:16 > /dev/null 2>&1; timeout 240 python3 scripts/gpu_ssd_config_check.py --rounds 1 --shape 1,16,2,8,1,16,16 > /tmp/o3/ssd-configs.log 2>&1) &
wait; tail -n 4 /tmp/o0/*.log /tmp/o1/*.log /tmp/o3/ssd-configs.log /tmp/o2/dda.log; grep -A12 "^== " /tmp/o2/bench-lm-1.4b.log /tmp/o3/bench-lm-130m.log
tar czf $OUT/all.tgz -C /tmp o0 o1 o2 o3
