"""The FedProx Synthetic(alpha, beta) dataset, generated per client in JAX.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (FedProx), Sec. 5.1,
and their ``data/synthetic_*/generate_synthetic.py`` / ``synthetic_iid/generate_iid.py``.
For client k, with ``d = 60`` features and ``c = 10`` classes:

* ``u_k ~ N(0, alpha^2)``, ``B_k ~ N(0, beta^2)``;
* ``W_k[i, j] ~ N(u_k, 1)`` (shape ``[d, c]``), ``b_k[j] ~ N(u_k, 1)``;
* ``v_k[i] ~ N(B_k, 1)``; ``x ~ N(v_k, Sigma)`` with diagonal ``Sigma_jj = j^-1.2``;
* ``y = argmax(softmax(W_k^T x + b_k)) = argmax(W_k^T x + b_k)``.

``alpha`` and ``beta`` are standard deviations, as in the authors' code
(``np.random.normal(0, alpha)``); the paper's text says "variance" but its experiments
(alpha, beta in {0, 0.5, 1}) were produced by the code. The IID variant follows
``generate_iid.py``: one shared ``W, b ~ N(0, 1)`` for all clients and ``v_k = 0``
(alpha and beta are then unused).

Client sizes follow the authors' ``int(LogNormal(4, 2)) + 50``, parameterised as
``min(floor(LogNormal(size_mean, size_sigma)) + min_examples, max_examples)``. The cap
``max_examples`` is ours: the log-normal tail is heavy (about 8% of clients exceed 1000
examples with the defaults), and every client is padded to the cap, so the cap bounds
memory at the cost of truncating the tail. The authors then keep ``int(0.9 n_k)`` of a
client's examples for training and the rest for testing; ``test_fraction`` sets that.

The per-client functions here are the single source of the recipe: the materialised
:func:`synthetic_fedprox` and the procedural population
(:mod:`fedjax_sim.data.procedural`) both call :func:`generate_client`, so client k of a
procedural population with the same seed and config holds exactly the examples that
:func:`synthetic_fedprox` splits into client k's train and test sets.

Keys: the population key is split into four streams (per-client model and size, training
examples, the shared IID model, held-out test examples); a client's key in a stream is
``fold_in(stream, client_id)``. The normals are drawn with :mod:`fedjax_sim.data.draws`
(counter-based, several times cheaper to compile into the round than ``jax.random``'s).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_sim._validation import check_float, check_int, fail
from fedjax_sim.compile_options import one_off_jit
from fedjax_sim.data import draws
from fedjax_sim.data.federated import make_federated_data
from fedjax_sim.data.split import FederatedSplit

__all__ = [
    "SyntheticClientModel",
    "SyntheticConfig",
    "SyntheticStreams",
    "as_key",
    "feature_variances",
    "generate_client",
    "synthetic_client_examples",
    "synthetic_client_model",
    "synthetic_client_size",
    "synthetic_fedprox",
    "synthetic_streams",
]

MAX_CLIENT_ID = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Static settings of the Synthetic(alpha, beta) recipe (hashable, validated).

    Attributes:
      alpha: std of the per-client model mean ``u_k`` (>= 0); model heterogeneity.
      beta: std of the per-client feature mean ``B_k`` (>= 0); feature heterogeneity.
      iid: use the shared-model, zero-mean-feature IID variant.
      dim: input dimension (60 in the paper).
      num_classes: number of classes (10 in the paper).
      size_mean: mean of the log of the log-normal size draw (4 in the paper).
      size_sigma: std of the log of the log-normal size draw (2 in the paper).
      min_examples: added to every size draw and the least size (50 in the paper).
      max_examples: cap on a client's size and the padded size.
    """

    alpha: float
    beta: float
    iid: bool = False
    dim: int = 60
    num_classes: int = 10
    size_mean: float = 4.0
    size_sigma: float = 2.0
    min_examples: int = 50
    max_examples: int = 1000

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
        set_("alpha", check_float("alpha", self.alpha, min_value=0.0))
        set_("beta", check_float("beta", self.beta, min_value=0.0))
        if not isinstance(self.iid, (bool, np.bool_)):
            fail("iid", self.iid, "must be a bool")
        set_("iid", bool(self.iid))
        set_("dim", check_int("dim", self.dim, min_value=1))
        set_("num_classes", check_int("num_classes", self.num_classes, min_value=2))
        set_("size_mean", check_float("size_mean", self.size_mean))
        set_("size_sigma", check_float("size_sigma", self.size_sigma, min_value=0.0))
        set_("min_examples", check_int("min_examples", self.min_examples, min_value=1))
        set_("max_examples", check_int("max_examples", self.max_examples, min_value=1))
        if self.max_examples < self.min_examples:
            fail("max_examples", self.max_examples,
                 f"must be >= min_examples={self.min_examples}")


