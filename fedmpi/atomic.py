"""Files that are either absent, the old version, or the complete new one: never half.

Every file fedmpi writes (token caches, checkpoints, results) is written to a temporary
file beside its target, flushed to disk, and renamed over it; a crash or a full disk at
any point leaves the previous version intact.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(target: Path) -> Iterator[Path]:
    """Yield a temporary path to write ``target`` to; on success it replaces ``target``.

    The file gets the permissions a plain ``open`` would give (the umask's), not
    ``mkstemp``'s owner-only 0600, so a shared cache stays readable by its group.
    """
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_directory(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_directory(path: Path) -> None:
    """Flush a directory's entries, so that a rename into it survives a crash."""
    directory = os.open(path, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
