"""notebooks/02_dp_fedavg.ipynb runs top to bottom with small sizes (FEDJAX_SIM_SMALL=1)."""

import pytest

from conftest import execute_notebook


@pytest.mark.slow
def test_dp_notebook_runs(monkeypatch):
    text, images = execute_notebook("02_dp_fedavg.ipynb", monkeypatch, timeout=300)
    assert "reaches epsilon = 2" in text and "runs in" in text
    assert "epsilon     inf" in text  # the no-noise baseline reports an infinite epsilon
    assert images >= 3  # epsilon vs z, accuracy vs epsilon, per-round curves
