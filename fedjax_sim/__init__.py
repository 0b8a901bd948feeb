"""fedjax_sim: a JAX-vectorised federated learning simulator.

The round lives in :mod:`fedjax_sim.rounds`; the names below are the pieces it is built
from (see README.md for the data flow).
"""

from fedjax_sim._validation import ConfigError
from fedjax_sim.algorithms import ALGORITHM_NAMES, FederatedAlgorithm, make_algorithm
from fedjax_sim.client_update import ClientConfig, ClientOutput, make_client_update
from fedjax_sim.cohort import client_mesh, map_cohort, map_reduce_cohort
from fedjax_sim.data.federated import ClientData, FederatedData
from fedjax_sim.evaluation import evaluate_clients, make_central_evaluator
from fedjax_sim.models import Model, make_model
from fedjax_sim.rounds import FederatedRound, RoundOutput, ServerState, make_round
from fedjax_sim.sampling import CyclicSampler, FixedSizeSampler, PoissonSampler

__version__ = "0.1.0"

__all__ = [
    "ALGORITHM_NAMES", "ClientConfig", "ClientData", "ClientOutput", "ConfigError",
    "CyclicSampler", "FederatedAlgorithm", "FederatedData", "FederatedRound",
    "FixedSizeSampler", "Model", "PoissonSampler", "RoundOutput", "ServerState",
    "client_mesh", "evaluate_clients", "make_algorithm", "make_central_evaluator",
    "make_client_update", "make_model", "make_round", "map_cohort", "map_reduce_cohort",
]
