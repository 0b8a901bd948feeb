"""notebooks/04_poisoning.ipynb runs top to bottom with small sizes (FEDJAX_SIM_SMALL=1)."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / "04_poisoning.ipynb"


@pytest.mark.slow
def test_poisoning_notebook_runs(monkeypatch):
    monkeypatch.setenv("FEDJAX_SIM_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, startup_timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue") if errors else None
    text = "".join(o.get("text", "") for o in outputs)
    assert "backdoor success" in text and "pre-trained accuracy" in text
    assert "alie" in text and "ipm" in text and "epsilon" in text
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    assert images >= 3  # defences bar chart, reducer cosines, backdoor curves
