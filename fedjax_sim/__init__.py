"""fedjax_sim: a JAX-vectorised federated learning simulator."""

__version__ = "0.1.0"
