# Set lit-matmamba up on a GPU machine whose Python already holds torch, triton, lightning and
# tokenizers, but which cannot download (the project's benchmark machines).
#
#   bash scripts/install_gpu.sh wheels   # where pip can download: builds .whl/ (git-ignored)
#   source scripts/install_gpu.sh        # on the GPU machine, with .whl/ copied there
#
# `wheels` builds mamba-ssm's Triton kernels into a pure-Python wheel (MAMBA_SKIP_CUDA_BUILD: its
# CUDA extensions are not used) and downloads the pure-Python packages such images lack. Sourcing
# installs them into /tmp/site, the project in editable mode without touching the image's torch,
# and exports PYTHONPATH for this shell. The pip log goes to $OUT/install.log (or /tmp).
# On a machine with network access, `pip install -e .` plus the mamba-ssm line of the README is all.

_lmm_wheels() {
  set -euo pipefail
  local py=${PYTHON:-python3}
  rm -rf .whl && mkdir -p .whl
  # Needs torch in this Python: mamba-ssm's setup imports it even when it skips the CUDA build.
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE "$py" -m pip wheel -q --no-deps --no-build-isolation \
    "mamba-ssm==2.3.2.post1" -w .whl
  "$py" -m pip download -q --no-deps --only-binary=:all: -d .whl \
    "jsonargparse[signatures]>=4.27" docstring-parser typeshed-client "webdataset>=0.2.86" braceexpand
  ls .whl
}

_lmm_install() {
  local log="${OUT:-/tmp}/install.log"
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/*.whl >"$log" 2>&1 \
    || { cat "$log"; return 1; }
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
  python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$log" 2>&1 || { cat "$log"; return 1; }
  python3 -c "import lit_matmamba, torch, triton; print('lit_matmamba on', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
}

if [ "${1:-}" = "wheels" ]; then
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && _lmm_wheels)
else
  _lmm_install
fi
