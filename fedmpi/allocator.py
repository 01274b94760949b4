"""Run each rank on jemalloc, mimalloc or tcmalloc when one is installed, instead of
glibc's malloc.

Why: glibc keeps much of what a local step frees (activations, gradients, AdamW's
moments), so a rank's peak carries ~150 MiB of freed heap; these allocators hand it back.
Default job at np=2 with 4 clients, peak PSS of both ranks: 2577-2594 MiB on glibc,
2118-2123 on mimalloc (1038-1051 MiB a rank on jemalloc); docs/benchmarks.md, section 4.

mimalloc needs no system package: requirements-local.txt (what ``make run`` installs),
setup.cfg's ``malloc`` extra and environment.yml install the ``cmeel-mimalloc`` wheel,
whose library lies under site-packages/``cmeel.prefix/lib``; so a fresh machine runs on
it. It runs with its own defaults (freed memory returned after 1 s): a longer
``MIMALLOC_PURGE_DELAY`` steps faster on a busy machine but breaks the memory goal.

``LD_PRELOAD`` only takes effect when a process starts, so ``python -m fedmpi`` and the
``fedmpi`` console script (both start in ``fedmpi.__main__``) execute themselves again, once,
before anything initialises MPI or imports torch, with the library preloaded.
``FEDMPI_MALLOC`` chooses: ``auto`` (the default: jemalloc, else mimalloc, else tcmalloc,
where installed; else glibc), ``system`` (glibc's), or a library's path.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
from pathlib import Path

from fedmpi.errors import UsageError

ENV = "FEDMPI_MALLOC"
ACTIVE = "FEDMPI_MALLOC_ACTIVE"  # set in the re-executed process: what it runs on
# In order of preference. mimalloc is what pip installs (the cmeel-mimalloc wheel, which
# requirements-local.txt and setup.cfg's ``malloc`` extra name): it is found in the
# environment's site-packages, under ``cmeel.prefix/lib``.
LIBRARIES = (
    "libjemalloc.so.2",
    "libmimalloc.so",
    "libtcmalloc_minimal.so.4",
    "libtcmalloc.so.4",
)
CMEEL_LIB = Path("cmeel.prefix") / "lib"
SYSTEM_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def installed_libraries(env: dict[str, str]) -> list[Path]:
    """Each of LIBRARIES that is installed, in that order of preference, from the
    environment's prefix (conda), LD_LIBRARY_PATH (a cluster's ``module load``) or the
    system's library directories, the first directory holding it winning."""
    prefixes = [env.get("CONDA_PREFIX", ""), sys.prefix]
    dirs = [f"{p}/lib" for p in prefixes if p]
    dirs += [str(Path(p) / CMEEL_LIB) for p in site_packages()]
    dirs += [d for d in env.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += SYSTEM_DIRS
    found = []
    for name in LIBRARIES:
        path = next((Path(d) / name for d in dirs if (Path(d) / name).is_file()), None)
        if path is not None:
            found.append(path)
    return found


def site_packages() -> list[str]:
    """Where pip puts this interpreter's packages (a wheel's ``cmeel.prefix`` among them):
    the environment's own site-packages, then the user's."""
    paths = sysconfig.get_paths()
    found = [paths["purelib"], paths["platlib"]]
    if site.ENABLE_USER_SITE:
        found.append(site.getusersitepackages())
    return list(dict.fromkeys(found))


def find_library(env: dict[str, str]) -> Path | None:
    """What ``auto`` preloads: the preferred installed library, or None (glibc's malloc)."""
    found = installed_libraries(env)
    return found[0] if found else None


def chosen_library(env: dict[str, str]) -> Path | None:
    """What ``FEDMPI_MALLOC`` asks for: a library to preload, or None for glibc's malloc."""
    choice = env.get(ENV, "auto")
    if choice == "system":
        return None
    if choice == "auto":
        return find_library(env)
    path = Path(choice)
    if not path.is_file():
        raise UsageError(f"{ENV}={choice}: no such file (use auto, system or a library's path)")
    return path.resolve()


def reexec_with_allocator() -> None:
    """Replace this process by itself with the chosen allocator preloaded (no-op when it
    already runs on it, or glibc's is chosen). Call before MPI_Init and before torch."""
    env = dict(os.environ)
    if ACTIVE in env:
        return
    try:
        library = chosen_library(env)
    except UsageError:
        return  # the command line's checks report it: one line on rank 0, exit 2 on all
    if library is None or str(library) in env.get("LD_PRELOAD", ""):
        os.environ[ACTIVE] = "glibc" if library is None else str(library)
        return
    env[ACTIVE] = str(library)
    env["LD_PRELOAD"] = ":".join(p for p in (str(library), env.get("LD_PRELOAD", "")) if p)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe() -> str:
    """The allocator this process runs on, for the start-up log: checked in the process's
    memory map, since the loader skips a preload it cannot load with only a warning."""
    active = os.environ.get(ACTIVE, "glibc")
    if active == "glibc":
        return "glibc"
    name = Path(active).name
    try:
        loaded = name in Path("/proc/self/maps").read_text()
    except OSError:  # no /proc: trust LD_PRELOAD
        loaded = True
    return name.split(".so")[0].removeprefix("lib") if loaded else f"glibc ({name} did not load)"
