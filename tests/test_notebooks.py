"""The notebooks: stored without outputs, and each runs top to bottom in a fresh Jupyter kernel on
the CPU (as Jupyter runs it: from notebooks/, the kernel on this interpreter), failing on any cell's
error. Default data sets are built on first use under the repository's data/ (or
$LIT_MATMAMBA_DATA), as by the command line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# Beyond running without an error: lines each notebook must print (its own checks of what it
# shows), and how many figures it must draw.
EXPECTED: dict[str, tuple[list[str], int]] = {
    "model_api": (["same outputs: True", "round trip equal: True", "allowed widths"], 0),
    "quickstart": (["same logits as the nested model at width 32: True", "--- width 8:", "tokens/s"], 2),
    "custom_head": (["rebuilt: my_heads.MLPHead", "--- width 8 ---", "width 8: top-1"], 2),
}


def test_every_notebook_has_its_expectations():
    assert sorted(p.stem for p in NOTEBOOKS) == sorted(EXPECTED)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(notebook):
    nb = nbformat.read(notebook, as_version=4)
    nbformat.validate(nb)
    dirty = [
        i
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count)
    ]
    assert not dirty, (
        f"{notebook.name}: cells {dirty} have outputs; clear them (Jupyter: Edit > Clear Outputs of All Cells)"
    )


def execute(notebook: Path) -> nbformat.NotebookNode:
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    nb = nbformat.read(notebook, as_version=4)
    # No kernel directories: "python3" is then ipykernel's own kernel on this interpreter
    # (sys.executable), whatever kernels other Jupyter installations registered.
    km = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))
    client = NotebookClient(nb, km=km, timeout=600, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(notebook):
    if notebook.stem == "custom_head" and shutil.which("apt-get") is None:
        data = Path(os.environ.get("LIT_MATMAMBA_DATA") or NOTEBOOK_DIR.parent / "data")
        if not (data / "fashion-mnist" / "index.json").is_file():
            pytest.skip("Fashion-MNIST is not built and apt-get (Debian), which fetches it, is missing")
    nb = execute(notebook)
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(
        out.get("text", "") if out.output_type == "stream" else out.get("data", {}).get("text/plain", "")
        for out in outputs
    )
    lines, figures = EXPECTED[notebook.stem]
    for line in lines:
        assert line in text, f"{notebook.name} did not print {line!r}"
    assert sum("image/png" in out.get("data", {}) for out in outputs) == figures
