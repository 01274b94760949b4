"""Error types whose exit codes the whole MPI job agrees on."""


class UsageError(Exception):
    """Bad input from the user (flags, config file, paths, data).

    Reported as one line, once, and every rank exits with code 2 before any training.
    """

    exit_code = 2
