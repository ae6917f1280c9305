# Source this on the GPU machine (`source scripts/gpu_install.sh`, see shared/docs/gpu.md): installs
# the carried mamba-ssm wheel (.whl/, built with MAMBA_SKIP_CUDA_BUILD) into /tmp/site and the
# project in editable mode, and exports PYTHONPATH for this shell. The pip log goes to $OUT/install.log.
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "${OUT:-/tmp}/install.log" 2>&1 \
  || { cat "${OUT:-/tmp}/install.log"; return 1; }
