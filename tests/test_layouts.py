"""The layer layouts of ``fedjax_sim._layouts`` change no value and no derivative.

Each layout is compared with the plain ``lax`` op it replaces: values, gradients, JVPs,
second derivatives and vmapped gradients, on every branch (small and large batches,
narrow and wide Dense layers, the convolution's padding, stride and dilation cases, and
the fallbacks).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from fedjax_sim._layouts import patch_conv
from fedjax_sim.models import make_model


def _close(a, b, rtol=1e-4, atol=1e-5):
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


def _add_bias(y, b):
    """``y + b`` with the bias broadcast over the leading axes explicitly."""
    return y + b.reshape((1,) * (y.ndim - 1) + (-1,))


@pytest.mark.parametrize("batch,hidden", [((10,), 5), ((3, 4), 5), ((300,), 5),
                                          ((10,), 16)])  # hidden layer wider than the batch
def test_dense_layout_trick_changes_no_derivative(batch, hidden):
    """Values, gradients, JVPs and second derivatives equal plain ``x @ w + b`` ReLU MLPs,
    on every weight-gradient layout (narrow and wide layers, small and large batches)."""
    model = make_model("mlp", (6,), 4, hidden=(hidden,))
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), batch + (6,))

    def plain(p, x):
        h = jax.nn.relu(_add_bias(x @ p["Dense_0"]["kernel"], p["Dense_0"]["bias"]))
        return _add_bias(h @ p["Dense_1"]["kernel"], p["Dense_1"]["bias"])

    def loss(f):
        return lambda p: jnp.sum(jnp.tanh(f(p, x)) ** 2)

    _close(model.apply(params, x), plain(params, x))
    _close(jax.grad(loss(model.apply))(params), jax.grad(loss(plain))(params))
    _close(jax.jvp(loss(model.apply), (params,), (params,)),
          jax.jvp(loss(plain), (params,), (params,)))
    _close(jax.grad(lambda p: optax.tree.norm(jax.grad(loss(model.apply))(p)))(params),
          jax.grad(lambda p: optax.tree.norm(jax.grad(loss(plain))(p)))(params))
    _close(jax.vmap(jax.grad(loss(model.apply)))(jax.tree.map(lambda a: a[None], params)),
          jax.vmap(jax.grad(loss(plain)))(jax.tree.map(lambda a: a[None], params)))


CONV_CASES = [
    # (batch, spatial in, channels in/out, window, strides, padding, kernel dilation)
    ((10,), (8, 8), (1, 4), (3, 3), (1, 1), "SAME", (1, 1)),
    ((3,), (9, 7), (3, 5), (3, 2), (2, 1), "VALID", (1, 1)),
    ((3,), (9, 7), (3, 5), (3, 3), (2, 2), ((1, 2), (0, 1)), (2, 1)),
    ((4,), (11,), (2, 3), (5,), (3,), "SAME", (2,)),  # one spatial axis
    ((2, 3), (6, 6), (2, 3), (1, 1), (1, 1), "SAME", (1, 1)),  # 1x1 window
    ((300,), (5, 5), (2, 3), (3, 3), (1, 1), "SAME", (1, 1)),  # a large batch
]


@pytest.mark.parametrize("batch,spatial,channels,window,strides,padding,dilation",
                         CONV_CASES)
def test_patch_conv_equals_lax_conv(batch, spatial, channels, window, strides, padding,
                                    dilation):
    nsp = len(spatial)
    names = "HWD"[:nsp]
    dn = ("N" + names + "C", names + "IO", "N" + names + "C")
    x = jax.random.normal(jax.random.key(0), (int(np.prod(batch)),) + spatial
                          + (channels[0],))
    w = jax.random.normal(jax.random.key(1), window + channels)

    def conv(fn):
        return lambda x, w: fn(x, w, strides, padding, rhs_dilation=dilation,
                               dimension_numbers=dn)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.tanh(conv(fn)(x, w)) ** 2)

    def derivatives(x, w, fn):
        return (conv(fn)(x, w), jax.grad(loss(fn), (0, 1))(x, w),
                jax.jvp(loss(fn), (x, w), (x, w)),
                jax.grad(lambda w: optax.tree.norm(jax.grad(loss(fn))(x, w)))(w))

    derivatives = jax.jit(derivatives, static_argnums=2)
    _close(derivatives(x, w, patch_conv), derivatives(x, w, lax.conv_general_dilated))


def test_patch_conv_vmapped_over_per_client_kernels_equals_a_loop():
    xs = jax.random.normal(jax.random.key(0), (5, 10, 8, 8, 2))
    ws = jax.random.normal(jax.random.key(1), (5, 3, 3, 2, 4))
    dn = ("NHWC", "HWIO", "NHWC")

    def grad(fn, x, w):
        return jax.grad(lambda w: jnp.sum(jnp.sin(fn(x, w, (1, 1), "SAME",
                                                     dimension_numbers=dn))))(w)

    batched = jax.vmap(lambda x, w: grad(patch_conv, x, w))(xs, ws)
    for k in range(5):
        _close(batched[k], grad(lax.conv_general_dilated, xs[k], ws[k]))


@pytest.mark.parametrize("kwargs", [dict(feature_group_count=2), dict(lhs_dilation=(2, 2)),
                                    dict(precision=lax.Precision.HIGHEST)])
def test_patch_conv_falls_back_to_lax_where_it_does_not_apply(kwargs):
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 4))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4 // kwargs.get("feature_group_count", 1), 6))
    args = (x, w, (1, 1), ((1, 1), (1, 1)))
    dn = dict(dimension_numbers=("NHWC", "HWIO", "NHWC"))
    _close(patch_conv(*args, **dn, **kwargs), lax.conv_general_dilated(*args, **dn, **kwargs))


def test_nchw_layout_falls_back_to_lax():
    x = jax.random.normal(jax.random.key(0), (2, 3, 7, 7))
    w = jax.random.normal(jax.random.key(1), (5, 3, 3, 3))
    dn = ("NCHW", "OIHW", "NCHW")
    _close(patch_conv(x, w, (1, 1), "SAME", dimension_numbers=dn),
           lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn))


def test_cnn_model_equals_a_plain_lax_cnn():
    model = make_model("cnn", (8, 8, 1), 5)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (10, 8, 8, 1))
    dn = ("NHWC", "HWIO", "NHWC")

    def plain(p, x):
        for name in ("Conv_0", "Conv_1"):
            x = _add_bias(lax.conv_general_dilated(x, p[name]["kernel"], (1, 1), "SAME",
                                                   dimension_numbers=dn), p[name]["bias"])
            x = jax.nn.relu(x)
            x = lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "SAME") / 4
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(_add_bias(x @ p["Dense_0"]["kernel"], p["Dense_0"]["bias"]))
        return _add_bias(x @ p["Dense_1"]["kernel"], p["Dense_1"]["bias"])

    def value_and_grad(f):
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(jax.nn.log_softmax(f(p, x))[:, 0])))(params)

    _close(jax.jit(model.apply)(params, x), jax.jit(plain)(params, x))
    _close(value_and_grad(model.apply), value_and_grad(plain))
