"""The tutorial notebook runs top to bottom (VAELAB_QUICK=1: short training,
exercises filled with the reference answers)."""

from pathlib import Path

import pytest

# The GPU machines' image lacks the notebook tools; everywhere else (CI included) they are installed.
nbformat = pytest.importorskip("nbformat", reason="needs nbformat, nbclient and ipykernel (pip)")
NotebookClient = pytest.importorskip("nbclient", reason="needs nbformat, nbclient and ipykernel (pip)").NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "tutorial.ipynb"


def kernel_manager(folder: Path):
    """A kernel that talks over Unix sockets in folder, not TCP: jupyter_client picks TCP ports by
    binding and releasing them, and another process may take one before the kernel binds it."""
    from jupyter_client.manager import AsyncKernelManager

    return AsyncKernelManager(kernel_name="python3", transport="ipc", ip=str(folder / "kernel"))


@pytest.mark.slow
def test_the_tutorial_notebook_runs_and_every_check_passes(tmp_path, monkeypatch):
    import tempfile

    from nbclient.exceptions import DeadKernelError

    monkeypatch.setenv("VAELAB_QUICK", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    with tempfile.TemporaryDirectory(prefix="vaelab-kernel-") as sockets:  # short: a socket path has 107 bytes
        km = kernel_manager(Path(sockets))
        try:
            NotebookClient(notebook, km=km, timeout=600,
                           resources={"metadata": {"path": str(tmp_path)}}).execute()
        except DeadKernelError:
            process = getattr(km.provisioner, "process", None)
            code = process.poll() if process is not None else None
            pytest.fail(f"the kernel died (exit status {code}; negative: killed by that signal); "
                        "its stderr is in the captured output")
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
