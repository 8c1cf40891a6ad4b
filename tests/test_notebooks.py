"""Every notebook in notebooks/ runs top to bottom (nbclient); a failing cell fails the test.
The notebooks are stored with their outputs (re-save after editing: run all, save)."""

from __future__ import annotations

import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: pathlib.Path, tmp_path: pathlib.Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.manager import KernelManager

    notebook = nbformat.read(path, as_version=4)
    # Unix sockets, not TCP: a TCP kernel picks free ports and binds them a moment later, and
    # the gloo and torchrun worlds of the tests running beside it may take one in between.
    kernel = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    client = nbclient.NotebookClient(
        notebook,
        km=kernel,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]  # fmt: skip
    assert not errors
    assert any(c.get("outputs") for c in notebook.cells if c.cell_type == "code")


def test_there_are_notebooks() -> None:
    assert {p.stem for p in NOTEBOOKS} >= {
        "01_topology",
        "02_step_transforms",
        "03_sharding_and_fp8",
        "04_training_curves",
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_with_its_outputs_prose_and_a_plot(path: pathlib.Path) -> None:
    """Opened in Jupyter (or on GitHub) a notebook teaches before anyone runs it: every code cell
    was run and its outputs saved, markdown explains, and there is at least one figure."""
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    prose = [c for c in notebook.cells if c.cell_type == "markdown"]
    assert all(c.get("execution_count") for c in code), f"{path.name}: run all and save it"
    assert sum(bool(c.get("outputs")) for c in code) >= len(code) // 2
    assert not [o for c in code for o in c.outputs if o.get("output_type") == "error"]
    assert len(prose) >= len(code) // 2 and sum(len(c.source) for c in prose) > 600
    assert any("image/png" in o.get("data", {}) for c in code for o in c.outputs)
