"""Procedural populations: client data generated from (key, client id) inside jit.

A :class:`ProceduralSynthetic` population stores only its PRNG key (as raw uint32 key
data, an ordinary pytree leaf) and static settings. ``cohort_data(client_ids)`` generates
the cohort's examples on the fly with the FedProx Synthetic(alpha, beta) recipe of
:mod:`fedjax_sim.data.synthetic` (the same :func:`~fedjax_sim.data.synthetic.generate_client`
that the materialised generator uses), so a population of 10^8 clients costs memory only
for the cohort, and the same client id always yields the same examples.

It implements the population interface of :class:`~fedjax_sim.data.federated.FederatedData`
(``num_clients``, ``max_examples``, ``num_classes``, ``example_shape``,
``cohort_data``), so the round can take either.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from fedjax_sim._validation import check_choice, check_int, fail
from fedjax_sim.compile_options import one_off_jit
from fedjax_sim.data.federated import ClientData, FederatedData, make_federated_data
from fedjax_sim.data.synthetic import (MAX_CLIENT_ID, SyntheticConfig, SyntheticStreams,
                                       as_key, generate_client, synthetic_streams)

__all__ = ["ProceduralSynthetic", "procedural_synthetic"]


@struct.dataclass
class ProceduralSynthetic:
    """A FedProx Synthetic(alpha, beta) population generated per client inside jit.

    Client k's training examples are those of ``synthetic_fedprox`` client k before its
    train/test split (same seed and settings); its held-out examples
    (:meth:`test_data`) come from an independent key stream of the same population.

    Attributes:
      key_data: raw uint32 data of the population key (a pytree leaf).
      config: the recipe settings (static).
      num_clients: population size, at most ``2**31 - 1`` (static).
      key_impl: name of the PRNG implementation of ``key_data`` (static).
    """

    key_data: jax.Array
    config: SyntheticConfig = struct.field(pytree_node=False)
    num_clients: int = struct.field(pytree_node=False)
    key_impl: str = struct.field(pytree_node=False, default="threefry2x32")

    @property
    def max_examples(self) -> int:
        return self.config.max_examples

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def example_shape(self) -> tuple[int, ...]:
        return (self.config.dim,)

    def streams(self) -> SyntheticStreams:
        """The population's independent key streams."""
        return synthetic_streams(jax.random.wrap_key_data(self.key_data, impl=self.key_impl))

    def _generate(self, client_ids: jax.Array, *, test: bool,
                  num_examples: int | None) -> ClientData:
        client_ids = jnp.asarray(client_ids, jnp.int32)
        valid = (client_ids >= 0) & (client_ids < self.num_clients)
        safe = jnp.where(valid, client_ids, 0)
        streams = self.streams()
        x, y, count = jax.vmap(lambda i: generate_client(
            self.config, streams, i, test=test, num_examples=num_examples))(safe)
        count = jnp.where(valid, count, 0)
        mask = jnp.arange(x.shape[1])[None, :] < count[:, None]
        return ClientData(x=jnp.where(mask[..., None], x, 0.0), y=jnp.where(mask, y, 0),
                          mask=mask, client_id=jnp.where(valid, client_ids, -1))

    def cohort_data(self, client_ids: jax.Array) -> ClientData:
        """Generates the training examples of ``client_ids`` (traceable).

        Args:
          client_ids: int ``[C]`` ids; ``-1`` (or any id outside ``[0, num_clients)``)
            is a padding client with no examples.

        Returns:
          ``ClientData`` with ``x [C, max_examples, dim]``, ``y``/``mask``
          ``[C, max_examples]`` and ``client_id [C]`` (``-1`` for padding clients).
        """
        return self._generate(client_ids, test=False, num_examples=None)

    def test_data(self, client_ids: jax.Array, *, num_examples: int | None = None
                  ) -> ClientData:
        """Generates held-out examples of ``client_ids`` (traceable).

        The examples come from each client's own distribution through the population's
        test key stream, so they are independent of the training examples and the same
        on every call.

        Args:
          client_ids: int ``[C]`` ids; ``-1`` marks a padding client.
          num_examples: static; None gives each client as many test examples as it has
            training examples (padded to ``max_examples``), an int gives every client
            exactly that many (no padding).

        Returns:
          ``ClientData`` with a leading cohort axis, like :meth:`cohort_data`.
        """
        if num_examples is not None:
            num_examples = check_int("num_examples", num_examples, min_value=1)
        return self._generate(client_ids, test=True, num_examples=num_examples)

    def materialize(self, client_ids: Any, *, split: str = "train",
                    num_examples: int | None = None) -> FederatedData:
        """Host-side: the given clients' examples as a padded :class:`FederatedData`.

        Args:
          client_ids: ids in ``[0, num_clients)``; client k of the result is
            ``client_ids[k]``.
          split: ``"train"`` (as :meth:`cohort_data`) or ``"test"`` (as
            :meth:`test_data`).
          num_examples: for ``split="test"``, as in :meth:`test_data`.

        Returns:
          The materialised clients.
        """
        check_choice("split", split, ("train", "test"))
        ids = np.asarray(client_ids)
        if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            fail("client_ids", f"<{ids.dtype} {ids.shape}>",
                 "must be a non-empty one-dimensional integer array")
        if ids.min() < 0 or ids.max() >= self.num_clients:
            bad = ids[(ids < 0) | (ids >= self.num_clients)][0]
            fail("client_ids", int(bad), f"must lie in [0, {self.num_clients})")
        if split == "train" and num_examples is not None:
            fail("num_examples", num_examples, "applies to split='test' only")
        ids = jnp.asarray(ids, jnp.int32)
        data = (_jit_cohort_data(self, ids) if split == "train" else
                _jit_test_data(self, ids, num_examples=num_examples))
        counts = np.asarray(data.mask).sum(axis=1).astype(np.int32)
        return make_federated_data(np.asarray(data.x), np.asarray(data.y), counts,
                                   num_classes=self.num_classes)


