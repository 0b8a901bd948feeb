"""Compile once, compile less: equal chunks trace the client program once, the persistent
compilation cache is on by default outside the test suite, and the accelerator chunk
rule is bounded by device memory."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from conftest import random_federated
from fedjax_sim._chunks import chunk_layout, chunked_map
from fedjax_sim.cohort import default_chunk_size


def test_chunk_layout_is_minimal_and_nearly_even():
    for rows in range(1, 120):
        for chunk in range(1, 40):
            chunks, size = chunk_layout(rows, chunk)
            assert chunks == -(-rows // chunk)  # as few chunks as the bound allows
            assert size <= chunk and chunks * size >= rows
            assert chunks * size - rows < chunks  # under one padding row per chunk
    assert chunk_layout(0, 8) == (1, 0)


def test_chunked_map_equals_vmap_and_traces_once():
    traces = []

    def fn(args):
        traces.append(1)
        x, k = args
        return {"y": jnp.sin(x) * 2.0 + jax.random.uniform(k), "s": jnp.sum(x)}

    x = jnp.asarray(np.random.default_rng(0).normal(size=(23, 3)), jnp.float32)
    keys = jax.random.split(jax.random.key(1), 23)
    want = jax.vmap(fn)((x, keys))
    for chunk in (1, 4, 5, 23, 64):
        traces.clear()
        got = jax.jit(lambda a, k, c=chunk: chunked_map(fn, (a, k), c))(x, keys)
        assert len(traces) == 1, chunk
        np.testing.assert_array_equal(got["y"], want["y"])
        np.testing.assert_array_equal(got["s"], want["s"])


def _dot_count(data, cohort, chunk, streaming):
    model = fs.make_model("softmax", (5,), 3)
    alg = fs.make_algorithm("fedavg", model, client_lr=0.1, local_epochs=2, batch_size=4)
    fr = fs.make_round(alg, fs.FixedSizeSampler(data.num_clients, cohort), chunk_size=chunk,
                       streaming=streaming)
    state = fr.init(jax.random.key(0))
    text = fr.step.lower(state, data, jax.random.key(1)).as_text()
    return text.count("dot_general")


@pytest.mark.parametrize("streaming", [True, False])
def test_the_round_holds_one_copy_of_the_client_program(streaming):
    """A ragged cohort (10 clients in chunks of at most 4) compiles as many matmuls as one
    vmap over the whole cohort: no peeled first chunk, no remainder copy."""
    data = random_federated(num_clients=12)
    whole = _dot_count(data, 10, 10, streaming)
    assert whole > 0
    assert _dot_count(data, 10, 4, streaming) == whole


@pytest.mark.parametrize("streaming", [True, False])
def test_the_round_traces_the_client_program_once(streaming, monkeypatch):
    """Chunked (10 clients in chunks of 4), the client program is traced once per round:
    the streamed reduction's accumulator shapes and its scan body share that trace."""
    traced = []
    original = fs.data.FederatedData.cohort_data

    def counting(self, client_ids):
        traced.append(client_ids.shape)
        return original(self, client_ids)

    monkeypatch.setattr(fs.data.FederatedData, "cohort_data", counting)
    data = random_federated(num_clients=12)
    model = fs.make_model("softmax", (5,), 3)
    alg = fs.make_algorithm("fedavg", model, client_lr=0.1, local_epochs=1, batch_size=4)
    fr = fs.make_round(alg, fs.FixedSizeSampler(data.num_clients, 10), chunk_size=4,
                       streaming=streaming)
    state = fr.init(jax.random.key(0))
    fr.step.lower(state, data, jax.random.key(1))
    assert traced == [(1,)]


def test_padding_clients_change_nothing():
    """Chunks padded with inert clients give the same params, metrics and per-client
    outputs as one vmap over the cohort, to float rounding (XLA vectorises another batch
    size differently, and the sums group differently)."""
    data = random_federated(num_clients=12, min_count=1)
    model = fs.make_model("softmax", (5,), 3)
    alg = fs.make_algorithm("fedavg", model, client_lr=0.1, local_epochs=1, batch_size=4)
    outs = []
    for chunk in (10, 3):
        fr = fs.make_round(alg, fs.FixedSizeSampler(12, 10), chunk_size=chunk)
        state, out = fr.step(fr.init(jax.random.key(0)), data, jax.random.key(2))
        outs.append((state.params, out))
    (p1, o1), (p2, o2) = outs
    np.testing.assert_array_equal(o1.client_ids, o2.client_ids)
    for name in o1.client_metrics:
        np.testing.assert_allclose(o1.client_metrics[name], o2.client_metrics[name],
                                   rtol=1e-6, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), p1, p2)
    assert int(o1.metrics["num_aggregated"]) == int(o2.metrics["num_aggregated"]) == 10


def test_accelerator_chunks_are_bounded_by_device_memory():
    # CPU: the cache rule, whatever the memory.
    assert default_chunk_size(610, 1000, backend="cpu", device_memory=2**40) == 256
    # GPU: the whole cohort when it fits in a quarter of memory at 64 bytes a param...
    assert default_chunk_size(610, 10_000, backend="gpu", device_memory=16 * 2**30) == 10_000
    # ...else the largest power of two that fits.
    chunk = default_chunk_size(10**6, 10_000, backend="gpu", device_memory=16 * 2**30)
    assert chunk == 64 and chunk * 64 * 10**6 <= 4 * 2**30 < 2 * chunk * 64 * 10**6
    assert default_chunk_size(10**9, 100, backend="tpu", device_memory=2**30) == 1


_PROBE = """
import json, os, sys, jax, jax.numpy as jnp, fedjax_sim as fs
out = {"default": fs.use_compile_cache()}
jax.jit(lambda x: x * 2.0 + 1.0)(jnp.ones(3))
out["entries"] = len(os.listdir(out["default"]))
for case, env in (("off", "0"), ("env", sys.argv[1]), ("jax_own", "")):
    jax.config.update("jax_compilation_cache_dir", sys.argv[2] if case == "jax_own" else None)
    os.environ["FEDJAX_SIM_COMPILE_CACHE"] = env
    out[case] = [fs.use_compile_cache(), jax.config.jax_enable_compilation_cache]
print(json.dumps(out))
"""


def test_compile_cache_default_env_path_off_and_kept(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "FEDJAX_SIM_COMPILE_CACHE"))}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    own, jax_own = str(tmp_path / "own"), str(tmp_path / "jax_own")
    proc = subprocess.run([sys.executable, "-c", _PROBE, own, jax_own], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["default"] == str(tmp_path / "xdg" / "fedjax_sim" / "xla")
    assert out["entries"] > 0  # the tiny program was written, however fast it compiled
    assert out["off"] == [None, False]
    assert out["env"] == [own, True] and os.path.isdir(own)
    assert out["jax_own"] == [jax_own, True]  # a directory JAX was given is kept


def test_cli_turns_the_cache_off_on_request(monkeypatch, capsys):
    from fedjax_sim import compile_cache
    from fedjax_sim.experiment.cli import main

    calls = []
    monkeypatch.setattr(compile_cache, "use_compile_cache", lambda on=True: calls.append(on))
    assert main(["run", "--no-compile-cache", "--rounds", "0"]) == 2
    assert calls == [False]
    assert "rounds=0" in capsys.readouterr().err
