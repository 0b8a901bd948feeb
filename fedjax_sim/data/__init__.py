"""Federated data: padded populations, procedural populations, partitioners, loaders.

Everything here runs on the host once, except ``cohort_data`` / ``test_data`` of a
population, which run inside the jitted round. A generator written for the round draws
with :mod:`fedjax_sim.data.draws` (counter-based samplers that compile cheaply).
"""

from fedjax_sim.data import draws
from fedjax_sim.data.digits import (DIGITS_NUM_CLASSES, digits_federated, digits_train_test,
                                    load_digits_arrays)
from fedjax_sim.data.federated import (ClientData, FederatedData, Population,
                                       federated_data_from_clients, make_federated_data)
from fedjax_sim.data.io import (LoadedFederatedData, LoadedSplit, load_leaf, load_leaf_split,
                                load_npz, save_npz)
from fedjax_sim.data.partition import (PARTITIONERS, dirichlet_partition, iid_partition,
                                       partition_by_name, partition_dataset,
                                       quantity_skew_partition,
                                       shard_partition)
from fedjax_sim.data.label_skew import ProceduralLabelSkew, procedural_label_skew
from fedjax_sim.data.procedural import ProceduralSynthetic, procedural_synthetic
from fedjax_sim.data.split import CentralTestSplit, FederatedSplit
from fedjax_sim.data.synthetic import (SyntheticClientModel, SyntheticConfig,
                                       SyntheticStreams, feature_variances, generate_client,
                                       synthetic_client_examples, synthetic_client_model,
                                       synthetic_client_size, synthetic_fedprox,
                                       synthetic_streams)

__all__ = [
    "ProceduralLabelSkew",
    "draws",
    "procedural_label_skew",
    "CentralTestSplit",
    "ClientData",
    "DIGITS_NUM_CLASSES",
    "FederatedData",
    "FederatedSplit",
    "LoadedFederatedData",
    "LoadedSplit",
    "PARTITIONERS",
    "Population",
    "ProceduralSynthetic",
    "SyntheticClientModel",
    "SyntheticConfig",
    "SyntheticStreams",
    "digits_federated",
    "digits_train_test",
    "dirichlet_partition",
    "federated_data_from_clients",
    "feature_variances",
    "generate_client",
    "iid_partition",
    "load_digits_arrays",
    "load_leaf",
    "load_leaf_split",
    "load_npz",
    "make_federated_data",
    "partition_by_name",
    "partition_dataset",
    "procedural_synthetic",
    "quantity_skew_partition",
    "save_npz",
    "shard_partition",
    "synthetic_client_examples",
    "synthetic_client_model",
    "synthetic_client_size",
    "synthetic_fedprox",
    "synthetic_streams",
]
