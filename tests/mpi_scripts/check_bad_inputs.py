"""Under mpiexec: run ``python -m fedmpi`` in-process once per case, on every rank.

Reads a JSON list of argument lists (argv[1]) and, on rank 0, writes one JSON object per
case to argv[2]: every rank's exit code and captured output. Each case must end in an
agreed exit (SystemExit on every rank); one that aborted the job or hung would end this
whole script, which the test notices. One job for all cases: start-up (MPI, torch) is
paid once instead of once per case.
"""

import contextlib
import io
import json
import sys

from mpi4py import MPI

from fedmpi.cli import main


def run_case(argv: list[str]) -> tuple[int, str]:
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return code, captured.getvalue()


def run_all() -> None:
    comm = MPI.COMM_WORLD
    with open(sys.argv[1]) as handle:
        cases = json.load(handle)
    results = []
    for argv in cases:
        code, output = run_case(argv)
        every = comm.gather((code, output), root=0)  # set-up data only, never per round
        if comm.Get_rank() == 0:
            results.append({"codes": [c for c, _ in every], "outputs": [o for _, o in every]})
        comm.Barrier()
    if comm.Get_rank() == 0:
        with open(sys.argv[2], "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    run_all()
