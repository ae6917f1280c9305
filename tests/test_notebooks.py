"""The notebooks run top to bottom (code cells executed in order, as a kernel would)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(notebook, capsys):
    cells = json.loads(notebook.read_text())["cells"]
    namespace: dict = {"__name__": "__main__"}
    for i, cell in enumerate(c for c in cells if c["cell_type"] == "code"):
        exec(compile("".join(cell["source"]), f"{notebook.name}[cell {i}]", "exec"), namespace)
    out = capsys.readouterr().out
    assert "same outputs: True" in out and "round trip equal: True" in out and "allowed widths" in out


def test_there_is_a_notebook():
    assert NOTEBOOKS
