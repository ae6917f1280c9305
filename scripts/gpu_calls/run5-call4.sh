# Fifth run, call 4 (4 GPUs): both benchmarks with this session's defaults (pipelined conv backward,
# direct LM-head gradients), the 1.4b joint-step profile, the conv GPU tests, and the fused-core
# forced-configuration check with fp32 dots in IEEE precision instead of TF32 (TRITON_F32_DEFAULT).
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl; export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1; python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
B="python3 scripts/gpu_bench.py --seq 1024 --reps 5"
(export CUDA_VISIBLE_DEVICES=0; timeout 370 $B --preset lm-1.4b --batch 8 --out $OUT/bench-lm-1.4b.json > $OUT/bench-lm-1.4b.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=1; timeout 370 $B --preset lm-130m --batch 16 --out $OUT/bench-lm-130m.json > $OUT/bench-lm-130m.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=2 TRITON_F32_DEFAULT=ieee; timeout 370 python3 scripts/gpu_ssd_config_check.py --rounds 1 --shape 1,16,2,8,1,16,16 --out /tmp/x.json > $OUT/ssd-configs-ieee.log 2>&1) &
(export CUDA_VISIBLE_DEVICES=3; timeout 170 python3 scripts/gpu_profile.py --preset lm-1.4b --batch 8 --glue --out $OUT/profile-lm-1.4b.txt > /dev/null 2>&1; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k conv > $OUT/pytest-conv.log 2>&1) &
wait; tail -n 2 $OUT/pytest-conv.log $OUT/ssd-configs-ieee.log; grep -A12 "^== " $OUT/bench-*.log
