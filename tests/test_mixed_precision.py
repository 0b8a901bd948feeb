"""Mixed precision (``compute_dtype="bfloat16"``): bfloat16 forward and backward passes,
float32 params, gradients, deltas and server state, and training as accurate as float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_sim as fs
from fedjax_sim.experiment.config import make_config


@pytest.mark.parametrize("name,shape", [("softmax", (12,)), ("mlp", (12,)),
                                        ("cnn", (8, 8, 1))])
def test_bfloat16_loss_and_gradient_track_float32(name, shape):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16,) + shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 16), jnp.int32)
    full = fs.make_model(name, shape, 4, hidden=(16,))
    mixed = fs.make_model(name, shape, 4, hidden=(16,), compute_dtype="bfloat16")
    params = full.init(jax.random.key(1))

    def loss_and_grad(model):
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.mean(model.per_example_loss(p, x, y))))(params)

    (l32, g32), (l16, g16) = loss_and_grad(full), loss_and_grad(mixed)
    assert mixed.apply(params, x).dtype == jnp.float32
    assert {a.dtype for a in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
    assert float(l16) == pytest.approx(float(l32), rel=2e-2)
    a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g32)])
    b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(g16)])
    # bfloat16 keeps 8 bits of mantissa: the gradient keeps its direction and size.
    assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
    assert np.linalg.norm(b) == pytest.approx(np.linalg.norm(a), rel=5e-2)


@pytest.mark.slow
def test_bfloat16_fedavg_reaches_float32_accuracy():
    pop = fs.data.procedural_label_skew(300, alpha=0.5, seed=0, max_examples=32)
    test = pop.test_data(jnp.arange(300, dtype=jnp.int32))
    x, y = np.asarray(test.x)[np.asarray(test.mask)], np.asarray(test.y)[np.asarray(test.mask)]
    accuracy = {}
    for dtype in ("float32", "bfloat16"):
        model = fs.make_model("softmax", pop.example_shape, pop.num_classes,
                              compute_dtype=dtype)
        alg = fs.make_algorithm("fedavgm", model, client_lr=0.1, local_epochs=1,
                                batch_size=8, server_momentum=0.5)
        fr = fs.make_round(alg, fs.FixedSizeSampler(300, 30))
        state = fr.init(jax.random.key(0))
        for r in range(12):
            state, _ = fr.step(state, pop, jax.random.fold_in(jax.random.key(1), r))
        for leaf in jax.tree.leaves((state.params, state.server)):
            assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
        accuracy[dtype] = fs.make_central_evaluator(model)(state.params, x, y)["accuracy"]
    assert accuracy["float32"] > 0.5  # it learned something to compare
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) < 0.02, accuracy


def test_compute_dtype_is_a_validated_config_field():
    assert make_config({"compute_dtype": "bfloat16"}).model.compute_dtype == "bfloat16"
    with pytest.raises(fs.ConfigError, match="compute_dtype"):
        make_config({"compute_dtype": "float16"})
    with pytest.raises(fs.ConfigError, match="compute_dtype"):
        fs.make_model("softmax", (3,), 2, compute_dtype="int8")
