"""fedmpi: federated fine-tuning of transformer text classifiers over MPI.

Every MPI rank hosts federated clients; one weighted ``Allreduce`` over a flat parameter
buffer per round is FedAvg. See README.md and docs/design.md.
"""

__version__ = "0.1.0"
