"""What the compiler is asked to optimise for: one-off programs and the lean round.

One-off programs (held-out data, the Bayes estimate, host-side materialisation) compile
at LLVM -O2 on CPU; the claim that makes this safe is that the optimisation level changes
no bit of what they compute, checked here against -O3 on the generator they all share
(its Gaussian draws, label sampling and Dirichlet mix). The lean round (XLA:CPU's
elemental emitters) may round differently, so it is checked against the default compile
within float32 tolerance, through the whole experiment runner.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim import compile_options as co
from fedjax_sim.data.label_skew import procedural_label_skew


def _compiled(fn, args, options, **jit_kwargs):
    return jax.jit(fn, **jit_kwargs).lower(*args).compile(compiler_options=options)(*args)


@pytest.mark.slow  # two -O3 compiles of the generator (what one-off programs avoid)
def test_one_off_level_changes_no_bit_of_generated_data():
    pop = procedural_label_skew(40, alpha=0.3, seed=5, max_examples=24)
    ids = jnp.arange(-1, 39, dtype=jnp.int32)  # a padding client too
    o3 = {"xla_backend_optimization_level": 3}
    # The held-out data (the training data is the same program on another key stream).
    fast = _compiled(pop.test_data, (ids,), co.ONE_OFF_CPU_OPTIONS)
    slow = _compiled(pop.test_data, (ids,), o3)
    for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_one_off_options_follow_backend_and_an_explicit_level(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert co.one_off_options("cpu") == co.ONE_OFF_CPU_OPTIONS
    assert co.one_off_options("gpu") == {} and co.one_off_options("tpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    assert co.one_off_options("cpu") == {}


def test_one_off_jit_builds_one_jit_with_the_options(monkeypatch):
    seen = []
    real_jit = jax.jit

    def spy(fn, **kwargs):
        seen.append(kwargs)
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(jax, "jit", spy)
    monkeypatch.setattr(co, "one_off_options", lambda backend=None: {"marker": 1})
    f = co.one_off_jit(lambda x, n: x * n, static_argnames="n")
    assert seen == []  # nothing is built before the first call (backend unknown)
    monkeypatch.setattr(co, "one_off_options", lambda backend=None: {})
    assert float(f(jnp.float32(2.0), n=3)) == 6.0 and float(f(jnp.float32(1.0), n=3)) == 3.0
    assert seen == [{"compiler_options": None, "static_argnames": "n"}]  # built once


def test_round_compiler_options():
    assert fs.round_compiler_options(False) == {}
    assert fs.round_compiler_options(True, backend="cpu") == co.LEAN_CPU_OPTIONS
    assert fs.round_compiler_options(True, backend="gpu") == {}
    with pytest.raises(fs.ConfigError, match="lean_compile"):
        fs.round_compiler_options("yes")
    with pytest.raises(fs.ConfigError, match="lean_compile"):
        fs.make_config({"lean_compile": "maybe"})


def test_a_lean_run_trains_like_the_default(tmp_path):
    base = {"data": "digits", "partition": "iid", "num_clients": 1400, "cohort_size": 10,
            "model": "mlp", "hidden": (32,), "algorithm": "fedavg", "rounds": 2, "seed": 3}
    runs = {}
    for lean in (False, True):
        out = tmp_path / f"lean_{lean}"
        summary = fs.run_experiment(fs.make_config(dict(base, lean_compile=lean)),
                                    output_dir=str(out), progress=False)
        assert summary["config"]["engine"]["lean_compile"] is lean
        runs[lean] = (summary, fs.load_params(str(out)))
    (s0, p0), (s1, p1) = runs[False], runs[True]
    assert s0["status"] == s1["status"] == "completed"
    for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)
    assert s1["final"]["test_accuracy"] == pytest.approx(s0["final"]["test_accuracy"],
                                                         abs=2e-3)


def test_initial_params_as_one_program_equal_flax_op_by_op_init():
    """The runner builds its initial params with one one-off program; flax's own init
    runs op by op. Fusing the initializers into one program must not move a bit."""
    for name, shape in (("softmax", (12,)), ("cnn", (8, 8, 1))):  # dense and conv inits
        model = fs.make_model(name, shape, 5, hidden=(7, 6))
        key = jax.random.key(11)
        fused = co.one_off_jit(model.init)(key)
        eager = model.init(key)
        assert jax.tree.structure(fused) == jax.tree.structure(eager)
        for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(eager)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
