"""fedmpi across node boundaries, on a simulated cluster of 2 nodes x 2 ranks.

Each node is a network namespace with its own hostname and its own node-local cache
directory (``bench/simcluster.py``); MPICH reaches it through its ssh launcher and UCX
talks TCP over the bridge, so node-local ranks, the inter-node Allreduce, losing a node
and a token cache that no other node can see are exercised for real. Needs root, ``ip``,
``unshare``, ``tc`` and MPICH's Hydra ``mpiexec``; skipped, saying which is missing,
otherwise. Every launch runs under a timeout and the cluster is removed whatever happens.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import (
    REPO,
    SCRIPTS,
    fedmpi_args,
    finish,
    mpiexec_command,
    start_job,
    wait_for_line,
)

from fedmpi.preemption import EXIT_PREEMPTED
from fedmpi.results import read_results

pytestmark = pytest.mark.mpi

sys.path.insert(0, str(REPO / "bench"))
from simcluster import SimCluster, Unavailable, missing_requirements  # noqa: E402

NODES, RANKS_PER_NODE = 2, 2
LOSS_DEADLINE_S = 15  # from killing a node's ranks to the end of the job
ROUNDS = 4
JOB_TIMEOUT_S = 150


def _unsupported() -> str | None:
    reason = missing_requirements()
    if reason:
        return reason
    version = subprocess.run(
        [mpiexec_command()[0], "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    if "HYDRA" not in version:
        return "the simulated cluster drives MPICH's Hydra mpiexec (ssh launcher, -iface)"
    return None


def test_the_cluster_refuses_clearly_without_root_or_tools(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "needs root" in missing_requirements()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "tc" else f"/bin/{tool}")
    made = SimCluster(NODES, RANKS_PER_NODE)
    with pytest.raises(Unavailable, match="the simulated cluster needs tc on PATH"):
        made.start()
    assert not made.workdir.exists()  # refused before making anything


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The nodes, each seeing its own (empty at first) directory at ``node_cache``."""
    reason = _unsupported()
    if reason:
        pytest.skip(reason)
    node_cache = tmp_path_factory.mktemp("node-local") / "cache"
    with SimCluster(NODES, RANKS_PER_NODE, node_local=node_cache) as made:
        yield made


def launch(cluster: SimCluster, args: list[str]) -> subprocess.Popen:
    """``mpiexec`` over the cluster, in its own session so that a test can kill it all."""
    return start_job([*cluster.mpiexec(mpiexec_command()[0]), sys.executable, *args])


def signal_ranks(cluster: SimCluster, node: int, marker: str, signum: int) -> list[int]:
    """Send ``signum`` to the Python ranks on ``node`` whose command line holds ``marker``
    (not to its MPI proxy: a lost node is its ranks dying). Looks again for up to 10 s:
    once, on a loaded machine, one of a node's two ranks was missing from one listing."""
    victims: list[int] = []
    deadline = time.monotonic() + 10
    while True:
        for pid in cluster.pids(cluster.nodes[node]):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            ours = argv.startswith(sys.executable.encode()) and marker.encode() in argv
            if ours and pid not in victims:
                os.kill(pid, signum)
                victims.append(pid)
        if len(victims) >= RANKS_PER_NODE or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(victims) == RANKS_PER_NODE, f"found ranks {victims} on node {node}"
    return victims


# ---------------------------------------------------------------- placement and node loss


@pytest.fixture(scope="module")
def lost_node(cluster):
    """One light job: it reports where every rank landed, runs Allreduce rounds over the
    links, and then loses every rank of node 1. (topology, output, seconds to end)."""
    proc = launch(cluster, [str(SCRIPTS / "check_nodes.py")])
    before = wait_for_line(proc, "ROUND 3", timeout=60)
    signal_ranks(cluster, 1, "check_nodes.py", signal.SIGKILL)
    code, after, seconds = finish(proc, timeout=LOSS_DEADLINE_S + 15)
    topology = json.loads(before.split("TOPOLOGY ", 1)[1].splitlines()[0])
    return topology, code, before + after, seconds


def test_node_local_ranks_and_devices_are_per_node(lost_node):
    topology = lost_node[0]
    assert [r["rank"] for r in topology] == [0, 1, 2, 3]
    assert [r["hostname"] for r in topology] == ["node0", "node0", "node1", "node1"]
    assert [r["local_rank"] for r in topology] == [0, 1, 0, 1]
    assert {r["local_size"] for r in topology} == {RANKS_PER_NODE}
    # 3 stand-in GPUs per node: by global rank, ranks 2 and 3 would get cuda:2, cuda:0.
    assert [r["device"] for r in topology] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_losing_a_node_ends_the_job_and_names_its_ranks(lost_node):
    _, code, output, seconds = lost_node
    assert code != 0, output[-2000:]
    assert seconds < LOSS_DEADLINE_S, output[-2000:]
    # Hydra names the host of the lost processes; the start-up line maps it to ranks.
    assert "BAD TERMINATION" in output and "RUNNING AT node1" in output, output[-2000:]
    assert "nodes: node0: ranks 0-1; node1: ranks 2-3" in output


# ---------------------------------------------------------------- federated runs


