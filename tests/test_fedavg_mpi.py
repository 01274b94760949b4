"""FedAvg over MPI equals an independent serial weighted average, at np = 1, 2 and 4."""

import pytest
from conftest import SCRIPTS, run_mpi

pytestmark = pytest.mark.mpi


@pytest.mark.parametrize("np_", [1, 2, 4])
def test_fedavg_matches_serial_weighted_average(np_):
    result = run_mpi(np_, [str(SCRIPTS / "check_fedavg.py")], timeout=120)
    assert result.returncode == 0, result.output
    assert f"FEDAVG OK np={np_}" in result.output


def test_fedavg_of_lora_adapters_matches_serial_weighted_average():
    result = run_mpi(2, [str(SCRIPTS / "check_fedavg.py"), "lora"], timeout=120)
    assert result.returncode == 0, result.output
    # r 4 adapters on query and value (4 x (16 + 16) each) and the 16 -> 3 head: 307 floats
    assert "FEDAVG OK np=2 params=307" in result.output


def test_host_staged_allreduce_equals_direct():
    result = run_mpi(2, [str(SCRIPTS / "check_staging.py")], timeout=120)
    assert result.returncode == 0, result.output
    assert "STAGING OK" in result.output
