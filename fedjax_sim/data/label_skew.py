"""A procedural label-skewed population: shared classes, Dirichlet label mix per client.

Every client solves the same task (so a single global model can be good, unlike FedProx
Synthetic(alpha, beta) whose per-client softmax models make a global model's ceiling low
at 10^4 clients), but clients see very different label mixtures -- the label-skew
non-IID setting of Hsu et al. 2019, generated per client inside jit:

* class means ``mu_c ~ N(0, separation^2 I_d)``, shared by the population;
* client k: label proportions ``p_k ~ Dir(alpha 1_c)``; size
  ``n_k = min(floor(LogNormal(size_mean, size_sigma)) + min_examples, max_examples)``;
* each example: ``y ~ Categorical(p_k)``, ``x = mu_y + N(0, I_d)``.

The Bayes-optimal classifier is linear (equal isotropic covariances), so softmax
regression can reach the Bayes accuracy; :meth:`ProceduralLabelSkew.bayes_accuracy`
estimates it by Monte Carlo. Small ``alpha`` concentrates each client on few classes.
Held-out examples of a client come from an independent key stream with the same
``p_k``. The draws use the counter-based samplers of :mod:`fedjax_sim.data.draws`,
which compile into the round several times faster than ``jax.random``'s.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from fedjax_sim._validation import check_float, check_int
from fedjax_sim.compile_options import one_off_jit
from fedjax_sim.data import draws
from fedjax_sim.data.federated import ClientData

_MODEL, _SIZE, _TRAIN, _TEST = range(4)


@struct.dataclass
class ProceduralLabelSkew:
    """Label-skewed Gaussian-mixture population generated from (key, client id) in jit.

    Attributes:
      key_data: raw uint32 data of the population key (a pytree leaf).
      num_clients, dim, num_classes, max_examples, min_examples: static sizes.
      alpha: Dirichlet concentration of each client's label mix.
      separation: std of the class-mean entries (larger = easier task).
      size_mean, size_sigma: log-normal client-size parameters.
    """

    key_data: jax.Array
    num_clients: int = struct.field(pytree_node=False)
    alpha: float = struct.field(pytree_node=False)
    dim: int = struct.field(pytree_node=False, default=60)
    num_classes: int = struct.field(pytree_node=False, default=10)
    max_examples: int = struct.field(pytree_node=False, default=64)
    min_examples: int = struct.field(pytree_node=False, default=10)
    size_mean: float = struct.field(pytree_node=False, default=3.0)
    size_sigma: float = struct.field(pytree_node=False, default=1.0)
    separation: float = struct.field(pytree_node=False, default=0.3)

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def _key(self, stream: int) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.key_data), stream)

    def class_means(self) -> jax.Array:
        """``[num_classes, dim]`` shared class means."""
        return self.separation * draws.normal(self._key(_MODEL), (self.num_classes, self.dim))

    def label_proportions(self, client_id: jax.Array) -> jax.Array:
        """Client ``client_id``'s label mix ``p_k`` (``[num_classes]``)."""
        key = jax.random.fold_in(self._key(_MODEL), client_id + 1)
        return draws.dirichlet(key, jnp.full((self.num_classes,), self.alpha, jnp.float32))

    def client_size(self, client_id: jax.Array) -> jax.Array:
        z = draws.normal(jax.random.fold_in(self._key(_SIZE), client_id), (1,))[0]
        n = jnp.floor(jnp.exp(self.size_mean + self.size_sigma * z)) + self.min_examples
        return jnp.minimum(n, self.max_examples).astype(jnp.int32)

    def _examples(self, stream: int, client_id: jax.Array, n: int):
        key = jax.random.fold_in(self._key(stream), client_id)
        k_y, k_x = jax.random.split(key)
        cdf = jnp.cumsum(self.label_proportions(client_id))
        u = draws.uniform(k_y, (n,)) * cdf[-1]
        y = jnp.minimum(jnp.sum(u[:, None] >= cdf[None, :], axis=1),
                        self.num_classes - 1).astype(jnp.int32)
        x = self.class_means()[y] + draws.normal(k_x, (n, self.dim))
        return x, y

    def _cohort(self, client_ids: jax.Array, stream: int) -> ClientData:
        client_ids = jnp.asarray(client_ids, jnp.int32)
        valid = (client_ids >= 0) & (client_ids < self.num_clients)
        safe = jnp.where(valid, client_ids, 0)
        x, y = jax.vmap(lambda i: self._examples(stream, i, self.max_examples))(safe)
        counts = jnp.where(valid, jax.vmap(self.client_size)(safe), 0)
        mask = jnp.arange(self.max_examples)[None, :] < counts[:, None]
        return ClientData(x=jnp.where(mask[..., None], x, 0.0), y=jnp.where(mask, y, 0),
                          mask=mask, client_id=jnp.where(valid, client_ids, -1))

    def cohort_data(self, client_ids: jax.Array) -> ClientData:
        """Training examples of ``client_ids`` (``-1`` = padding client); traceable."""
        return self._cohort(client_ids, _TRAIN)

    def test_data(self, client_ids: jax.Array) -> ClientData:
        """Held-out examples of ``client_ids`` (same sizes and label mixes); traceable."""
        return self._cohort(client_ids, _TEST)

    def bayes_accuracy(self, num_samples: int = 100_000, *, seed: int = 0) -> float:
        """Monte-Carlo accuracy of the Bayes classifier under uniform class priors.

        One jitted program: run op by op, the ``[num_samples, classes, dim]`` differences
        were materialised (240 MB at the defaults) and each op compiled on its own."""
        return float(_bayes_accuracy(self, jax.random.key(seed), num_samples))


