"""FEDMPI_MALLOC: which allocator a rank runs on, and that ``python -m fedmpi`` really
runs on it (the loader's map of the rank, as the start-up log reports it)."""

from pathlib import Path

import pytest
from conftest import run_mpi
from test_train_mpi import fedmpi_args

from fedmpi import allocator
from fedmpi.errors import UsageError


def fake_libraries(directory: Path, *names: str) -> Path:
    directory.mkdir(exist_ok=True)
    for name in names:
        (directory / name).write_bytes(b"")
    return directory


def test_system_and_explicit_choices(tmp_path):
    assert allocator.chosen_library({"FEDMPI_MALLOC": "system"}) is None
    library = fake_libraries(tmp_path, "libmine.so") / "libmine.so"
    assert allocator.chosen_library({"FEDMPI_MALLOC": str(library)}) == library.resolve()
    with pytest.raises(UsageError, match="FEDMPI_MALLOC=/no/such.so: no such file"):
        allocator.chosen_library({"FEDMPI_MALLOC": "/no/such.so"})


def test_auto_prefers_jemalloc_and_searches_ld_library_path_before_the_system(tmp_path):
    both = fake_libraries(tmp_path / "both", "libtcmalloc_minimal.so.4", "libjemalloc.so.2")
    env = {"LD_LIBRARY_PATH": f"/no/such/dir:{both}"}
    assert allocator.find_library(env) == both / "libjemalloc.so.2"
    assert allocator.chosen_library(env) == both / "libjemalloc.so.2"  # auto is the default


def test_bad_choice_is_one_line_and_exit_2_on_every_rank(tiny_bert, toy_dataset, tmp_path):
    args = fedmpi_args(tiny_bert, toy_dataset, tmp_path / "out", tmp_path / "cache")
    result = run_mpi(2, args, timeout=120, env={"FEDMPI_MALLOC": "/no/such.so"})
    assert result.returncode == 2, result.output
    assert result.output.count("FEDMPI_MALLOC=/no/such.so: no such file") == 1, result.output


LABELS = {"libjemalloc.so.2": "jemalloc", "libtcmalloc_minimal.so.4": "tcmalloc_minimal"}


def run_tiny_job(env: dict[str, str], tiny_bert, toy_dataset, tmp_path) -> str:
    args = fedmpi_args(tiny_bert, toy_dataset, tmp_path / "out", tmp_path / "cache")
    result = run_mpi(2, [*args, "--rounds", "1"], timeout=180, env={"LD_PRELOAD": "", **env})
    assert result.returncode == 0, result.output
    return result.output


def test_a_named_library_is_preloaded_into_the_ranks(tiny_bert, toy_dataset, tmp_path):
    """The re-execution itself, with a library any glibc system has and that no rank
    maps otherwise (glibc's asynchronous name lookup): the log reads the ranks' map."""
    library = next((Path(d) / "libanl.so.1" for d in allocator.SYSTEM_DIRS
                    if (Path(d) / "libanl.so.1").is_file()), None)  # fmt: skip
    if library is None:
        pytest.skip("no libanl.so.1 (glibc) in the system's library directories")
    output = run_tiny_job({"FEDMPI_MALLOC": str(library)}, tiny_bert, toy_dataset, tmp_path)
    assert "malloc anl\n" in output, output


@pytest.mark.parametrize("choice", ["auto", "system"])
def test_ranks_run_on_the_chosen_allocator(choice, tiny_bert, toy_dataset, tmp_path):
    library = allocator.find_library({})
    if choice == "auto" and library is None:
        pytest.skip("no jemalloc or tcmalloc on this machine (apt install libjemalloc2)")
    expected = "glibc" if choice == "system" else LABELS.get(library.name, "tcmalloc")
    output = run_tiny_job({"FEDMPI_MALLOC": choice}, tiny_bert, toy_dataset, tmp_path)
    assert f"malloc {expected}\n" in output, output