class SyntheticClientModel(NamedTuple):
    """One client's generating model: ``x ~ N(v, Sigma)``, ``y = argmax(x @ w + b)``."""

    w: jax.Array  # [dim, num_classes]
    b: jax.Array  # [num_classes]
    v: jax.Array  # [dim]


class SyntheticStreams(NamedTuple):
    """Independent key streams of a population (see the module docstring)."""

    client: jax.Array
    train: jax.Array
    shared: jax.Array
    test: jax.Array


def as_key(seed: Any, field: str = "seed") -> jax.Array:
    """A typed PRNG key from an int seed, a typed key, or raw uint32 key data."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(check_int(field, seed, min_value=0))
    if isinstance(seed, jax.Array) and jax.dtypes.issubdtype(seed.dtype,
                                                             jax.dtypes.prng_key):
        if seed.shape != ():
            fail(f"{field}.shape", seed.shape, "must be a single key")
        return seed
    arr = np.asarray(seed) if not isinstance(seed, jax.Array) else seed
    if getattr(arr, "dtype", None) == np.uint32 and arr.shape == (2,):
        return jax.random.wrap_key_data(jnp.asarray(arr))
    fail(field, seed, "must be a non-negative int, a PRNG key, or uint32 key data [2]")
    raise AssertionError("unreachable")


def synthetic_streams(key: jax.Array) -> SyntheticStreams:
    """Splits a population key into its four independent streams."""
    return SyntheticStreams(*jax.random.split(key, 4))


def feature_variances(dim: int) -> jax.Array:
    """Diagonal of Sigma: ``j^-1.2`` for ``j = 1..dim`` (float32 ``[dim]``)."""
    return jnp.arange(1, dim + 1, dtype=jnp.float32) ** -1.2


def _client_draw(config: SyntheticConfig, streams: SyntheticStreams,
                 client_id: jax.Array) -> jax.Array:
    """The client's one normal vector ``[size z, u z, B z, W, b, v]``.

    A single draw per client, sliced into its pieces, compiles several times faster on
    CPU than one draw per piece under vmap (each draw is a separate threefry kernel).
    """
    d, c = config.dim, config.num_classes
    return draws.normal(jax.random.fold_in(streams.client, client_id),
                        (3 + d * c + c + d,))


def _model_from_draw(config: SyntheticConfig, streams: SyntheticStreams,
                     z: jax.Array) -> SyntheticClientModel:
    d, c = config.dim, config.num_classes
    if config.iid:
        shared = draws.normal(streams.shared, (d * c + c,))
        return SyntheticClientModel(w=shared[:d * c].reshape(d, c), b=shared[d * c:],
                                    v=jnp.zeros((d,), jnp.float32))
    u = config.alpha * z[1]
    big_b = config.beta * z[2]
    w, b, v = z[3:3 + d * c], z[3 + d * c:3 + d * c + c], z[3 + d * c + c:]
    return SyntheticClientModel(w=u + w.reshape(d, c), b=u + b, v=big_b + v)


def _size_from_draw(config: SyntheticConfig, z: jax.Array) -> jax.Array:
    draw = jnp.exp(config.size_mean + config.size_sigma * z[0])
    draw = jnp.floor(jnp.minimum(draw, float(config.max_examples)))  # no int overflow
    return jnp.minimum(draw.astype(jnp.int32) + config.min_examples, config.max_examples)


def synthetic_client_model(config: SyntheticConfig, streams: SyntheticStreams,
                           client_id: jax.Array) -> SyntheticClientModel:
    """Client ``client_id``'s generating model (W_k, b_k, v_k); traceable, vmappable.

    Args:
      config: the recipe settings.
      streams: the population's key streams.
      client_id: int32 scalar client id (>= 0).

    Returns:
      The client's generating model.
    """
    return _model_from_draw(config, streams, _client_draw(config, streams, client_id))


def synthetic_client_size(config: SyntheticConfig, streams: SyntheticStreams,
                          client_id: jax.Array) -> jax.Array:
    """Client ``client_id``'s example count, ``min(floor(LogNormal) + min, max)`` (int32)."""
    return _size_from_draw(config, _client_draw(config, streams, client_id))


