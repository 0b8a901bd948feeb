"""notebooks/04_poisoning.ipynb runs top to bottom with small sizes (FEDJAX_SIM_SMALL=1)."""

import pytest

from conftest import execute_notebook


@pytest.mark.slow
def test_poisoning_notebook_runs(monkeypatch):
    text, images = execute_notebook("04_poisoning.ipynb", monkeypatch, timeout=300)
    assert "backdoor success" in text and "pre-trained accuracy" in text
    assert "alie" in text and "ipm" in text and "epsilon" in text
    assert images >= 3  # defences bar chart, reducer cosines, backdoor curves
