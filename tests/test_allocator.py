"""FEDMPI_MALLOC: which allocator a rank runs on, and that ``python -m fedmpi`` and the
``fedmpi`` console script really run on it (the loader's map of the rank, as the start-up
log reports it)."""

import configparser
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, fedmpi_args, job_env, run_mpi, wait_for_line

from fedmpi import allocator
from fedmpi.errors import UsageError


def fake_libraries(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
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


def test_auto_finds_pips_mimalloc_in_site_packages_after_jemalloc(tmp_path, monkeypatch):
    """cmeel-mimalloc's wheel puts the library under site-packages/cmeel.prefix/lib: found
    there with nothing else installed, preferred to tcmalloc, second to jemalloc."""
    monkeypatch.setattr(allocator, "SYSTEM_DIRS", ())
    monkeypatch.setattr(allocator.sys, "prefix", str(tmp_path / "no-prefix"))
    site = tmp_path / "site-packages"
    monkeypatch.setattr(allocator, "site_packages", lambda: [str(tmp_path / "user"), str(site)])
    mimalloc = fake_libraries(site / "cmeel.prefix" / "lib", "libmimalloc.so") / "libmimalloc.so"
    assert allocator.find_library({}) == mimalloc
    tcmalloc = fake_libraries(tmp_path / "tc", "libtcmalloc_minimal.so.4")
    assert allocator.find_library({"LD_LIBRARY_PATH": str(tcmalloc)}) == mimalloc
    jemalloc = fake_libraries(tmp_path / "je", "libjemalloc.so.2") / "libjemalloc.so.2"
    assert allocator.find_library({"LD_LIBRARY_PATH": str(jemalloc.parent)}) == jemalloc


def test_pips_mimalloc_is_installed_here():
    """What requirements-local.txt installs (cmeel-mimalloc) is where ``auto`` looks: the
    memory figures of a fresh machine depend on it (README, docs/benchmarks.md)."""
    names = [path.name for path in allocator.installed_libraries({})]
    assert "libmimalloc.so" in names, f"no pip-installed mimalloc; auto sees {names}"


def test_the_reexecution_preloads_the_library_first(tmp_path, monkeypatch):
    """The environment the process re-executes itself with: the library first in
    LD_PRELOAD (before what the user preloads), and marked active."""
    library = fake_libraries(tmp_path, "libmimalloc.so") / "libmimalloc.so"
    calls = []
    monkeypatch.setattr(allocator.os, "execve", lambda *args: calls.append(args))
    monkeypatch.delenv(allocator.ACTIVE, raising=False)
    monkeypatch.setenv("FEDMPI_MALLOC", str(library))
    monkeypatch.setenv("LD_PRELOAD", "/other.so")
    allocator.reexec_with_allocator()
    [(executable, argv, env)] = calls
    assert executable == sys.executable and argv[0] == sys.executable
    assert env["LD_PRELOAD"] == f"{library.resolve()}:/other.so"
    assert env[allocator.ACTIVE] == str(library.resolve())


@pytest.mark.mpi
def test_bad_choice_is_one_line_and_exit_2_on_every_rank(tiny_bert, toy_dataset, tmp_path):
    args = fedmpi_args(tiny_bert, toy_dataset, tmp_path / "out", tmp_path / "cache")
    result = run_mpi(2, args, timeout=120, env={"FEDMPI_MALLOC": "/no/such.so"})
    assert result.returncode == 2, result.output
    assert result.output.count("FEDMPI_MALLOC=/no/such.so: no such file") == 1, result.output


LABELS = {
    "libjemalloc.so.2": "jemalloc",
    "libmimalloc.so": "mimalloc",
    "libtcmalloc_minimal.so.4": "tcmalloc_minimal",
}


def run_tiny_job(env: dict[str, str], tiny_bert, toy_dataset, tmp_path) -> str:
    args = fedmpi_args(tiny_bert, toy_dataset, tmp_path / "out", tmp_path / "cache")
    result = run_mpi(2, [*args, "--rounds", "1"], timeout=180, env={"LD_PRELOAD": "", **env})
    assert result.returncode == 0, result.output
    return result.output


@pytest.mark.mpi
def test_a_named_library_is_preloaded_into_the_ranks(tiny_bert, toy_dataset, tmp_path):
    """The re-execution itself, with a library any glibc system has and that no rank
    maps otherwise (glibc's asynchronous name lookup): the log reads the ranks' map."""
    output = run_tiny_job({"FEDMPI_MALLOC": str(libanl())}, tiny_bert, toy_dataset, tmp_path)
    assert "malloc anl\n" in output, output


@pytest.mark.mpi
@pytest.mark.parametrize("choice", ["auto", "system"])
def test_ranks_run_on_the_chosen_allocator(choice, tiny_bert, toy_dataset, tmp_path):
    """``auto`` has pip's mimalloc at least (requirements-local.txt), so it never falls
    back to glibc where the README's install ran: the ranks' map must show the library."""
    library = allocator.find_library({})
    assert library is not None, "no allocator for auto: is cmeel-mimalloc installed?"
    expected = "glibc" if choice == "system" else LABELS.get(library.name, "tcmalloc")
    output = run_tiny_job({"FEDMPI_MALLOC": choice}, tiny_bert, toy_dataset, tmp_path)
    assert f"malloc {expected}\n" in output, output


def libanl() -> Path:
    """glibc's asynchronous name lookup library: on any glibc system, mapped by no rank
    unless preloaded."""
    library = next((Path(d) / "libanl.so.1" for d in allocator.SYSTEM_DIRS
                    if (Path(d) / "libanl.so.1").is_file()), None)  # fmt: skip
    if library is None:
        pytest.skip("no libanl.so.1 (glibc) in the system's library directories")
    return library


def console_script(directory: Path) -> Path:
    """The ``fedmpi`` console script as pip writes it, for setup.cfg's entry point."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    lines = setup["options.entry_points"]["console_scripts"].strip().splitlines()
    entries = dict(tuple(part.strip() for part in line.split("=")) for line in lines)
    module, function = entries["fedmpi"].split(":")
    script = directory / "fedmpi"
    script.write_text(
        f"#!{sys.executable}\nimport re\nimport sys\nfrom {module} import {function}\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        f"    sys.exit({function}())\n"
    )
    script.chmod(0o755)
    return script


def test_the_console_script_runs_on_the_chosen_allocator(
    tiny_bert_no_dropout, toy_dataset, tmp_path
):
    """The ``fedmpi`` command re-executes itself with the allocator preloaded, as
    ``python -m fedmpi`` does: one rank without mpiexec (MPI's singleton start), stopped
    once its start-up line has said what it runs on."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    args = fedmpi_args(tiny_bert_no_dropout, toy_dataset, out, cache)[2:]
    env = job_env({"FEDMPI_MALLOC": str(libanl()), "LD_PRELOAD": ""})
    env.pop(allocator.ACTIVE, None)
    with subprocess.Popen(
        [console_script(tmp_path), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env=env,
        start_new_session=True,  # wait_for_line kills the session if the line never comes
    ) as job:
        try:
            output = wait_for_line(job, ", malloc ", timeout=120)
        finally:
            job.kill()
    assert output.endswith(", malloc anl\n"), output
