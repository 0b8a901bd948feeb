"""fedjax_sim: a JAX-vectorised federated learning simulator.

The round lives in :mod:`fedjax_sim.rounds`; the names below are the pieces it is built
from (README.md lists them with the data flow). The experiment layer (configuration,
registries, the ``fedjax-sim`` host loop) lives in :mod:`fedjax_sim.experiment`; its
entry points are importable from here too, loaded on first use so that the library never
imports it.
"""

from fedjax_sim import algorithms, data, poisoning, privacy, server
from fedjax_sim._host import usable_cores, use_every_cpu_core
from fedjax_sim._validation import ConfigError
from fedjax_sim.algorithms import (ALGORITHM_NAMES, Algorithm, ClientProgram, ClientResult,
                                   RoundInfo, ServerProgram, make_algorithm)
from fedjax_sim.client_update import ClientConfig, epoch_order, make_local_update
from fedjax_sim.compile_cache import use_compile_cache
from fedjax_sim.compile_options import one_off_jit, round_compiler_options
from fedjax_sim.cohort import client_mesh, map_cohort, map_reduce_cohort, mesh_for
from fedjax_sim.data.federated import ClientData, FederatedData
from fedjax_sim.evaluation import evaluate_clients, make_central_evaluator
from fedjax_sim.models import Model, make_model
from fedjax_sim.observers import Observer
from fedjax_sim.rounds import FederatedRound, RoundOutput, ServerState, ServerView, make_round
from fedjax_sim.sampling import CyclicSampler, FixedSizeSampler, PoissonSampler

__version__ = "0.1.0"

_EXPERIMENT = {"ExperimentConfig": "config", "make_config": "config",
               "load_config": "config", "run_experiment": "runner",
               "build_data": "data", "assemble": "assemble", "default_delta": "server",
               "load_params": "checkpoint", "RunCheckpoints": "checkpoint",
               "TrainingDiverged": "reporters"}
_LAZY_MODULES = ("attacks", "experiment", "secagg")


def __getattr__(name: str):
    """The experiment layer's entry points and the attack lab, imported on first use
    (PEP 562): the library itself never imports the experiment layer."""
    import importlib

    if name in _EXPERIMENT:
        module = importlib.import_module(f"fedjax_sim.experiment.{_EXPERIMENT[name]}")
        return getattr(module, name)
    if name in _LAZY_MODULES:
        return importlib.import_module(f"fedjax_sim.{name}")
    raise AttributeError(f"module 'fedjax_sim' has no attribute {name!r}")


__all__ = [
    "ALGORITHM_NAMES", "Algorithm", "ClientConfig", "ClientData", "ClientProgram",
    "ClientResult", "ConfigError", "CyclicSampler", "FederatedData", "FederatedRound",
    "FixedSizeSampler", "Model", "Observer", "PoissonSampler", "RoundInfo", "RoundOutput",
    "ServerProgram", "ServerState", "ServerView", "client_mesh", "epoch_order", "evaluate_clients",
    "make_algorithm", "make_central_evaluator", "make_local_update", "make_model",
    "make_round", "map_cohort", "map_reduce_cohort", "mesh_for", "one_off_jit",
    "round_compiler_options", "usable_cores",
    "use_compile_cache", "use_every_cpu_core", "algorithms", "data",
    "poisoning", "privacy", "server", *_EXPERIMENT, *_LAZY_MODULES,
]