def synthetic_client_examples(model: SyntheticClientModel, key: jax.Array,
                              num_examples: int) -> tuple[jax.Array, jax.Array]:
    """Draws ``num_examples`` labelled examples from one client's model.

    Args:
      model: the client's generating model.
      key: example key.
      num_examples: static number of examples.

    Returns:
      ``x`` float32 ``[num_examples, dim]`` and ``y`` int32 ``[num_examples]``.
    """
    dim = model.v.shape[0]
    z = draws.normal(key, (num_examples, dim))
    x = model.v[None, :] + jnp.sqrt(feature_variances(dim))[None, :] * z
    y = jnp.argmax(x @ model.w + model.b[None, :], axis=-1).astype(jnp.int32)
    return x, y


def generate_client(config: SyntheticConfig, streams: SyntheticStreams,
                    client_id: jax.Array, *, test: bool = False,
                    num_examples: int | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One client's padded examples; the single implementation of the recipe.

    Args:
      config: the recipe settings.
      streams: the population's key streams.
      client_id: int32 scalar client id (>= 0).
      test: draw from the held-out stream instead of the training stream.
      num_examples: static padded size; None means ``config.max_examples`` with the
        client's drawn size as its count, an int means exactly that many real examples.

    Returns:
      ``x [N, dim]`` (zero in padding), ``y [N]`` (zero in padding), int32 ``count``.
    """
    z = _client_draw(config, streams, client_id)
    model = _model_from_draw(config, streams, z)
    stream = streams.test if test else streams.train
    if num_examples is None:
        size = config.max_examples
        count = _size_from_draw(config, z)
    else:
        size = num_examples
        count = jnp.asarray(num_examples, jnp.int32)
    x, y = synthetic_client_examples(model, jax.random.fold_in(stream, client_id), size)
    mask = jnp.arange(size) < count
    return jnp.where(mask[:, None], x, 0.0), jnp.where(mask, y, 0), count


def _chunk_size(config: SyntheticConfig, num_clients: int,
                budget_bytes: int = 1 << 26) -> int:
    """Clients per generation chunk: a power of two (few compiled shapes), memory-bounded."""
    budget = max(1, budget_bytes // (4 * config.max_examples * config.dim))
    chunk = 1
    while chunk * 2 <= budget and chunk < num_clients:
        chunk *= 2
    return chunk


@one_off_jit(static_argnames="config")
def _client_sizes(config: SyntheticConfig, streams: SyntheticStreams,
                  client_ids: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: synthetic_client_size(config, streams, i))(client_ids)


@one_off_jit(static_argnames="config")
def _client_examples(config: SyntheticConfig, streams: SyntheticStreams,
                     client_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.vmap(lambda i: generate_client(config, streams, i)[:2])(client_ids)


def synthetic_fedprox(num_clients: int, *, alpha: float, beta: float, seed: Any,
                      iid: bool = False, test_fraction: float = 0.1,
                      max_examples: int = 1000, min_examples: int = 50,
                      size_mean: float = 4.0, size_sigma: float = 2.0, dim: int = 60,
                      num_classes: int = 10) -> FederatedSplit:
    """Materialises FedProx Synthetic(alpha, beta) with a per-client train/test split.

    Client k draws ``n_k`` examples; the first ``floor((1 - test_fraction) n_k)`` are its
    training set and the rest its test set (the authors' 90/10 split by default).
    Memory is ``num_clients * max_examples * dim`` floats; for large populations use
    :func:`fedjax_sim.data.procedural.procedural_synthetic`.

    Args:
      num_clients: number of clients (>= 1).
      alpha: model heterogeneity (std of ``u_k``, >= 0).
      beta: feature heterogeneity (std of ``B_k``, >= 0).
      seed: non-negative int or PRNG key.
      iid: the IID variant (shared model, zero feature mean).
      test_fraction: fraction of each client's examples held out, in ``(0, 1)``.
      max_examples: cap on a client's total (train + test) size.
      min_examples: least total size; must leave every client a training example.
      size_mean, size_sigma: log-normal size parameters.
      dim, num_classes: input dimension and number of classes.

    Returns:
      ``FederatedSplit(train, test)``; client k of ``test`` is client k of ``train``.
    """
    config = SyntheticConfig(alpha=alpha, beta=beta, iid=iid, dim=dim,
                             num_classes=num_classes, size_mean=size_mean,
                             size_sigma=size_sigma, min_examples=min_examples,
                             max_examples=max_examples)
    num_clients = check_int("num_clients", num_clients, min_value=1,
                            max_value=MAX_CLIENT_ID)
    test_fraction = check_float("test_fraction", test_fraction, min_value=0.0,
                                max_value=1.0, min_exclusive=True, max_exclusive=True)
    if int((1.0 - test_fraction) * min_examples) < 1:
        fail("test_fraction", test_fraction,
             f"leaves no training example for a client of min_examples={min_examples}")
    streams = synthetic_streams(as_key(seed))
    ids = jnp.arange(num_clients, dtype=jnp.int32)
    sizes = np.asarray(_client_sizes(config, streams, ids)).astype(np.int64)
    train_counts = np.floor((1.0 - test_fraction) * sizes).astype(np.int64)
    test_counts = sizes - train_counts
    n_train, n_test = int(train_counts.max()), max(1, int(test_counts.max()))
    train_x = np.zeros((num_clients, n_train, dim), np.float32)
    train_y = np.zeros((num_clients, n_train), np.int32)
    test_x = np.zeros((num_clients, n_test, dim), np.float32)
    test_y = np.zeros((num_clients, n_test), np.int32)
    chunk = _chunk_size(config, num_clients)
    for start in range(0, num_clients, chunk):
        stop = min(start + chunk, num_clients)
        chunk_ids = jnp.arange(start, start + chunk, dtype=jnp.int32)  # fixed shape
        x, y = (np.asarray(a)[:stop - start]
                for a in _client_examples(config, streams, chunk_ids))
        for j, k in enumerate(range(start, stop)):
            t, n = train_counts[k], sizes[k]
            train_x[k, :t], train_y[k, :t] = x[j, :t], y[j, :t]
            test_x[k, :n - t], test_y[k, :n - t] = x[j, t:n], y[j, t:n]
    train = make_federated_data(train_x, train_y, train_counts.astype(np.int32),
                                num_classes=num_classes)
    test = make_federated_data(test_x, test_y, test_counts.astype(np.int32),
                               num_classes=num_classes)
    return FederatedSplit(train=train, test=test)
