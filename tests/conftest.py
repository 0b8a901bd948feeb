"""Shared test setup: CPU only, strict dtype promotion and rank-promotion errors, small sizes.

JAX's ``jax_numpy_dtype_promotion="strict"`` makes mixing array dtypes (int32 with
float32, bool with float, float32 with a float64 NumPy value) an error instead of a silent
promotion, and ``jax_numpy_rank_promotion="raise"`` makes broadcasting arrays of different
ranks (``(C,)`` with ``(C, 1)``) an error. Library code states its dtypes and shapes
explicitly, so the suite runs with both on: an implicit promotion is a test failure rather
than a silent change of precision or shape. Both are set as environment variables before
JAX is imported, so subprocesses (CLI runs, scripts, notebook kernels) inherit them too.
"""

import os
import shutil
import tempfile


def xla_flags(*flags):
    """The inherited ``XLA_FLAGS`` (the suite's optimisation level) plus ``flags``."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


# XLA:CPU's older elemental emitters instead of its fusion emitters: the same HLO
# semantics from a cheaper code generator, which compiles the suite's programs in about
# half the time. For the processes a test starts (notebook kernels, CLI runs, scripts)
# whose checks do not hinge on the default emitters' last bits: two different programs
# (a round with and without an observer, say) can round differently under these
# emitters, so the suite's own processes keep the default.
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"


os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite checks numbers, not speed: XLA's backend (LLVM) optimisation level changes how
# fast compiled code runs, not what it computes, and at 0 the many small test programs
# compile about a fifth faster. Subprocesses (CLI, scripts, notebook kernels) inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = xla_flags("--xla_backend_optimization_level=0")
# JAX reads each of these options from its upper-case env var when it is first imported.
_STRICT_SETTINGS = {
    "jax_numpy_dtype_promotion": "strict",
    "jax_numpy_rank_promotion": "raise",
}
for _name, _value in _STRICT_SETTINGS.items():
    os.environ[_name.upper()] = _value

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from fedjax_sim.data.federated import make_federated_data  # noqa: E402

for _name, _value in _STRICT_SETTINGS.items():
    jax.config.update(_name, _value)  # in case JAX was imported before this module


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

    The kernel compiles with ``FAST_COMPILE``: a notebook is a chain of distinct,
    short-lived programs, so compiling is most of its run time.
    """
    import pathlib

    import nbformat
    from nbclient import NotebookClient

    path = pathlib.Path(__file__).resolve().parents[1] / "notebooks" / name
    monkeypatch.setenv("FEDJAX_SIM_SMALL", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", xla_flags(FAST_COMPILE))
    nb = nbformat.read(path, as_version=4)
    # The outputs are in hand when the last cell returns: the kernel is then killed, not
    # asked to shut down (a graceful shutdown waits a second or more for nothing).
    NotebookClient(nb, timeout=timeout, startup_timeout=180, kernel_name="python3",
                   shutdown_kernel="immediate",
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


_CACHE_SETTINGS = {  # JAX config options; each is also read from its upper-case env var
    "jax_persistent_cache_min_compile_time_secs": 0,
    "jax_persistent_cache_min_entry_size_bytes": -1,
}


def pytest_configure(config):
    """One persistent XLA compilation cache for the whole run, removed at its end.

    Many tests compile the same programs (the same round configuration in another test,
    the same model in a CLI subprocess); a shared on-disk cache keyed by the program
    compiles each once. It starts empty, so nothing carries over between runs. Set up in
    the controlling process only: xdist workers and subprocesses inherit the environment.
    Tests that count compilations (test_sharding) drop it from their subprocess.

    Concurrent use: without a size bound JAX takes no lock, and a reader may find an entry
    another process is still writing; the truncated entry fails to decompress, JAX warns
    and compiles the program itself (``compiler._cache_read``), so a race costs time, never
    a wrong executable. (A size bound would add a file lock and an eviction scan per
    write, which made the suite slower, not faster.)
    """
    if hasattr(config, "workerinput") or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    path = tempfile.mkdtemp(prefix="fedjax_sim_test_xla_cache_")
    config._fedjax_sim_cache_dir = path
    for name, value in {"jax_compilation_cache_dir": path, **_CACHE_SETTINGS}.items():
        os.environ[name.upper()] = str(value)  # for the workers and subprocesses
        jax.config.update(name, value)  # this process has read its env vars already


def pytest_unconfigure(config):
    path = getattr(config, "_fedjax_sim_cache_dir", None)
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)
        for name in ("jax_compilation_cache_dir", *_CACHE_SETTINGS):
            os.environ.pop(name.upper(), None)


def run_privacy_cli(argv, capsys):
    """``fedjax-sim privacy ARGV`` in process: ``(exit status, stdout, stderr)``."""
    from fedjax_sim.experiment import privacy_cli
    from fedjax_sim.experiment.flags import ArgumentParser

    parser = ArgumentParser(prog="fedjax-sim")
    privacy_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["privacy", *argv])
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, out, err, field):
    """Exit status 2, nothing on stdout, one ``error: FIELD=`` line on stderr."""
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"fedjax-sim privacy: error: {field}=")

