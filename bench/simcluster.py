"""A simulated cluster on one Linux machine: N "nodes" x M MPI ranks, as root.

Each node is a network namespace entered with its own UTS namespace (its own hostname)
and mount namespace (its own node-local directory, optional), joined to the others by a
veth pair on one bridge over a private /24 that exists only inside what this module
creates. MPICH's ``mpiexec`` starts one proxy per node through ``-launcher ssh
-launcher-exec SCRIPT``, where SCRIPT drops ssh's options and runs the command inside
the namespace of the host it was given. Ranks of one node then share memory and
``Split_type(COMM_TYPE_SHARED)``, ranks of two nodes talk over the bridge only.

Why UCX is told ``UCX_TLS=tcp,self``: UCX's shared-memory transports (cma, sysv,
posix) reach across network namespaces, so without it the "network" Allreduce would
never touch the links. ``tc`` shapes each link: ``tbf`` for the rate, ``netem`` for a
one-way delay (many kernels, this one included, lack ``sch_netem``: ``delay_supported``
says so before anything is built).

Everything is named after this process (``fmc<pid>...``) and torn down on exit, on
error, on SIGTERM/SIGINT, and at the next start for clusters whose creator died.

Command line (runs COMMAND under the cluster's mpiexec, then tears it down)::

    python bench/simcluster.py --nodes 2 --ranks 2 [--rate 1gbit] [--delay 0.5ms] \\
        -- python -m fedmpi --rounds 2
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

PREFIX = "fmc"  # every namespace, bridge and veth this module makes starts with it
LEGACY = ("fmtA", "fmtB", "fmtbr")  # left by hand-built clusters of earlier sessions
INNER_IFACE = "eth0"
SUBNET_BASE = "10.213"  # 10.213.X.0/24, X picked free per cluster
TIMEOUT_S = 20  # no ip/tc call may take longer
OWN_NAME = re.compile(PREFIX + r"(\d+)[a-z]\w*")  # the creator's pid, then a letter
_serial = itertools.count()  # tells apart the clusters of one process


class Unavailable(RuntimeError):
    """The machine cannot host a simulated cluster (not root, tools or kernel support
    missing); the message says what is missing."""


def missing_requirements() -> str | None:
    """Why no cluster can be built here, or None when it can."""
    if os.geteuid() != 0:
        return "the simulated cluster needs root (network namespaces, bridges, tc)"
    absent = [tool for tool in ("ip", "unshare", "tc", "hostname") if shutil.which(tool) is None]
    if absent:
        return f"the simulated cluster needs {', '.join(absent)} on PATH"
    return None


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout}")
    return proc


@dataclass(frozen=True)
class Node:
    name: str  # its hostname, inside its UTS namespace
    netns: str
    address: str  # of its eth0, on the cluster's subnet
    host_veth: str  # the veth end on the bridge, in the root namespace


LAUNCHER = """#!/bin/sh
# ssh stand-in for mpiexec -launcher-exec: drop ssh's options, enter the host's node.
while [ $# -gt 0 ]; do
  case "$1" in
    -x|-q|-t|-T|-n|-4|-6|-A|-a|-K|-k|-N|-v) shift ;;
    -o|-p|-l|-i|-F|-c|-m|-E) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
host="$1"; shift
case "$host" in
{cases}
  *) echo "simcluster: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts --mount --propagation private \\
  sh -c "hostname $name; $mount exec $*"
