"""notebooks/01_quickstart.ipynb executes top to bottom with small sizes."""

import pytest

from conftest import execute_notebook


@pytest.mark.slow
def test_quickstart_notebook_runs(monkeypatch):
    text, images = execute_notebook("01_quickstart.ipynb", monkeypatch)
    assert "final accuracy" in text and "digits test accuracy" in text
    assert images >= 2  # label mix of clients, accuracy per algorithm
