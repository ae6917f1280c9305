# Seventh run, call 4 (1 GPU, the session's last device seconds): the rewritten test of the pinned
# SSD configurations (pinned against mamba-ssm's own configurations), at three of its eight cases.
# Ran at commit 96e6229 with the rewritten test of 4941c11 (uncommitted then).
source scripts/gpu_install.sh
timeout --signal=INT 190 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py \
  -k "tuned and (None-headdim24 or eighth-headdim24 or None-headdim64)" 2>&1 | tee $OUT/pytest-tuned.log | tail -15