"""


class SimCluster:
    """N nodes x M ranks on one machine. Use as a context manager; always torn down.

    ``rate``: ``tc`` rate of every link (``"1gbit"``), None for unshaped veths.
    ``delay``: one-way delay added by ``netem`` on every node's uplink (``"0.5ms"``).
    ``node_local``: a directory every node sees at this path but backed by its own
    ``<base>/<node name>``: a node-local disk, for caches that must not be shared.
    """

    def __init__(
        self,
        nodes: int = 2,
        ranks_per_node: int = 2,
        rate: str | None = None,
        delay: str | None = None,
        node_local: Path | None = None,
    ) -> None:
        if not 1 <= nodes <= 200:
            raise ValueError(f"nodes must be in [1, 200], got {nodes}")
        self.n_nodes, self.ranks_per_node = nodes, ranks_per_node
        self.rate, self.delay = rate, delay
        self.node_local = node_local
        # Interface names have at most 15 characters: fmc + pid + letter + v + node.
        self.tag = f"{PREFIX}{os.getpid()}{chr(ord('a') + next(_serial) % 25)}"
        self.bridge = f"{self.tag}b"
        self.nodes: list[Node] = []  # known once started
        self.workdir = Path(tempfile.gettempdir()) / self.tag
        self.launcher = self.workdir / "launch-ssh"
        self._up = False

    # ----------------------------------------------------------------- life cycle

    def __enter__(self) -> SimCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        reason = missing_requirements()
        if reason:
            raise Unavailable(reason)
        if self.delay and not delay_supported():
            raise Unavailable("this kernel has no sch_netem: link delay (tc netem) is unavailable")
        remove_stale()
        atexit.register(self.stop)
        self._up = True
        try:
            self.subnet = _free_subnet()
            hosts = list(self.subnet.hosts())
            self.gateway = str(hosts[0])  # the bridge's address: where mpiexec listens
            self.nodes = [
                Node(f"node{i}", f"{self.tag}n{i}", str(hosts[i + 1]), f"{self.tag}v{i}")
                for i in range(self.n_nodes)
            ]
            shutil.rmtree(self.workdir, ignore_errors=True)  # a dead namesake's (pid reuse)
            self.workdir.mkdir()
            self._build()
        except BaseException:
            self.stop()
            raise

    def _build(self) -> None:
        prefix = self.subnet.prefixlen
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for i, node in enumerate(self.nodes):
            _sh("ip", "netns", "add", node.netns)
            inner = f"{self.tag}i{i}"  # renamed eth0 once inside
            _sh("ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", inner)
            _sh("ip", "link", "set", inner, "netns", node.netns)
            ns = ("ip", "netns", "exec", node.netns)
            _sh(*ns, "ip", "link", "set", inner, "name", INNER_IFACE)
            _sh(*ns, "ip", "addr", "add", f"{node.address}/{prefix}", "dev", INNER_IFACE)
            _sh(*ns, "ip", "link", "set", INNER_IFACE, "up")
            _sh(*ns, "ip", "link", "set", "lo", "up")
            _sh("ip", "link", "set", node.host_veth, "master", self.bridge)
            _sh("ip", "link", "set", node.host_veth, "up")
            if self.node_local is not None:
                (self.workdir / "local" / node.name).mkdir(parents=True)
        if self.node_local is not None:
            Path(self.node_local).mkdir(parents=True, exist_ok=True)
        self.shape(self.rate, self.delay)
        self._write_launcher()

    def stop(self) -> None:
        """Kill what runs inside the nodes, delete namespaces, veths, bridge, files."""
        if not self._up:
            return
        self._up = False
        for node in self.nodes:
            for pid in self.pids(node):
                _kill(pid, signal.SIGKILL)
            _sh("ip", "netns", "del", node.netns, check=False)
            _sh("ip", "link", "del", node.host_veth, check=False)
        _sh("ip", "link", "del", self.bridge, check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)
        atexit.unregister(self.stop)

    # ------------------------------------------------------------------- links

    def shape(self, rate: str | None, delay: str | None = None) -> None:
        """Set every link to ``rate`` (tbf) and a one-way ``delay`` (netem); None, None
        restores unshaped veths. Both directions of a link are limited: the node's eth0
        (uplink, where the delay goes too) and the bridge's end (downlink)."""
        self.rate, self.delay = rate, delay
        for node in self.nodes:
            inner = ("ip", "netns", "exec", node.netns)
            for prefix, dev in ((inner, INNER_IFACE), ((), node.host_veth)):
                _sh(*prefix, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                parent = ("root",)
                if delay and prefix:
                    _sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "handle", "1:",
                        "netem", "delay", delay, "limit", "100000")  # fmt: skip
                    parent = ("parent", "1:")
                if rate:
                    _sh(*prefix, "tc", "qdisc", "add", "dev", dev, *parent, "tbf",
                        "rate", rate, "burst", _burst(rate), "latency", "50ms")  # fmt: skip

    # ------------------------------------------------------------------- MPI

    def hosts_arg(self) -> str:
        """By name: Hydra's ssh launcher only hands the name to the launcher script (no
        resolving), and then names the node in its messages, as on a real cluster."""
        return ",".join(f"{n.name}:{self.ranks_per_node}" for n in self.nodes)

    def mpiexec(self, mpiexec: str, np_: int | None = None, tcp_only: bool = True) -> list[str]:
        """The MPICH ``mpiexec`` prefix that places ``ranks_per_node`` ranks on each node.

        ``tcp_only``: UCX over TCP on eth0 (the links); False lets UCX use shared memory
        across nodes, which no real cluster can."""
        np_ = np_ or len(self.nodes) * self.ranks_per_node
        command = [
            mpiexec,
            "-launcher", "ssh", "-launcher-exec", str(self.launcher),
            "-iface", self.bridge,
            "-hosts", self.hosts_arg(),
            "-n", str(np_),
        ]  # fmt: skip
        if tcp_only:
            command += ["-genv", "UCX_TLS", "tcp,self", "-genv", "UCX_NET_DEVICES", INNER_IFACE]
        return command

    def pids(self, node: Node) -> list[int]:
        """Processes running inside ``node`` (its proxy and its ranks)."""
        proc = _sh("ip", "netns", "pids", node.netns, check=False)
        return sorted(int(p) for p in proc.stdout.split())

    def local_dir(self, node: Node) -> Path:
        """Where ``node``'s node-local directory lives, seen from outside the nodes."""
        return self.workdir / "local" / node.name

    def _write_launcher(self) -> None:
        cases = []
        for node in self.nodes:
            mount = ""
            if self.node_local is not None:
                mount = f"mount --bind {self.local_dir(node)} {self.node_local} &&"
            for alias in (node.address, node.name):
                cases.append(f'  {alias}) ns={node.netns}; name={node.name}; mount="{mount}" ;;')
        self.launcher.write_text(LAUNCHER.format(cases="\n".join(cases)))
        self.launcher.chmod(0o755)


