"""examples/quickstart.ipynb: committed without outputs, and runs top to bottom in a real kernel."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.helpers import REPO

NOTEBOOK = os.path.join(REPO, "examples", "quickstart.ipynb")
# Cells (by id) whose last expression is a grid: each must show a PNG.
IMAGE_CELLS = ("generate", "edit", "attention", "evaluate")


def test_committed_notebook_has_no_outputs():
    with open(NOTEBOOK, encoding="utf-8") as f:
        nb = json.load(f)
    code = [cell for cell in nb["cells"] if cell["cell_type"] == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell["outputs"] == [], f"cell {cell.get('id')!r} was committed with outputs"
        assert cell["execution_count"] is None, f"cell {cell.get('id')!r} was committed with an execution count"
    ids = [cell.get("id") for cell in nb["cells"]]
    assert set(IMAGE_CELLS) <= set(ids), f"cells {set(IMAGE_CELLS) - set(ids)} are missing (ids: {ids})"
    assert nb["metadata"]["kernelspec"]["name"] == "python3"


@pytest.mark.e2e
def test_notebook_runs_top_to_bottom():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel's own environment: CPU, one device (as a user's laptop; not conftest's eight fake
    # devices), and this checkout importable even when mmjax is not installed.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count"))
    env["XLA_FLAGS"] = flags
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
    start = time.perf_counter()
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell fails
    print(f"notebook ran in {time.perf_counter() - start:.1f}s")

    cells = {cell.get("id"): cell for cell in nb.cells}
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert cell.execution_count is not None, f"cell {cell.id!r} did not run"
        errors = [o for o in cell.outputs if o.output_type == "error"]
        assert not errors, f"cell {cell.id!r} raised {errors[0].ename}: {errors[0].evalue}"
    for cell_id in IMAGE_CELLS:
        shown = [o for o in cells[cell_id].outputs
                 if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
        assert shown, f"cell {cell_id!r} showed no image"
