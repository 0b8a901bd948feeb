"""Shared test setup: CPU only, strict dtype promotion off-by-default is kept, small sizes."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedjax_sim.data.federated import make_federated_data  # noqa: E402


def random_federated(num_clients=12, max_examples=9, dim=5, num_classes=3, *, seed=0,
                     min_count=0):
    """A small random FederatedData with ragged counts (some clients may be empty)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_clients, max_examples, dim)).astype(np.float32)
    w = rng.normal(size=(dim, num_classes))
    y = (x @ w).argmax(-1)
    counts = rng.integers(min_count, max_examples + 1, size=num_clients)
    return make_federated_data(x, y, counts, num_classes=num_classes)


@pytest.fixture
def small_data():
    return random_federated()


@pytest.fixture(autouse=True)
def _no_leaked_x64():
    assert not jax.config.jax_enable_x64
    yield


def execute_notebook(name, monkeypatch, *, timeout=600):
    """Runs notebooks/<name> with FEDJAX_SIM_SMALL=1; returns (printed text, PNG count).

    Fails if any cell raised.
    """
    import pathlib

    import nbformat
    from nbclient import NotebookClient

    path = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / name
    monkeypatch.setenv("FEDJAX_SIM_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, startup_timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors[0].get("evalue")
    text = "".join(o.get("text", "") for o in outputs)
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    return text, images


def pytest_collection_modifyitems(config, items):
    """Runs the tests marked ``slow`` first (stable order otherwise).

    With ``pytest -n 2`` the long tests (notebooks, the sharded round) then start while
    the short ones can still fill the other worker, instead of one worker finishing a
    two-minute test alone at the end.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