def job_args(tiny_bert, toy_dataset, out: Path, cache: Path, *extra) -> list[str]:
    return fedmpi_args(
        tiny_bert,
        toy_dataset,
        out,
        cache,
        "--clients",
        4,
        "--rounds",
        ROUNDS,
        "--lr",
        "2e-3",
        "--train-samples",
        160,
        "--test-samples",
        64,
        "--threads",
        1,
        "--checkpoint-every",
        1,
        *extra,
    )


@pytest.fixture(scope="module")
def across_nodes(cluster, tiny_bert, toy_dataset, tmp_path_factory):
    """4 clients on 2 nodes x 2 ranks, token cache node-local, and beside it (at the same
    time: start-up leaves cores idle) the same federation on one rank of one node.
    (cluster output dir, its log, single-node output dir)."""
    root = tmp_path_factory.mktemp("runs")
    single = subprocess.Popen(
        [*mpiexec_command(), "-n", "1", sys.executable,
         *job_args(tiny_bert, toy_dataset, root / "single", root / "cache")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, start_new_session=True,
    )  # fmt: skip
    args = job_args(
        tiny_bert, toy_dataset, root / "out", cluster.node_local, "--node-local-cache",
        "--verify-sync",
    )  # fmt: skip
    code, output, _ = finish(launch(cluster, args), timeout=JOB_TIMEOUT_S)
    single_code, single_output, _ = finish(single, timeout=JOB_TIMEOUT_S)
    assert code == 0, output[-3000:]
    assert single_code == 0, single_output[-3000:]
    return root / "out", output, root / "single"


def final_params(out: Path) -> np.ndarray:
    with h5py.File(out / "checkpoint.h5") as f:
        assert f.attrs["round"] == ROUNDS
        return f["params"][()]


def test_training_across_nodes_equals_one_node(across_nodes):
    out, _, single_node = across_nodes
    np.testing.assert_allclose(final_params(out), final_params(single_node), rtol=1e-4, atol=2e-6)
    crcs = read_results(out / "results.h5")["sync/param_crc32"]
    assert crcs.shape == (ROUNDS, NODES * RANKS_PER_NODE)
    assert all(len(set(row)) == 1 for row in crcs.tolist())  # ranks bit-identical each round


def test_node_local_token_cache_is_copied_to_the_other_node(cluster, across_nodes):
    output = across_nodes[1]
    assert "data: copied the token cache to 1 other node(s)" in output
    copies = [sorted(cluster.local_dir(node).glob("*.h5")) for node in cluster.nodes]
    assert all(len(files) == 1 for files in copies), copies
    assert copies[0][0].name == copies[1][0].name
    assert copies[0][0].read_bytes() == copies[1][0].read_bytes()
    assert not any(Path(cluster.node_local).iterdir())  # nothing went to a shared place


def test_preempting_one_node_checkpoints_and_resumes_identically(
    cluster, across_nodes, tiny_bert, toy_dataset, tmp_path
):
    out = tmp_path / "preempted"
    args = job_args(tiny_bert, toy_dataset, out, cluster.node_local, "--node-local-cache")
    proc = launch(cluster, args)
    wait_for_line(proc, f"round 1/{ROUNDS} |", timeout=JOB_TIMEOUT_S)
    signal_ranks(cluster, 1, str(out), signal.SIGTERM)  # what a scheduler sends a node
    code, output, _ = finish(proc, timeout=60)
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert "preempted in round" in output
    assert "copied the token cache" not in output  # both nodes kept theirs

    code, output, _ = finish(launch(cluster, args), timeout=JOB_TIMEOUT_S)
    assert code == 0 and "resuming from" in output, output[-3000:]
    reference = across_nodes[0]
    assert np.array_equal(final_params(out), final_params(reference))  # bit-identical
    got, want = read_results(out / "results.h5"), read_results(reference / "results.h5")
    assert list(got["round"]) == list(range(1, ROUNDS + 1))
    for key in ("metrics/test_accuracy", "metrics/test_loss", "metrics/train_loss"):
        assert np.array_equal(got[key], want[key]), key


def test_sparse_updates_take_the_sparse_wire_between_nodes(
    cluster, tiny_bert, toy_dataset, tmp_path
):
    """--compress topk across 2 nodes: FEDMPI_WIRE=auto picks the sparse wire there (the
    payload shrinks to the moved coordinates), the ranks stay bit-identical, and the model
    is the one a single node reaches over the dense Allreduce."""
    sparse = ("--compress", "topk:0.05", "--verify-sync")
    args = job_args(tiny_bert, toy_dataset, tmp_path / "out", tmp_path / "cache", *sparse)
    code, output, _ = finish(launch(cluster, args), timeout=JOB_TIMEOUT_S)
    assert code == 0, output[-3000:]
    single = subprocess.run(
        [*mpiexec_command(), "-n", "1", sys.executable,
         *job_args(tiny_bert, toy_dataset, tmp_path / "single", tmp_path / "cache", *sparse)],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=JOB_TIMEOUT_S,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]
    np.testing.assert_allclose(
        final_params(tmp_path / "out"), final_params(tmp_path / "single"), rtol=1e-4, atol=2e-6
    )
    results = read_results(tmp_path / "out" / "results.h5")
    numel = final_params(tmp_path / "out").size
    assert np.all(results["comm/payload_bytes"] <= 8 * 0.05 * numel + 64)  # one client a rank
    assert read_results(tmp_path / "single" / "results.h5")["comm/payload_bytes"][0] > 4 * numel
    crcs = results["sync/param_crc32"]
    assert all(len(set(row)) == 1 for row in crcs.tolist())
