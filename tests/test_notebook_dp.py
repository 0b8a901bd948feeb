"""notebooks/02_dp_fedavg.ipynb runs top to bottom with small sizes (FEDJAX_SIM_SMALL=1)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "02_dp_fedavg.ipynb"


@pytest.mark.slow
def test_dp_notebook_runs(monkeypatch):
    monkeypatch.setenv("FEDJAX_SIM_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, startup_timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.get("outputs", []))
    assert "reaches epsilon = 2" in text and "runs in" in text
    assert "epsilon     inf" in text  # the no-noise baseline reports an infinite epsilon
    images = [o for c in nb.cells for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # epsilon vs z, accuracy vs epsilon, per-round curves
