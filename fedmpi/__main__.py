"""``python -m fedmpi`` and the ``fedmpi`` console script: the federated fine-tuning job.

Both start here, in a module that imports neither MPI nor torch, so that the process can
re-execute itself with the chosen allocator preloaded (``fedmpi.allocator``) before
anything initialises MPI.
"""

import sys

from fedmpi import allocator


def main() -> int:
    allocator.reexec_with_allocator()  # first: LD_PRELOAD only works when a process starts
    from fedmpi.cli import main as run_job  # initialises MPI

    return run_job()


if __name__ == "__main__":
    sys.exit(main())
