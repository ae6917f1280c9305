#!/usr/bin/env bash
# Set up lit-matmamba in ./.venv: creates the virtual environment if it is missing and installs
# the package (editable) with its test and vision extras, and mamba-ssm's Triton kernels. Safe to
# re-run; it only adds what is missing. PYTHON picks the interpreter (default python3, 3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
echo "installing lit-matmamba[dev,vision] into .venv (the first time downloads torch: a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,vision]"
# mamba-ssm's SSD kernels are Triton (Python) code: install that part only, without its CUDA
# extensions and their dependencies, so the kernel tests run them under the Triton interpreter.
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('mamba_ssm') is None)"; then
  echo "installing mamba-ssm 2.3.2.post1 (Triton kernels only: MAMBA_SKIP_CUDA_BUILD)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check setuptools wheel packaging
  MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE .venv/bin/python -m pip install --quiet \
    --disable-pip-version-check --no-build-isolation --no-deps "mamba-ssm==2.3.2.post1"
fi
.venv/bin/python -c "import lit_matmamba, torch; print('lit_matmamba ready, torch', torch.__version__)"
