"""``python -m fedmpi``: the federated fine-tuning job."""

import sys

from fedmpi import allocator

allocator.reexec_with_allocator()  # first: LD_PRELOAD only works when a process starts

from fedmpi.cli import main  # noqa: E402  (initialises MPI)

sys.exit(main())
