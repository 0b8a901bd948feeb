"""notebooks/03_privacy_attacks.ipynb runs top to bottom (small sizes, python3 kernel)."""

import pytest

from conftest import execute_notebook


@pytest.mark.slow
def test_privacy_attacks_notebook_executes(monkeypatch):
    text, images = execute_notebook("03_privacy_attacks.ipynb", monkeypatch)
    assert "SMALL=True" in text
    assert "secure aggregation" in text
    assert "malicious server, round 1: recovered" in text
    assert "malicious client, round 3: recovered" in text
    assert images >= 7
