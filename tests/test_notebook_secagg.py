"""notebooks/05_secure_aggregation.ipynb runs top to bottom with small sizes
(FEDJAX_SIM_SMALL=1) and shows what it claims."""

import re

import pytest

from conftest import execute_notebook


@pytest.mark.slow
def test_secure_aggregation_notebook_runs(monkeypatch):
    text, images = execute_notebook("05_secure_aggregation.ipynb", monkeypatch, timeout=300)
    # 1. Without secure aggregation the server holds every upload; behind it, none.
    assert re.search(r"plain: the server holds uploads of shape \(12, \d+\)", text), text
    assert "secure: the server holds uploads = None, count = 12" in text
    assert "secure mean = clipped mean up to the reported rounding: True" in text
    # 2. Accuracy against bits: the encoding's error halves with every extra bit.
    assert "bits  5:" in text and "bits 16:" in text  # the fewest bits for 12 clients
    assert "the rounding error falls as the bits grow: True" in text
    # 3. Dropout takes noise shares away: epsilon rises with it.
    assert "epsilon rises with dropout: True" in text
    # 4. The communication ledger: per-round bytes match the per-client figures, and the
    # neighbour graph changes the bytes, not the sum.
    assert "bytes_up = sampled x (payload + protocol up): True" in text
    assert "the masks cancel: the same test accuracy for every k: True" in text
    # 5. The distributed-DP run states its guarantee.
    assert re.search(r"client-level \([0-9.]+, [0-9.e-]+\)-DP for all 3 released models "
                     r"\(distributed_discrete_gaussian", text), text
    assert re.search(r"the server saw: the sum of the survivors' uploads; simulator ground "
                     r"truth: .*train_loss", text), text
    assert "every round's bytes_up = sampled x protocol up + survivors x payload: True" in text
    assert images >= 4  # server view, accuracy/rounding vs bits, epsilon vs dropout, bytes
