# Eighth run, call 2 (1 GPU): the two cases of the pinned-configuration GPU test that have never run
# (head dim 24 at D/8 and Mix'n'Match), alone on the GPU; beside them, the memory checks at this
# commit, now also measuring the largest width's whole training step with its optimizer state
# (memory is per process, so the two do not disturb each other's figures).
# Ran at commit 66ef539.
source scripts/gpu_install.sh
mkdir -p /tmp/o
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > /tmp/o/gpu.txt
M="timeout 150 python3 scripts/gpu_memory_check.py"
($M --preset lm-130m --batch 16 --out /tmp/o/memory-lm-130m.json > /tmp/o/memory-130m.log 2>&1
 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True $M --preset lm-130m --batch 16 \
   --out /tmp/o/memory-lm-130m-expandable.json > /tmp/o/memory-130m-expandable.log 2>&1
 $M --preset lm-1.4b --batch 8 --out /tmp/o/memory-lm-1.4b.json > /tmp/o/memory-1.4b.log 2>&1) &
left=$((540 - SECONDS)); T="timeout --signal=INT --kill-after=15 $left"
$T python3 -m pytest -v -p no:cacheprovider tests/test_gpu_path.py -k "tuned and headdim24 and (eighth or mixnmatch)" \
  > /tmp/o/pytest-tuned-hd24-rest.log 2>&1
wait
tail -n 4 /tmp/o/memory-*.log; tail -n 3 /tmp/o/pytest-*.log
tar czf $OUT/all.tgz -C /tmp o
