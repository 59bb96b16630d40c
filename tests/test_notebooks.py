"""The notebooks in ``notebooks/``: committed without outputs, and every cell runs.

Each notebook runs top to bottom in a fresh ``python3`` kernel (cwd: the notebooks
folder, 600 s per cell).  The kernel is pinned to *this* interpreter
(``sys.executable``) through a private kernelspec, so it imports the mixedjax
under test whatever ``python3`` kernels the user or the system has installed.

Where the documentation tools are installed (the ``docs`` extra, part of ``test``), the
notebooks are executed by tests/test_docs.py instead, whose ``mkdocs build --strict``
runs every notebook (mkdocs-jupyter, a failing cell fails the build) and renders its
figures: each notebook then runs once per test session.  ``MIXEDJAX_NOTEBOOKS_EXECUTE=1``
executes them here as well.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import KernelManager  # noqa: E402
from test_docs import docs_tools_missing  # noqa: E402

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 600


def _kernel_manager(tmp_path: Path) -> KernelManager:
    """A ``python3`` kernel manager that launches ``sys.executable -m ipykernel_launcher``."""
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (mixedjax tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", "notebooks use the python3 kernel"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), \
        f"{path.name}: commit notebooks with outputs cleared"
    assert "matplotlib.use(" not in "".join(c.source for c in nb.cells), f"{path.name}: leave the backend alone"


# the module's per-test timeout (600 s) is per cell here: allow the whole notebook more
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not docs_tools_missing() and os.environ.get("MIXEDJAX_NOTEBOOKS_EXECUTE") != "1":
        pytest.skip("executed by tests/test_docs.py's mkdocs build (set MIXEDJAX_NOTEBOOKS_EXECUTE=1 to run here)")
    monkeypatch.setenv("MPLBACKEND", "Agg")  # inherited by the kernel: no display needed
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        km=_kernel_manager(tmp_path),
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed:\n{e}", pytrace=False)