def delay_supported() -> bool:
    """Whether ``tc netem`` works here (kernel module sch_netem), tried on a scratch
    namespace's loopback so that nothing outside it is touched."""
    if Path("/sys/module/sch_netem").exists():
        return True
    scratch = f"{PREFIX}{os.getpid()}zprobe"
    try:
        _sh("ip", "netns", "add", scratch)
        ns = ("ip", "netns", "exec", scratch)
        proc = _sh(*ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms",
                   check=False)  # fmt: skip
        return proc.returncode == 0
    finally:
        _sh("ip", "netns", "del", scratch, check=False)


def remove_stale() -> None:
    """Delete clusters whose creating process is gone, and the hand-built legacy ones."""

    def stale(name: str) -> bool:
        ours = OWN_NAME.fullmatch(name)
        return name in LEGACY or (ours is not None and not _alive(int(ours.group(1))))

    for ns in _sh("ip", "netns", "list", check=False).stdout.split("\n"):
        name = ns.split(" ")[0]
        if name and stale(name):
            for pid in _sh("ip", "netns", "pids", name, check=False).stdout.split():
                _kill(int(pid), signal.SIGKILL)
            _sh("ip", "netns", "del", name, check=False)
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        if stale(path.name):
            shutil.rmtree(path, ignore_errors=True)
    for line in _sh("ip", "-o", "link", "show", check=False).stdout.split("\n"):
        fields = line.split(": ")
        if len(fields) > 1:
            name = fields[1].split("@")[0]
            if stale(name):
                _sh("ip", "link", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.X.0/24 that no address or route of this machine's namespace overlaps."""
    used = _sh("ip", "-4", "-o", "addr", check=False).stdout
    used += _sh("ip", "-4", "route", check=False).stdout
    taken = []
    for token in used.split():
        try:
            taken.append(ipaddress.ip_network(token, strict=False))
        except ValueError:
            continue
    start = os.getpid() % 200
    for i in range(200):
        net = ipaddress.ip_network(f"{SUBNET_BASE}.{20 + (start + i) % 200}.0/24")
        if not any(net.overlaps(t) for t in taken if t.version == 4):
            return net
    raise Unavailable(f"no free /24 left in {SUBNET_BASE}.20.0-{SUBNET_BASE}.219.0")


def _burst(rate: str) -> str:
    """A tbf bucket of 4 ms at ``rate`` (at least 256 KiB): large enough for the kernel's
    timer tick and 64 KiB GSO segments, small enough to hold the rate."""
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12, "bit": 1.0}
    for unit, scale in units.items():
        if rate.endswith(unit):
            bits = float(rate[: -len(unit)]) * scale
            return f"{max(256 * 1024, int(bits / 8 * 0.004))}b"
    raise ValueError(f"rate {rate!r}: give it as <number>kbit|mbit|gbit")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # it ended by itself meanwhile
        os.kill(pid, signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2, help="ranks per node")
    parser.add_argument("--rate", help="link rate, e.g. 1gbit (tbf)")
    parser.add_argument("--delay", help="one-way link delay, e.g. 0.5ms (netem)")
    parser.add_argument("--mpiexec", default=str(Path(sys.executable).with_name("mpiexec")))
    parser.add_argument("--shm", action="store_true", help="let UCX use shared memory too")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda n, _: sys.exit(128 + n))  # unwinds: the cluster goes
    try:
        with SimCluster(args.nodes, args.ranks, args.rate, args.delay) as cluster:
            prefix = cluster.mpiexec(args.mpiexec, tcp_only=not args.shm)
            print(f"simcluster: {' '.join(prefix)}", file=sys.stderr, flush=True)
            return subprocess.call([*prefix, *command])
    except Unavailable as exc:
        print(f"simcluster: {exc}", file=sys.stderr)
        return 77


if __name__ == "__main__":
    sys.exit(main())
