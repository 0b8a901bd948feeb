"""Federated algorithms as client programs plus server programs (see ``base``)."""

from fedjax_sim.algorithms.base import (Algorithm, ClientProgram, ClientResult, RoundInfo,
                                        ServerProgram)
from fedjax_sim.algorithms.fedopt import (ALGORITHM_NAMES, FEDOPT, FedOptMember,
                                          local_training_client, make_algorithm,
                                          optax_server)
# The builder stays fedjax_sim.algorithms.scaffold.scaffold: re-exporting it here would
# shadow the submodule of the same name.
from fedjax_sim.algorithms.scaffold import ScaffoldMessage, ScaffoldServerState, ScaffoldUpload
from fedjax_sim.algorithms.worker_momentum import WorkerMomentumState, with_worker_momentum

__all__ = ["ALGORITHM_NAMES", "Algorithm", "ClientProgram", "ClientResult", "FEDOPT",
           "FedOptMember", "RoundInfo", "ServerProgram", "local_training_client",
           "make_algorithm", "optax_server",
           "ScaffoldMessage", "ScaffoldServerState", "ScaffoldUpload",
           "WorkerMomentumState", "with_worker_momentum"]
