"""Canary auditing inside a DP run: canary clients upload their direction at the clip
norm and are left out of the training metrics; the estimate and the one-run bound sit
next to the accountant's epsilon and never exceed it."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import fedjax_sim as fs
from fedjax_sim.privacy.auditing import canary_direction

DP_DIGITS = {"data": "digits", "partition": "iid", "num_clients": 1400, "cohort_size": 100,
             "model": "softmax", "algorithm": "fedavg", "local_epochs": 1, "batch_size": 4,
             "aggregator": "dp_fedavg", "clip_norm": 0.5, "noise_multiplier": 1.0,
             "canaries": 200, "seed": 5}


def test_canary_clients_send_their_direction_and_stay_out_of_the_training_metrics():
    exp = fs.assemble(fs.make_config(dict(DP_DIGITS, rounds=1)))
    canaries = exp.canaries
    assert canaries.num == 200 and 2 <= canaries.client_ids.size <= 198
    state = exp.round.init(jax.random.key(0))
    pop = exp.data.population
    _, out = exp.round.step(state, pop, jax.random.key(7))
    ids = np.asarray(out.client_ids)
    sampled = ids[ids >= 0]
    is_canary = np.isin(sampled, canaries.client_ids)
    assert 0 < is_canary.sum() < len(sampled)  # the round samples both kinds
    cm = {k: np.asarray(v)[ids >= 0] for k, v in out.client_metrics.items()}
    np.testing.assert_array_equal(cm["num_examples"][is_canary], 0.0)
    np.testing.assert_allclose(cm["update_norm"][is_canary], 0.5, rtol=1e-5)
    np.testing.assert_array_equal(cm["weight"][is_canary], 1.0)
    # The round's training metrics are those of the real clients alone.
    real = sampled[~is_canary]
    counts = np.asarray(pop.cohort_data(jnp.asarray(real)).mask).sum(axis=1)
    assert float(out.metrics["num_examples"]) == float(counts.sum())
    np.testing.assert_allclose(float(out.metrics["train_loss"]), float(
        np.sum(cm["train_loss"][~is_canary] * counts) / counts.sum()), rtol=1e-5)
    # A canary client's upload is its direction at the clip norm, whatever its data.
    cid = int(sampled[is_canary][0])
    j = int(canaries.inserted_index[np.searchsorted(canaries.client_ids, cid)])
    data = jax.tree.map(lambda a: a[0], pop.cohort_data(jnp.asarray([cid])))
    res = jax.jit(exp.algorithm.client.update)(state.params, data, jax.random.key(1), ())
    flat = np.asarray(ravel_pytree(res.upload)[0])
    want = 0.5 * np.asarray(canary_direction(canaries.key, j, flat.size))
    np.testing.assert_allclose(flat, want, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_on_dp_fedavg_the_estimate_and_the_bound_stay_below_the_accountant(tmp_path):
    out = str(tmp_path / "audit")
    # The honest server watches round 1's whole cohort: canaries among its victims carry
    # no data and are left out of the scores (else iDLG would miss on their random bias).
    cfg = dict(DP_DIGITS, rounds=4, observe_rounds=(1,), victims=100, leak_attacks="labels")
    summary = fs.run_experiment(fs.make_config(cfg), output_dir=out, progress=False)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert 80 <= rows[0]["leak_victims"] < 100 and rows[0]["leak_idlg_accuracy"] == 1.0
    for row in rows:  # every round is evaluated (eval_every = 1)
        eps = row["epsilon"]
        assert 0.0 <= row["epsilon_estimate"] <= eps, row
        assert 0.0 <= row["epsilon_estimate_all_iterates"] <= eps, row
        assert 0.0 <= row["epsilon_lower_bound"] <= eps, row
    audit = summary["audit"]
    assert audit["canaries"] == 200 and audit["epsilon_accountant"] == summary["epsilon"]
    assert audit["epsilon_estimate"] == rows[-1]["epsilon_estimate"]
    assert audit["guesses_each_side"] == 25
