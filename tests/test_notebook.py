"""The tutorial notebook runs top to bottom (VAELAB_QUICK=1: short training,
exercises filled with the reference answers)."""

from pathlib import Path

import pytest

# The GPU machines' image lacks the notebook tools; everywhere else (CI included) they are installed.
nbformat = pytest.importorskip("nbformat", reason="needs nbformat, nbclient and ipykernel (pip)")
NotebookClient = pytest.importorskip("nbclient", reason="needs nbformat, nbclient and ipykernel (pip)").NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "tutorial.ipynb"


def test_the_tutorial_notebook_runs_and_every_check_passes(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_QUICK", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = "\n".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for out in cell.outputs)
    for name in ("reparametrize", "kl_normal", "negative_elbo"):
        assert f"✓ {name} agrees with vaelab" in text
    images = sum("image/png" in out.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
                 for out in cell.outputs)
    assert images >= 9  # every figure was drawn
    assert list(tmp_path.glob("runs/notebook/*/report.html"))


def test_the_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")
