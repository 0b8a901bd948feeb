"""The cohort sharded over 4 fake CPU devices gives the single-device result, and a
sharded round compiles once."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import FAST_COMPILE, xla_flags

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from fedjax_sim.algorithms import make_algorithm
    from fedjax_sim.cohort import client_mesh, mesh_for
    from fedjax_sim.data.federated import make_federated_data
    from fedjax_sim.models import make_model
    from fedjax_sim.rounds import make_round
    from fedjax_sim.sampling import FixedSizeSampler, PoissonSampler
    from fedjax_sim.server import coordinate_median, dp_fedavg_aggregator

    assert jax.device_count() == 4, jax.devices()
    assert mesh_for(1) is None and mesh_for(4).shape["clients"] == 4
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event)
        if event == "/jax/core/compile/backend_compile_duration" else None)
    # Materialised data: the procedural generator's compile (most of a round's) would
    # dominate this test's four compiles and prove nothing more about sharding.
    rng = np.random.default_rng(3)
    counts = rng.integers(2, 13, 500)
    x = rng.normal(size=(500, 12, 8)).astype(np.float32)
    y = (x @ rng.normal(size=(8, 4))).argmax(-1)
    pop = make_federated_data(x, y, counts, num_classes=4)
    model = make_model("mlp", (8,), 4, hidden=(16,))
    results = {}
    # A streamed DP sum under Poisson sampling and a stacked median under fixed-size
    # sampling: between them, both samplers, both reduction paths and a noise key.
    for name, sampler, aggregator in (
            ("poisson_dp", PoissonSampler(500, 0.05),
             dp_fedavg_aggregator(1.0, 1.0, 25, key=jax.random.key(7))),
            ("median", FixedSizeSampler(500, 30), coordinate_median())):
        alg = make_algorithm("fedadam", model, client_lr=0.1, local_epochs=1, batch_size=4,
                             aggregator=aggregator)
        params = {}
        for mesh in (None, client_mesh()):
            fr = make_round(alg, sampler, chunk_size=4, mesh=mesh)
            results[name + "_streaming"] = fr.streaming
            state = fr.init(jax.random.key(0))
            state, out = fr.step(state, pop, jax.random.key(0))
            before = len(compiles)
            state, out = fr.step(state, pop, jax.random.key(1))
            results[name + ("_sharded" if mesh else "_single") + "_recompiles"] = (
                len(compiles) - before)
            params["sharded" if mesh else "single"] = state.params
            if mesh is not None:
                leaf = jax.tree.leaves(out.client_metrics)[0]
                results[name + "_num_shards"] = len(leaf.sharding.device_set)
                results[name + "_capacity"] = fr.cohort_capacity
        diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                             params["single"], params["sharded"])
        results[name] = max(jax.tree.leaves(diffs))
    print(json.dumps(results))
""")


@pytest.mark.slow
def test_sharded_round_equals_single_device():
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=4",
                                               FAST_COMPILE),
               JAX_PLATFORMS="cpu")
    # Every compilation must reach the backend to be counted: no persistent cache here.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["poisson_dp_num_shards"] == res["median_num_shards"] == 4
    assert res["poisson_dp_capacity"] % 4 == 0 and res["median_capacity"] % 4 == 0
    assert res["poisson_dp"] < 1e-5, res  # the noise key in the server state, too
    assert res["median"] < 1e-5, res
    # The sums reduce chunk by chunk (psum over devices), the median from the stacked cohort.
    assert res["poisson_dp_streaming"]
    assert not res["median_streaming"]
    # Round 2 reuses round 1's program: the state keeps its sharding across rounds.
    assert all(res[f"{name}_{where}_recompiles"] == 0 for name in ("poisson_dp", "median")
               for where in ("single", "sharded")), res
