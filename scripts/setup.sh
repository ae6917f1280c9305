#!/usr/bin/env bash
# Set up lit-matmamba in ./.venv: creates the virtual environment if it is missing and installs
# the package (editable) with its test and vision extras. Safe to re-run; it only adds what is
# missing. PYTHON picks the interpreter (default python3, 3.10 or newer).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
echo "installing lit-matmamba[dev,vision] into .venv (the first time downloads torch: a few minutes)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[dev,vision]"
.venv/bin/python -c "import lit_matmamba, torch; print('lit_matmamba ready, torch', torch.__version__)"
