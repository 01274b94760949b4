"""Under mpiexec: ``python -m fedmpi`` in-process, with one thing going wrong on purpose.

``run_sabotaged.py WHAT FEDMPI-ARGS...``, WHAT being:

    full-disk  every file write fails with EFBIG while the model is saved (RLIMIT_FSIZE,
               as a full disk or a quota would: the real write path, a real OSError)
    diverge    the server step leaves an infinite weight in the global model

Exits with the exit code fedmpi's ``main`` ends with on this rank.
"""

import resource
import sys

import torch

from fedmpi import server, train
from fedmpi.cli import main


def full_disk() -> None:
    save = train._save_model

    def save_on_a_full_disk(*args) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))  # Python ignores SIGXFSZ
        try:
            save(*args)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    train._save_model = save_on_a_full_disk


def diverge() -> None:
    step = server.ServerOptimizer.step

    def overflowing_step(self, params: torch.Tensor, start, average) -> None:
        step(self, params, start, average)
        params[0] = float("inf")

    server.ServerOptimizer.step = overflowing_step


if __name__ == "__main__":
    {"full-disk": full_disk, "diverge": diverge}[sys.argv[1]]()
    try:
        code = main(sys.argv[2:])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    sys.exit(code)