@one_off_jit(static_argnums=2)
def _bayes_accuracy(pop: ProceduralLabelSkew, key: jax.Array, num_samples: int) -> jax.Array:
    k_y, k_x = jax.random.split(key)
    mu = pop.class_means()
    u = draws.uniform(k_y, (num_samples,)) * pop.num_classes
    y = jnp.minimum(u.astype(jnp.int32), pop.num_classes - 1)  # float32 may round up to C
    x = mu[y] + draws.normal(k_x, (num_samples, pop.dim))
    dist = jnp.sum(jnp.square(x[:, None, :] - mu[None]), -1)
    return jnp.mean(jnp.argmin(dist, -1) == y)


def procedural_label_skew(num_clients: int, *, alpha: float, seed: Any, dim: int = 60,
                          num_classes: int = 10, max_examples: int = 64,
                          min_examples: int = 10, size_mean: float = 3.0,
                          size_sigma: float = 1.0, separation: float = 0.3
                          ) -> ProceduralLabelSkew:
    """Builds a :class:`ProceduralLabelSkew` population (validated).

    Args:
      num_clients: population size, up to ``2**31 - 2``.
      alpha: Dirichlet concentration (> 0); small = strong label skew.
      seed: non-negative integer seed.
      dim, num_classes: input dimension and number of classes.
      max_examples, min_examples: client size cap and floor.
      size_mean, size_sigma: log-normal client-size parameters.
      separation: std of the class-mean entries.

    Returns:
      The population; it stores one key and no per-client arrays.
    """
    check_int("num_clients", num_clients, min_value=1, max_value=2**31 - 2)
    check_float("alpha", alpha, min_value=0.0, min_exclusive=True)
    seed = check_int("seed", seed, min_value=0, max_value=2**32 - 1)
    check_int("dim", dim, min_value=1)
    check_int("num_classes", num_classes, min_value=2)
    check_int("max_examples", max_examples, min_value=1)
    check_int("min_examples", min_examples, min_value=1, max_value=max_examples)
    check_float("size_mean", size_mean)
    check_float("size_sigma", size_sigma, min_value=0.0)
    check_float("separation", separation, min_value=0.0, min_exclusive=True)
    key = jax.random.key(seed)
    return ProceduralLabelSkew(
        key_data=jax.random.key_data(key), num_clients=num_clients, alpha=float(alpha),
        dim=dim, num_classes=num_classes, max_examples=max_examples,
        min_examples=min_examples, size_mean=float(size_mean),
        size_sigma=float(size_sigma), separation=float(separation))
