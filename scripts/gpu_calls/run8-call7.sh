# Eighth run, call 7 (1 GPU): the kernel tests not yet run on a GPU at the closing code:
# tests/test_kernels.py (conv, sum_rows, gated norm, mamba-ssm compat, pins) and
# tests/test_ssd_fused.py (the fused SSD + gated-norm core, fp32 and bf16), in the device time left.
source scripts/gpu_install.sh
mkdir -p /tmp/o
T="timeout --signal=INT --kill-after=10"
$T $((400 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_ssd_fused.py -rs \
  > /tmp/o/pytest-kernels-ssd-fused.log 2>&1
tail -n 25 /tmp/o/pytest-kernels-ssd-fused.log
tar czf $OUT/all.tgz -C /tmp o
