"""The documentation site builds with ``mkdocs build --strict``, executing every notebook, and shows their figures.

The build runs mkdocs in a subprocess on the repository's ``mkdocs.yml`` (Material theme, mkdocstrings from
the docstrings, mkdocs-jupyter executing ``notebooks/*.ipynb``).  ``--strict`` turns every warning into a
failure: a broken link or cross-reference, a docstring griffe cannot parse (a documented parameter that is not
in the signature, ...), a page missing from the nav, a notebook cell that raises.

This build is also the notebooks' execution test: tests/test_notebooks.py checks that the committed notebooks
carry no outputs and executes them itself only when the docs tools are not installed (so each notebook runs
once per test session).  The kernel is pinned to *this* interpreter through a private kernelspec
(``JUPYTER_PATH``), as in tests/test_notebooks.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
DOCS_TOOLS = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "mkdocs_jupyter")


def docs_tools_missing() -> list[str]:
    """The documentation tools (the ``docs`` extra) that are not importable."""
    missing = []
    for name in DOCS_TOOLS:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except ModuleNotFoundError:
            missing.append(name)
    return missing


pytestmark = [
    pytest.mark.skipif(bool(docs_tools_missing()),
                       reason=f"the docs extra is not installed (pip install -e '.[docs]'; missing: "
                              f"{', '.join(docs_tools_missing())})"),
    pytest.mark.timeout(1800),  # the build (every notebook executed) runs in the first test's setup
]


def _kernel_dir(tmp: Path) -> Path:
    """A ``python3`` kernelspec that launches this interpreter (first on ``JUPYTER_PATH``)."""
    spec_dir = tmp / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (mixedjax docs)", "language": "python"}))
    return tmp / "jupyter"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("docs")
    out = tmp / "site"
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # the notebooks' own (inline) backend
    env.update(JUPYTER_PATH=str(_kernel_dir(tmp)), NO_MKDOCS_2_WARNING="1", MIXEDJAX_DOCS_EXECUTE="true",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    if proc.returncode != 0:
        log = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if not line.startswith("INFO"))
        pytest.fail(f"mkdocs build --strict failed (exit {proc.returncode}):\n{log[-6000:]}", pytrace=False)
    return out


def test_site_builds_strict(site: Path) -> None:
    assert (site / "index.html").is_file()
    for page in ["getting-started", "guide/plots", "guide/cli", "migration/statsmodels", "migration/lme4",
                 "benchmarks", "api/results", "api/plots"]:
        assert (site / page / "index.html").is_file(), page


def test_notebooks_rendered_with_figures(site: Path) -> None:
    """Every notebook is a page; those that draw show their figures (PNG outputs of the build's execution)."""
    for nb in NOTEBOOKS:
        html = (site / "notebooks" / nb.stem / "index.html").read_text()
        pictures = html.count("data:image/png;base64,")
        expected = sum("plot_" in src or "plt.subplots" in src or ".plot(" in src
                       for src in _code_cells(nb))
        assert pictures >= expected, f"{nb.name}: {pictures} figures rendered, {expected} cells draw"
        assert "Traceback (most recent call last)" not in html, nb.name
    assert (site / "notebooks" / "05_plots" / "05_plots.ipynb").is_file()  # the source is offered for download


def test_api_reference_from_docstrings(site: Path) -> None:
    results = (site / "api" / "results" / "index.html").read_text()
    for name in ["plot_ranef", "plot_profile", "plot_diagnostics", "conf_int", "condvar", "bootstrap"]:
        assert f'id="mixedjax.results.MixedLMResults.{name}"' in results, name
    plots = (site / "api" / "plots" / "index.html").read_text()
    assert re.search(r'id="mixedjax\.plots\.plot_batch"', plots)


def test_strict_settings() -> None:
    """The build fails on warnings (``strict``), and links are validated (a broken one is a warning)."""
    text = (ROOT / "mkdocs.yml").read_text()
    assert re.search(r"^strict: true$", text, re.M)
    for key in ("omitted_files", "absolute_links", "unrecognized_links", "anchors"):
        assert re.search(rf"^  {key}: warn$", text, re.M), key
    assert "allow_errors: false" in text and "execute: !ENV [MIXEDJAX_DOCS_EXECUTE, true]" in text


def _code_cells(nb: Path) -> list[str]:
    cells = json.loads(nb.read_text())["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