@one_off_jit
def _jit_cohort_data(population: ProceduralSynthetic, client_ids: jax.Array) -> ClientData:
    return population.cohort_data(client_ids)


@one_off_jit(static_argnames="num_examples")
def _jit_test_data(population: ProceduralSynthetic, client_ids: jax.Array,
                   num_examples: int | None) -> ClientData:
    return population.test_data(client_ids, num_examples=num_examples)


def procedural_synthetic(num_clients: int, *, alpha: float, beta: float, seed: Any,
                         iid: bool = False, max_examples: int = 1000,
                         min_examples: int = 50, size_mean: float = 4.0,
                         size_sigma: float = 2.0, dim: int = 60,
                         num_classes: int = 10) -> ProceduralSynthetic:
    """Builds a procedural FedProx Synthetic(alpha, beta) population.

    Args:
      num_clients: population size, ``1 <= num_clients <= 2**31 - 1`` (int32 ids).
      alpha: model heterogeneity (std of ``u_k``, >= 0).
      beta: feature heterogeneity (std of ``B_k``, >= 0).
      seed: non-negative int, PRNG key, or raw uint32 key data.
      iid: the IID variant (shared model, zero feature mean).
      max_examples: cap on a client's size and the padded size.
      min_examples: least client size.
      size_mean, size_sigma: log-normal size parameters.
      dim, num_classes: input dimension and number of classes.

    Returns:
      The population; it holds one key and no per-client state.
    """
    config = SyntheticConfig(alpha=alpha, beta=beta, iid=iid, dim=dim,
                             num_classes=num_classes, size_mean=size_mean,
                             size_sigma=size_sigma, min_examples=min_examples,
                             max_examples=max_examples)
    num_clients = check_int("num_clients", num_clients, min_value=1,
                            max_value=MAX_CLIENT_ID)
    key = as_key(seed)
    return ProceduralSynthetic(key_data=jax.random.key_data(key), config=config,
                               num_clients=num_clients,
                               key_impl=str(jax.random.key_impl(key)))
