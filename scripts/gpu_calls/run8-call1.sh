# Eighth run, call 1 (1 GPU): a profile of the 130m joint step at the current code (what limits the
# missed 20% MFU target); the graphed 130m joint step with the tuned SSD table and without, each
# recording its first step's losses (equal results, not only time); then, three at a time, the GPU
# tests of the pinned configurations (7 of their 8 cases never ran on a GPU) and the rest of
# test_gpu_path.py at this commit.
# Ran at commit 91c2b80.
source scripts/gpu_install.sh
mkdir -p /tmp/o
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > /tmp/o/gpu.txt
B="python3 scripts/gpu_bench.py --preset lm-130m --batch 16 --seq 1024 --reps 5 --joint-only"
# Alone on the GPU, so that kernel times are not shared.
timeout 120 python3 scripts/gpu_profile.py --preset lm-130m --batch 16 --glue --out /tmp/o/profile-lm-130m.txt > /tmp/o/profile.log 2>&1
timeout 80 $B --out /tmp/o/joint-130m-tuned.json > /tmp/o/joint-130m-tuned.log 2>&1
LIT_MATMAMBA_SSD_CONFIGS=off timeout 80 $B --out /tmp/o/joint-130m-off.json > /tmp/o/joint-130m-off.log 2>&1
left=$((555 - SECONDS)); T="timeout --signal=INT --kill-after=15 $left"; Q="python3 -m pytest -q -p no:cacheprovider tests/test_gpu_path.py"
($T $Q -k "tuned and headdim24" > /tmp/o/pytest-tuned-hd24.log 2>&1) &
($T $Q -k "tuned and headdim64" > /tmp/o/pytest-tuned-hd64.log 2>&1) &
($T $Q -k "not tuned" > /tmp/o/pytest-gpu-path-rest.log 2>&1) &
# The tests stop (SIGINT: pytest reports what ran) at 555 s from the start, so that results come back.
wait
tail -n 4 /tmp/o/profile.log; grep -h "^joint\|first" /tmp/o/joint-*.log
python3 -c "
import json
for n in ('tuned', 'off'):
    try: d = json.load(open(f'/tmp/o/joint-130m-{n}.json'))
    except Exception as e: print(n, 'no result', e); continue
    print(n, d.get('pinned_ssd_configs'), round(d['joint']['graph']['ms'], 1), d['joint']['first_step'])"
tail -n 3 /tmp/o/pytest-*.log
tar czf $OUT/all.tgz -C /tmp o
