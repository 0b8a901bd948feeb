"""Every server chain the registries can build reduces the same, streamed or stacked.

A streaming round runs the client stages and the partial sums inside each chunk (the
cohort's stacked uploads never exist); the stacked round gets every upload at once. For
each configuration below (every aggregator, every compressor, clipping fixed and
adaptive, the norm filter, DP-FedAvg fixed and adaptive, DP-FTRL, and an attack with its
observer) the two rounds must give the same params, chain state and metrics.
"""

import jax
import numpy as np
import pytest

from fedjax_sim.experiment import registry
from fedjax_sim.experiment.assemble import assemble
from fedjax_sim.experiment.config import make_config
from fedjax_sim.rounds import make_round

SMALL = dict(data="synthetic", num_clients=60, cohort_size=12, rounds=2, max_examples=8,
             min_examples=2, eval_clients=10, local_epochs=1, batch_size=4, chunk_size=5)
AGGREGATOR_OPTIONS = {
    "dp_ftrl": dict(sampling="cyclic", clip_norm=0.5, noise_multiplier=1.0),
    "krum": dict(num_byzantine=1), "multi_krum": dict(num_byzantine=1),
    "bulyan": dict(num_byzantine=1), "dnc": dict(num_byzantine=1),
}
# Every aggregator once; the sum-type ones carry the client stages that stream with them.
# Each streaming case compiles two rounds, so the client stages are combined: every
# stage that can run before a sum appears in at least one case.
CASES = [{"aggregator": name, **AGGREGATOR_OPTIONS.get(name, {})}
         for name in registry.family("aggregators").names
         if name not in ("mean", "dp_fedavg")] + [
    # DP-FedAvg with a fixed bound after the norm filter, clipping and a quantiser.
    dict(aggregator="dp_fedavg", norm_bound=0.4, clip_norm=0.3, noise_multiplier=1.0,
         quantize_bits=4),
    dict(top_k_fraction=0.2, clip_norm=0.3, adaptive_clipping=True),  # non-private mean
    dict(aggregator="dp_fedavg", clip_norm=0.3, noise_multiplier=1.0,
         adaptive_clipping=True, sampling="poisson", sampling_rate=0.25),
    dict(attack="sign_flip", num_malicious=10),  # the poisoning observer's partial sums
    dict(attack="ipm", num_malicious=10),  # a COHORT stage: stacked
]


def _ids(case):
    return "-".join(f"{k}={v}" for k, v in case.items())


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_streaming_equals_stacked(case):
    exp = assemble(make_config({**SMALL, **case}))
    observers = [exp.adversary.observer] if exp.adversary.observer else []
    rounds = [exp.round]
    if exp.round.streaming:
        rounds.append(make_round(exp.algorithm, exp.sampler, chunk_size=5,
                                 observers=observers, streaming=False))
    else:  # Nothing to compare: say why, and that it is not a sum-type chain.
        assert exp.round.why_stacked
        return
    results = []
    for fr in rounds:
        state = fr.init(jax.random.key(0))
        for r in range(2):
            state, out = fr.step(state, exp.data.population, jax.random.key(10 + r))
        results.append((state, jax.device_get(out.metrics)))
    (s1, m1), (s2, m2) = results
    for a, b in zip(jax.tree.leaves((s1.params, s1.aggregator)),
                    jax.tree.leaves((s2.params, s2.aggregator))):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)
    assert m1.keys() == m2.keys()
    for k in m1:
        np.testing.assert_allclose(m1[k], m2[k], rtol=2e-5, atol=2e-6, err_msg=k)
