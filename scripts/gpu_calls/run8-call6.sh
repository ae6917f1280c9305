# Eighth run, call 6 (1 GPU): the 130m memory check after gpu_memory_check.py's joint step and the
# largest width's whole step became one train_step(widths); its figures should equal call 2's.
# Ran at commit cd0c907: every memory figure in its JSON equals call 2's.
source scripts/gpu_install.sh
mkdir -p /tmp/o
timeout 200 python3 scripts/gpu_memory_check.py --preset lm-130m --batch 16 --out /tmp/o/memory-lm-130m.json \
  > /tmp/o/memory-130m.log 2>&1
tail -n 4 /tmp/o/memory-130m.log
tar czf $OUT/all.tgz -C /tmp o
