"""Cluster benchmark: a local 3-node slurp cluster beside a 3-member etcd cluster.

Measures, with the async SDK (trio), put and get latency (p50, p99) and throughput with 1
client and with 16 concurrent clients (16 separate connections spread over the 3 nodes):
puts of ~1 KB records to distinct addresses (W = 2 of 3), gets of those addresses (latest
version, R = 2). When the ``etcd`` binary is on PATH, the same run starts a 3-member etcd
cluster on loopback and measures the same operations through etcd's v3 HTTP/JSON gateway
(``/v3/kv/put``; ``/v3/kv/range``, linearizable) over one persistent connection per client,
with the same value size and op counts. Each measurement is split into up to 5 rounds that
alternate slurp and etcd, so both see the same background load. Without ``etcd`` the etcd
column is skipped.

Then (slurp only) the index-lag phase (scripts/bench_index_lag.py, ``--index-lag-s S``, 0 to
skip: 16 writers for S seconds while a prober times how long after its acknowledgement
``ctx.search`` finds a put, and ``node.status`` ``index`` backlogs are sampled), the
failover phase (scripts/bench_failover.py) and, last, the rebalance and rotation phase
(scripts/bench_rebalance.py, ``--rebalance-contexts N``, 0 to skip): N contexts are
loaded, a 4th node joins under a steady writer (rebalance rate, write latency beside the
same cluster at rest), then a cluster-wide rotation of the role re-seals them.

Output: a table on stdout and the same as Markdown between ``<!-- bench:cluster:start -->``
and ``<!-- bench:cluster:end -->`` in BENCHMARKS.md (the rest of that file is left as it
was). Scratch data goes to ``bench-data/cluster`` and ``bench-data/etcd`` (git-ignored),
deleted at the end unless ``--keep``.

Nothing in the packages imports this script; it uses ``node.daemon.ops`` and ``node.client``.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import ssl
import string
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import bench_failover  # scripts/, on sys.path
import bench_index_lag
import bench_rebalance
import trio
from bench_report import git_revision, write_section

from node.client import AsyncClient, ClientConfig, load_profile, open_client
from node.daemon.ops import ClusterError, LocalNode, cluster_down, cluster_up

ROOT = Path(__file__).resolve().parent.parent

START_MARKER = "<!-- bench:cluster:start -->"
END_MARKER = "<!-- bench:cluster:end -->"
NODES = 3
CONCURRENCY = (1, 16)
DEFAULT_OPS = 1000
QUICK_OPS = 60
MAX_ROUNDS = 5  # a measurement is split into rounds, slurp and etcd alternating
MIN_ROUND_OPS = 64
IDLE_S = 3.0  # the idle CPU of each system is measured this long, after the warm-up
WARMUP_OPS = 5  # per client, before anything is measured
VALUE_BYTES = 1024  # the record's summary + content; etcd's value is the same bytes
SUMMARY_CHARS = 100
ROLE = "backend_developer"
ETCD_START_TIMEOUT_S = 30.0
SLURP_START_TIMEOUT_S = 90.0
CALL_TIMEOUT_S = 30.0

Op = Callable[[int, int], Awaitable[None]]  # (client number, key number)


# -- helpers ------------------------------------------------------------------------------


def log(message: str) -> None:
    """Progress on stderr (stdout carries the table)."""
    print(f"[bench cluster] {message}", file=sys.stderr, flush=True)


def percentile_ms(samples_ns: Sequence[int], pct: float) -> float:
    """Nearest-rank percentile of nanosecond samples, in milliseconds."""
    ordered = sorted(samples_ns)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1] / 1e6


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes (all their threads) used so far."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15)
    return total


def own_cpu_s() -> float:
    """User + system CPU seconds of this process (the clients)."""
    times = os.times()
    return times.user + times.system


# -- the payloads -------------------------------------------------------------------------


class Payloads:
    """Distinct ~1 KB values, reproducible from the seed; key ``i`` always gets value ``i``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._cache: dict[int, tuple[str, str]] = {}

    def parts(self, i: int) -> tuple[str, str]:
        """(summary, content): SUMMARY_CHARS + the rest of VALUE_BYTES, ASCII."""
        if i not in self._cache:
            rng = random.Random(self.seed * 1_000_003 + i)
            alphabet = string.ascii_lowercase + "      "
            text = "".join(rng.choice(alphabet) for _ in range(VALUE_BYTES))
            self._cache[i] = (text[:SUMMARY_CHARS], text[SUMMARY_CHARS:])
        return self._cache[i]

    def fields(self, i: int) -> dict[str, Any]:
        """The slurp record fields of value ``i``."""
        summary, content = self.parts(i)
        return {"summary": summary, "content": content, "tags": ["bench"]}

    def raw(self, i: int) -> bytes:
        """The etcd value of value ``i``: the same bytes."""
        summary, content = self.parts(i)
        return (summary + content).encode("ascii")


def slurp_address(key: int) -> str:
    """The address of key ``key`` (``*^``: the latest version)."""
    return f"ucxl://bench:{ROLE}@bench:cluster/*^/keys/k{key:07d}.txt"


def etcd_key(key: int) -> bytes:
    """The etcd key of key ``key``."""
    return f"/bench/keys/k{key:07d}".encode("ascii")


# -- measuring ----------------------------------------------------------------------------


@dataclass
class Measurement:
    """One measured batch of operations."""

    latencies_ns: list[int]
    wall_ns: int
    server_cpu_s: float
    client_cpu_s: float
    errors: list[str] = field(default_factory=list)

    def add(self, other: Measurement) -> None:
        """Fold another round of the same measurement into this one."""
        self.latencies_ns += other.latencies_ns
        self.wall_ns += other.wall_ns
        self.server_cpu_s += other.server_cpu_s
        self.client_cpu_s += other.client_cpu_s
        self.errors += other.errors

    @property
    def ops(self) -> int:
        """Operations that succeeded."""
        return len(self.latencies_ns)

    def p50(self) -> float:
        """Median latency, ms."""
        return percentile_ms(self.latencies_ns, 50) if self.latencies_ns else math.nan

    def p99(self) -> float:
        """99th percentile latency, ms."""
        return percentile_ms(self.latencies_ns, 99) if self.latencies_ns else math.nan

    def rate(self) -> float:
        """Successful operations per second of wall time."""
        return self.ops / (self.wall_ns / 1e9) if self.wall_ns else math.nan

    def server_cpu_ms_per_op(self) -> float:
        """CPU the servers spent per operation (all nodes/members together), ms."""
        return self.server_cpu_s * 1000 / self.ops if self.ops else math.nan

    def client_cpu_ms_per_op(self) -> float:
        """CPU this (client) process spent per operation, ms."""
        return self.client_cpu_s * 1000 / self.ops if self.ops else math.nan


async def measure(op: Op, keys: Sequence[int], clients: int, pids: Sequence[int]) -> Measurement:
    """Run ``op`` once per key from ``clients`` concurrent workers (worker i uses client i)."""
    queue = iter(keys)
    latencies: list[int] = []
    errors: list[str] = []

    async def worker(client: int) -> None:
        for key in queue:
            start = time.perf_counter_ns()
            try:
                await op(client, key)
            except Exception as exc:  # a failed op is reported, not measured
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter_ns() - start)

    cpu_server, cpu_client = process_cpu_s(pids), own_cpu_s()
    start = time.perf_counter_ns()
    async with trio.open_nursery() as nursery:
        for client in range(clients):
            nursery.start_soon(worker, client)
    wall = time.perf_counter_ns() - start
    return Measurement(
        latencies, wall, process_cpu_s(pids) - cpu_server, own_cpu_s() - cpu_client, errors
    )


class System:
    """What the benchmark drives: ``put``/``get`` of key numbers through client ``i``."""

    name = ""
    pids: Sequence[int] = ()

    async def put(self, client: int, key: int) -> None:
        """Write value ``key`` under key ``key``."""
        raise NotImplementedError

    async def get(self, client: int, key: int) -> None:
        """Read key ``key`` (and check it holds value ``key``)."""
        raise NotImplementedError


# -- slurp --------------------------------------------------------------------------------


class Slurp(System):
    """A local slurp cluster through ``AsyncClient``s, client i starting at node i mod 3."""

    name = "slurp"

    def __init__(self, members: Sequence[LocalNode], clients: Sequence[AsyncClient]) -> None:
        self.pids = [m.pid for m in members]
        self.clients = clients
        self.payloads = Payloads(1)
        self.w: int | None = None  # the cluster's (2)
        self.r: int | None = 2

    async def put(self, client: int, key: int) -> None:
        """``AsyncClient.put`` of a new context (W = the cluster's unless ``self.w``)."""
        await self.clients[client].put(slurp_address(key), self.payloads.fields(key), w=self.w)

    async def get(self, client: int, key: int) -> None:
        """``AsyncClient.get`` of the latest version with ``r = self.r``."""
        view = await self.clients[client].get(slurp_address(key), r=self.r)
        if view.content != self.payloads.parts(key)[1]:
            raise AssertionError(f"slurp returned the wrong value for key {key}")


def client_configs(base: ClientConfig, count: int) -> list[ClientConfig]:
    """``count`` configs whose seed lists are rotated so client i connects to seed i mod n."""
    seeds = base.seeds
    return [
        replace(
            base, seeds=seeds[i % len(seeds) :] + seeds[: i % len(seeds)], timeout_s=CALL_TIMEOUT_S
        )
        for i in range(count)
    ]


# -- etcd ---------------------------------------------------------------------------------


class HttpError(Exception):
    """An HTTP exchange failed or answered an error."""


class HttpConnection:
    """One persistent HTTP/1.1 connection (keep-alive), one request at a time."""

    def __init__(self, stream: trio.abc.Stream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.buffer = b""

    @classmethod
    async def open(cls, host: str, port: int, tls: ssl.SSLContext | None) -> HttpConnection:
        """Connect (TCP_NODELAY is trio's default) and, with ``tls``, handshake."""
        stream: trio.abc.Stream = await trio.open_tcp_stream(host, port)
        if tls is not None:
            tls_stream = trio.SSLStream(stream, tls, server_hostname=host)
            await tls_stream.do_handshake()
            stream = tls_stream
        return cls(stream, f"{host}:{port}")

    async def close(self) -> None:
        """Close the stream (a peer that was killed leaves it broken: nothing to close)."""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.stream.aclose()

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """Send one request, read the whole answer; its JSON body.

        Raises:
            HttpError: The peer closed the connection, or answered a status other than 200.
        """
        payload = b"" if body is None else json.dumps(body).encode()
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        await self.stream.send_all(head.encode("ascii") + payload)
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        header, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = header.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            data = await self._read(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            data = await self._chunked()
        else:
            raise HttpError(f"{path}: an answer without a length ({status_line})")
        if status_line.split(" ", 2)[1] != "200":
            raise HttpError(f"{path}: {status_line}: {data[:200]!r}")
        return json.loads(data)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise HttpError("the connection was closed")
        self.buffer += data

    async def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            await self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            await self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    async def _chunked(self) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await self._line()).split(b";")[0], 16)
            if size == 0:
                while await self._line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(await self._read(size))
            await self._line()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class EtcdMember:
    """One etcd process."""

    name: str
    client_port: int
    peer_port: int
    process: subprocess.Popen[bytes] | None = None


class EtcdCluster:
    """A 3-member etcd cluster on loopback (TLS on client and peer links: ``--auto-tls``)."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.members = [EtcdMember(f"e{i}", free_port(), free_port()) for i in range(1, NODES + 1)]
        self.tls = ssl.create_default_context()
        self.tls.check_hostname = False
        self.tls.verify_mode = ssl.CERT_NONE  # auto-tls certificates are self-signed

    @property
    def pids(self) -> list[int]:
        """The members' process ids."""
        return [m.process.pid for m in self.members if m.process is not None]

    def start(self) -> None:
        """Start every member (``--initial-cluster-state new``) in its own data dir."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.root.mkdir(parents=True)
        for member in self.members:
            self._launch(member, "new")

    def restart(self, member: EtcdMember) -> None:
        """Start a member that was killed again, on its data dir (reaps the old process)."""
        if member.process is not None:
            member.process.wait()
        self._launch(member, "existing")

    def _launch(self, member: EtcdMember, state: str) -> None:
        initial = ",".join(f"{m.name}=https://127.0.0.1:{m.peer_port}" for m in self.members)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        client_url = f"https://127.0.0.1:{member.client_port}"
        peer_url = f"https://127.0.0.1:{member.peer_port}"
        cmd = [
            self.binary, "--name", member.name,
            "--data-dir", str(self.root / member.name),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", initial, "--initial-cluster-state", state,
            "--initial-cluster-token", "slurp-bench", "--auto-tls", "--peer-auto-tls",
            "--logger", "zap", "--log-outputs", "stderr", "--log-level", "warn",
        ]  # fmt: skip
        with (self.root / f"{member.name}.log").open("ab") as out:
            member.process = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )

    async def wait_healthy(self, timeout_s: float) -> None:
        """Until every member answers ``/health`` with true."""
        with trio.move_on_after(timeout_s):
            pending = list(self.members)
            while pending:
                for member in list(pending):
                    if member.process is not None and member.process.poll() is not None:
                        log_text = (self.root / f"{member.name}.log").read_text(errors="replace")
                        raise ClusterError(f"etcd {member.name} exited:\n{log_text[-2000:]}")
                    try:
                        conn = await self.connect(member)
                        try:
                            answer = await conn.request("GET", "/health")
                        finally:
                            await conn.close()
                    except (OSError, HttpError, trio.BrokenResourceError):
                        continue
                    if answer.get("health") == "true":
                        pending.remove(member)
                await trio.sleep(0.2)
            return
        raise ClusterError(f"etcd not healthy after {timeout_s} s")

    async def connect(self, member: EtcdMember) -> HttpConnection:
        """A persistent connection to ``member``'s client URL."""
        return await HttpConnection.open("127.0.0.1", member.client_port, self.tls)

    async def leader(self) -> EtcdMember:
        """The member that leads now (``/v3/maintenance/status``)."""
        conn = await self.connect(self.members[0])
        try:
            status = await conn.request("POST", "/v3/maintenance/status", {})
        finally:
            await conn.close()
        for member in self.members:
            conn = await self.connect(member)
            try:
                mine = await conn.request("POST", "/v3/maintenance/status", {})
            finally:
                await conn.close()
            if mine["header"]["member_id"] == status["leader"]:
                return member
        raise ClusterError("no etcd member reports itself as the leader")

    def stop(self) -> None:
        """SIGTERM every member, SIGKILL after 10 s."""
        for member in self.members:
            if member.process is not None and member.process.poll() is None:
                member.process.send_signal(signal.SIGTERM)
        for member in self.members:
            if member.process is None:
                continue
            try:
                member.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                member.process.kill()
                member.process.wait()


class Etcd(System):
    """etcd through its v3 JSON gateway, one persistent connection per client."""

    name = "etcd"

    def __init__(self, cluster: EtcdCluster, conns: Sequence[HttpConnection]) -> None:
        self.pids = cluster.pids
        self.conns = conns
        self.payloads = Payloads(1)

    async def put(self, client: int, key: int) -> None:
        """``/v3/kv/put`` (linearizable: committed through Raft)."""
        body = {"key": _b64(etcd_key(key)), "value": _b64(self.payloads.raw(key))}
        await self.conns[client].request("POST", "/v3/kv/put", body)

    async def get(self, client: int, key: int) -> None:
        """``/v3/kv/range`` of one key; linearizable (``serializable`` is false by default)."""
        answer = await self.conns[client].request(
            "POST", "/v3/kv/range", {"key": _b64(etcd_key(key))}
        )
        kvs = answer.get("kvs") or []
        if not kvs or base64.b64decode(kvs[0]["value"]) != self.payloads.raw(key):
            raise AssertionError(f"etcd returned the wrong value for key {key}")


def etcd_version(binary: str) -> str:
    """``etcd --version``'s version number."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, check=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.stdout.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# -- the run ------------------------------------------------------------------------------


@dataclass
class Settings:
    """What one run does."""

    ops: int
    quick: bool
    etcd: str | None  # the binary, or None to skip
    keep: bool
    warmup: int = WARMUP_OPS
    failover_rounds: int = bench_failover.DEFAULT_ROUNDS
    rebalance_contexts: int = 0  # 0: no rebalance/rotation phase
    index_lag_s: float = 0.0  # 0: no index-lag phase


@dataclass
class Results:
    """Every measurement, by (system, operation, clients)."""

    runs: dict[tuple[str, str, int], Measurement] = field(default_factory=dict)
    failover: dict[str, list[bench_failover.Round]] = field(default_factory=dict)
    rebalance: bench_rebalance.Outcome | None = None
    index_lag: bench_index_lag.Outcome | None = None
    rebalance_rest_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    etcd_skipped: str | None = None
    idle_cpu_ms_per_s: dict[str, float] = field(default_factory=dict)  # by system


class Bench:
    """One run: start the clusters, warm up, measure, stop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.results = Results()
        self.slurp_root = ROOT / "bench-data" / "cluster"
        self.etcd_root = ROOT / "bench-data" / "etcd"
        self.next_key = 0

    def keys(self, count: int) -> list[int]:
        """Fresh key numbers (distinct addresses for every put)."""
        start, self.next_key = self.next_key, self.next_key + count
        return list(range(start, start + count))

    def run(self) -> Results:
        """Start the slurp cluster (and etcd), measure, and stop them whatever happens."""
        etcd: EtcdCluster | None = None
        started = False
        try:
            if (self.slurp_root / "cluster.json").exists():
                cluster_down(self.slurp_root)  # a leftover of an interrupted run
            shutil.rmtree(self.slurp_root, ignore_errors=True)
            log(f"starting {NODES} slurp nodes in {self.slurp_root}")
            t0 = time.monotonic()
            members = cluster_up(self.slurp_root, NODES, timeout_s=SLURP_START_TIMEOUT_S)
            started = True
            log(f"slurp cluster healthy in {time.monotonic() - t0:.1f} s")
            if self.settings.etcd is not None:
                etcd = EtcdCluster(self.etcd_root, self.settings.etcd)
                log(f"starting {NODES} etcd members in {self.etcd_root}")
                etcd.start()
            trio.run(self._measure_all, members, etcd)
        finally:
            if etcd is not None:
                etcd.stop()
                log("etcd stopped")
            if started or (self.slurp_root / "cluster.json").exists():
                cluster_down(self.slurp_root)
                log("slurp cluster stopped")
            if not self.settings.keep:
                shutil.rmtree(self.slurp_root, ignore_errors=True)
                shutil.rmtree(self.etcd_root, ignore_errors=True)
        return self.results

    async def _measure_all(self, members: list[LocalNode], etcd: EtcdCluster | None) -> None:
        most = max(CONCURRENCY)
        base = load_profile(self.slurp_root / "client.toml")
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(open_client(config))
                for config in client_configs(base, most)
            ]
            slurp = Slurp(members, clients)
            systems: list[System] = [slurp]
            if etcd is not None:
                t0 = time.monotonic()
                await etcd.wait_healthy(ETCD_START_TIMEOUT_S)
                leader = await etcd.leader()
                log(f"etcd healthy in {time.monotonic() - t0:.1f} s; leader {leader.name}")
                # client 0 (the 1-client runs) talks to the leader: etcd's best case
                order = [leader] + [m for m in etcd.members if m is not leader]
                conns = []
                for i in range(most):
                    conn = await etcd.connect(order[i % len(order)])
                    stack.push_async_callback(conn.close)
                    conns.append(conn)
                systems.append(Etcd(etcd, conns))
                self.results.notes.append(
                    f"etcd: the 1-client runs talk to the leader ({leader.name}, etcd's best"
                    " case: no forwarding); the 16 clients are spread over the 3 members."
                )
            await self._warm_up(systems, most)
            await self._idle(systems)
            await self._compare(systems, most)
            await self._slurp_only(slurp)
            if self.settings.index_lag_s:
                await self._index_lag(clients)
            if self.settings.failover_rounds:
                await self._failover(members, base, etcd)
            if self.settings.rebalance_contexts:  # last: the cluster grows by a node
                await self._rebalance(members, base)

    async def _index_lag(self, clients: Sequence[AsyncClient]) -> None:
        """Sustained puts; how long until search sees them (bench_index_lag)."""
        log(f"index lag: {bench_index_lag.WRITERS} writers for {self.settings.index_lag_s:g} s")
        out = await bench_index_lag.run(clients, self.settings.index_lag_s)
        self.results.index_lag = out
        if out.put_errors:
            self.results.notes.append(
                f"index lag: {len(out.put_errors)} puts failed (first: {out.put_errors[0]})"
            )
        if out.missing or out.status_errors:
            self.results.notes.append(
                f"index lag: {out.missing} probes not searchable within"
                f" {bench_index_lag.PROBE_TIMEOUT_S:g} s; {out.status_errors} status polls failed"
            )

    async def _rebalance(self, members: list[LocalNode], base: ClientConfig) -> None:
        """Load, join a 4th node under writes, rotate (bench_rebalance)."""
        rest = bench_rebalance.QUICK_REST_S if self.settings.quick else bench_rebalance.REST_S
        out = await bench_rebalance.run(
            self.slurp_root, members, base, self.settings.rebalance_contexts, rest
        )
        self.results.rebalance, self.results.rebalance_rest_s = out, rest
        self.results.notes += [f"rebalance: {note}" for note in out.notes]
        if out.write_errors:
            self.results.notes.append(
                f"rebalance: {len(out.write_errors)} steady-writer puts failed (first:"
                f" {out.write_errors[0]})"
            )
        self.results.notes.append(
            f"rebalance: {out.joined} joined; {len(out.rest_latencies_s)} writes at rest,"
            f" {len(out.move_latencies_s)} during the join; the rotation counted"
            f" {out.rotation_rows:,} rows (all replicas) on {out.rotation_members} members,"
            f" phase {out.rotation_phase or 'unfinished'}."
        )

    async def _failover(
        self, members: list[LocalNode], base: ClientConfig, etcd: EtcdCluster | None
    ) -> None:
        """SIGKILL of the leader, ``failover_rounds`` times on each side (bench_failover)."""
        rounds = self.settings.failover_rounds
        log(f"failover: {rounds} round(s) per system")
        payloads = Payloads(2)
        self.results.failover["slurp"] = await bench_failover.slurp_rounds(
            self.slurp_root, members, base, rounds, payloads.fields
        )
        if etcd is not None:
            self.results.failover["etcd"] = await bench_failover.etcd_rounds(
                etcd, rounds, payloads.raw
            )
        for name, done in self.results.failover.items():
            self.results.notes.append(
                f"{name} failover rounds (killed → new leader: ms to the first success, longest"
                " write gap ms, failed writes): "
                + "; ".join(
                    f"{r.killed} → {r.new_leader}: {r.failover_s * 1000:.0f},"
                    f" {r.longest_gap_s * 1000:.0f}, {r.failed_writes}"
                    for r in done
                )
                + "."
            )
            errors = [e for r in done for e in r.errors]
            if errors:
                self.results.notes.append(
                    f"{name} failover: writes that failed during leader loss said, first:"
                    f" {errors[0]}"
                )

    async def _warm_up(self, systems: Sequence[System], clients: int) -> None:
        """Every client puts and gets a few keys (connections, caches, JIT-free paths warm)."""
        keys = self.keys(self.settings.warmup * clients)
        for system in systems:
            for op in (system.put, system.get):
                run = await measure(op, keys, clients, system.pids)
                if run.errors:
                    raise ClusterError(f"{system.name} warm-up failed: {run.errors[0]}")
        log(f"warmed up: {len(keys)} puts and gets on each side")

    async def _idle(self, systems: Sequence[System]) -> None:
        """Server CPU with no client request (heartbeats, failure detection, indexing
        loops): it is part of every "CPU per op" row, more so at low throughput."""
        for system in systems:
            before = process_cpu_s(system.pids)
            await trio.sleep(IDLE_S)
            spent = process_cpu_s(system.pids) - before
            self.results.idle_cpu_ms_per_s[system.name] = spent * 1000 / IDLE_S
        log(f"idle server CPU (ms/s): {self.results.idle_cpu_ms_per_s}")

    async def _compare(self, systems: Sequence[System], most: int) -> None:
        """Puts then gets, 1 then 16 clients, each split into rounds: slurp, etcd, slurp..."""
        written: dict[int, list[int]] = {}
        for clients in CONCURRENCY:
            written[clients] = self.keys(self.settings.ops)
            await self._rounds(systems, "put", clients, written[clients])
        for clients in CONCURRENCY:
            keys = list(written[clients])
            random.Random(clients).shuffle(keys)
            await self._rounds(systems, "get", clients, keys)

    async def _rounds(
        self, systems: Sequence[System], op: str, clients: int, keys: Sequence[int]
    ) -> None:
        """One measurement per system, in alternating rounds (same background for both)."""
        rounds = max(1, min(MAX_ROUNDS, len(keys) // MIN_ROUND_OPS))
        chunks = [keys[i::rounds] for i in range(rounds)]
        log(f"{op}: {len(keys)} ops, {clients} client(s), {rounds} round(s) per system")
        totals: dict[str, Measurement] = {}
        for chunk in chunks:
            for system in systems:
                run = await measure(getattr(system, op), chunk, clients, system.pids)
                if system.name in totals:
                    totals[system.name].add(run)
                else:
                    totals[system.name] = run
        for name, run in totals.items():
            self._store(name, op, clients, run)

    async def _slurp_only(self, slurp: Slurp) -> None:
        """Put with W=1 and get with R=1 (1 client): what the quorum wait costs."""
        slurp.w, slurp.r = 1, 1
        try:
            keys = self.keys(self.settings.ops)
            self._store("slurp", "put W=1", 1, await measure(slurp.put, keys, 1, slurp.pids))
            random.Random(3).shuffle(keys)
            self._store("slurp", "get R=1", 1, await measure(slurp.get, keys, 1, slurp.pids))
        finally:
            slurp.w, slurp.r = None, 2

    def _store(self, name: str, op: str, clients: int, run: Measurement) -> None:
        self.results.runs[(name, op, clients)] = run
        log(
            f"  {name} {op} x{clients}: p50 {run.p50():.2f} ms, p99 {run.p99():.2f} ms,"
            f" {run.rate():,.0f} ops/s, {len(run.errors)} errors"
        )
        if run.errors:
            self.results.notes.append(
                f"{name} {op}, {clients} client(s): {len(run.errors)} of"
                f" {run.ops + len(run.errors)} failed (first: {run.errors[0]})"
            )


# -- the report ---------------------------------------------------------------------------

HEADER = ["metric", "slurp", "etcd", "ratio slurp/etcd", "goal", "met?"]


@dataclass
class Row:
    """One line of the table."""

    metric: str
    slurp: float
    etcd: float | None
    goal: str = "—"
    limit: float | None = None  # an absolute goal: slurp's figure at or below it
    count: bool = False  # whole numbers

    @property
    def ratio(self) -> float | None:
        """slurp / etcd (None without etcd)."""
        if self.etcd is None or not self.etcd or math.isnan(self.etcd) or math.isnan(self.slurp):
            return None
        return self.slurp / self.etcd

    @property
    def met(self) -> bool | None:
        """For a row with a goal: whether slurp's figure is at or below ``limit`` (if set),
        else at or below etcd's."""
        if self.limit is not None:
            return None if math.isnan(self.slurp) else self.slurp <= self.limit
        if self.goal != "≤ etcd" or self.ratio is None:
            return None
        return self.ratio <= 1.0

    def cells(self) -> list[str]:
        """metric, slurp, etcd, ratio, goal, met?"""
        ratio = self.ratio
        num = _count if self.count else _num
        return [
            self.metric,
            num(self.slurp),
            "—" if self.etcd is None else num(self.etcd),
            "—" if ratio is None else f"{ratio:.2f}x",
            self.goal,
            {None: "—", True: "yes", False: "**no**"}[self.met],
        ]


def _count(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:g}"


def _num(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def build_rows(results: Results) -> tuple[list[Row], list[Row]]:
    """The comparison rows and the slurp-only rows."""
    runs = results.runs
    rows: list[Row] = []
    for op, label in (("put", "put"), ("get", "get")):
        for clients in CONCURRENCY:
            mine, theirs = runs[("slurp", op, clients)], runs.get(("etcd", op, clients))
            who = f"{clients} client" + ("s" if clients > 1 else "")
            rows += [
                Row(
                    f"{label} p50, {who} (ms)",
                    mine.p50(),
                    None if theirs is None else theirs.p50(),
                    "≤ etcd",
                ),
                Row(
                    f"{label} p99, {who} (ms)", mine.p99(), None if theirs is None else theirs.p99()
                ),
                Row(
                    f"{label} throughput, {who} (ops/s)",
                    mine.rate(),
                    None if theirs is None else theirs.rate(),
                ),
                Row(
                    f"{label} server CPU per op, {who} (ms)",
                    mine.server_cpu_ms_per_op(),
                    None if theirs is None else theirs.server_cpu_ms_per_op(),
                ),
            ]
    if "slurp" in results.idle_cpu_ms_per_s:
        rows.append(
            Row(
                f"idle server CPU, {NODES} processes (ms per s)",
                results.idle_cpu_ms_per_s["slurp"],
                results.idle_cpu_ms_per_s.get("etcd"),
            )
        )
    rows += failover_rows(results.failover)
    extra: list[Row] = []
    if results.index_lag is not None:
        extra += [
            Row(label, value, None, count=count)
            for label, value, count in bench_index_lag.figures(results.index_lag)
        ]
    if results.rebalance is not None:
        extra += [
            Row(label, value, None, count=count)
            for label, value, count in bench_rebalance.figures(results.rebalance)
        ]
    for (name, op, clients), run in runs.items():
        if name == "slurp" and op not in ("put", "get"):
            extra += [
                Row(f"{op} p50, {clients} client (ms)", run.p50(), None),
                Row(f"{op} p99, {clients} client (ms)", run.p99(), None),
            ]
    for (name, op, clients), run in runs.items():
        if name == "slurp" and op in ("put", "get") and clients == max(CONCURRENCY):
            extra.append(
                Row(
                    f"{op} client CPU per op, {clients} clients (ms)",
                    run.client_cpu_ms_per_op(),
                    None,
                )
            )
    return rows, extra


def failover_rows(failover: dict[str, list[bench_failover.Round]]) -> list[Row]:
    """The failover figures (bench_failover.figures) as rows."""
    return [
        Row(label, ours, theirs, goal, limit, count=count)
        for label, ours, theirs, goal, limit, count in bench_failover.figures(failover)
    ]


def render_table(rows: Sequence[Row], header: Sequence[str]) -> list[str]:
    """Markdown table lines."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---", *(["--:"] * (len(header) - 3)), "---", "---"][: len(header)]) + "|",
    ]
    lines += ["| " + " | ".join(row.cells()[: len(header)]) + " |" for row in rows]
    return lines


def render_text(rows: Sequence[Row], extra: Sequence[Row], notes: Sequence[str]) -> str:
    """The tables as aligned plain text."""

    def table(cells: list[list[str]]) -> list[str]:
        widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return lines

    main = table([HEADER] + [[c.replace("**", "") for c in r.cells()] for r in rows])
    only = table([["slurp only", "slurp"]] + [r.cells()[:2] for r in extra])
    return "\n".join([*main, "", *only, "", *notes])


def guarantees(etcd_ran: bool) -> list[str]:
    """What each side promises when it answers."""
    lines = [
        "slurp: a put is answered once W = 2 of the 3 replicas have stored it durably (LevelDB"
        " `sync=True`) after the coordinator encrypted and signed it (no read before the write:"
        " the parent is the coordinator's own latest version); a get asks the replicas and"
        " answers from the first R = 2 version sets, merged (union, then read repair), and"
        " decrypts on the coordinator."
        " Client and node links are mutual TLS.",
    ]
    if etcd_ran:
        lines.append(
            "etcd: a put is linearizable: committed through Raft (the leader and a majority"
            " fsync the WAL entry) before it is answered; a get is a linearizable range"
            " (`serializable: false`: a ReadIndex round to the leader confirms it still leads"
            " before the member answers). Client and peer links use TLS (`--auto-tls`"
            " `--peer-auto-tls`); requests go through etcd's v3 HTTP/JSON gateway, one"
            " persistent HTTP/1.1 connection per client, from the same trio process that"
            " drives the slurp clients."
        )
    return lines


def render_markdown(
    results: Results, settings: Settings, revision: str, versions: str, rows: Sequence[Row],
    extra: Sequence[Row],
) -> str:  # fmt: skip
    """The BENCHMARKS.md section body (without the markers)."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    etcd_ran = results.etcd_skipped is None
    lines = [
        "## Cluster: 3 slurp nodes"
        + (" beside 3 etcd members" if etcd_ran else "")
        + " (`scripts/bench cluster`)",
        "",
        f"{when} · commit {revision} · {os.cpu_count()} cores · {versions} ·"
        f" N = {settings.ops:,} ops per measurement, ~{VALUE_BYTES} B values ·"
        f" {NODES} nodes on loopback, same filesystem",
        "",
    ]
    if not etcd_ran:
        lines += [f"**etcd skipped:** {results.etcd_skipped}", ""]
    lines += render_table(rows, HEADER)
    lines += [
        "",
        "Ratio = slurp / etcd: below 1 is better for slurp on latency and CPU rows, above 1 is"
        " better for slurp on throughput rows. Goal (from the issue): slurp's put p50 at or"
        " below etcd's put p50, slurp's get p50 at or below etcd's linearizable get p50.",
        "get = slurp `ctx.get` of the latest version with R = 2 (decrypted on the node) vs"
        " etcd's linearizable `range` of one key. Each measurement runs N operations: puts to N"
        " distinct addresses, gets of the N"
        " addresses the matching put run wrote (shuffled), latest version. With 16 clients the"
        " N operations are shared by 16 concurrent workers, each on its own connection; client"
        " i starts at node/member i mod 3. A measurement runs in up to 5 rounds alternating slurp"
        " and etcd (same background load for both). Throughput = N / wall time. Server CPU ="
        " user + system time of the 3 server processes during the run, / N (the 2 cores are"
        " shared by the"
        " servers and the client process); it includes what the servers spend with no request"
        f" at all (the idle row, measured for {IDLE_S:g} s after the warm-up: heartbeats,"
        " failure detection, index loops), which weighs more at low throughput.",
        "",
        *(
            [bench_failover.describe(len(results.failover["slurp"])), ""]
            if results.failover
            else []
        ),
        *([bench_index_lag.describe(results.index_lag), ""] if results.index_lag else []),
        *(
            [bench_rebalance.describe(results.rebalance, results.rebalance_rest_s), ""]
            if results.rebalance is not None
            else []
        ),
        "Slurp only:",
        "",
        *render_table(extra, ["metric", "slurp"]),
        "",
        *(f"- {line}" for line in guarantees(etcd_ran)),
        *(f"- {note}" for note in results.notes),
    ]
    return "\n".join(lines)


# -- entry point --------------------------------------------------------------------------


def write_report_section(path: Path, body: str) -> None:
    """This benchmark's section of BENCHMARKS.md."""
    write_section(path, body, START_MARKER, END_MARKER)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="scripts/bench cluster", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--ops", type=int, default=None, help=f"ops per measurement ({DEFAULT_OPS})"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_OPS} ops, fewer warm-ups")
    parser.add_argument("--no-etcd", action="store_true", help="skip the etcd comparison")
    parser.add_argument(
        "--failover-rounds",
        type=int,
        default=None,
        help=f"leader kills per system ({bench_failover.DEFAULT_ROUNDS};"
        f" --quick: {bench_failover.QUICK_ROUNDS}; 0: no failover phase)",
    )
    parser.add_argument(
        "--rebalance-contexts",
        type=int,
        default=None,
        help=f"contexts loaded before a 4th node joins, then rotated"
        f" ({bench_rebalance.DEFAULT_CONTEXTS:,}; --quick: {bench_rebalance.QUICK_CONTEXTS:,};"
        " 0: no rebalance/rotation phase)",
    )
    parser.add_argument(
        "--index-lag-s",
        type=float,
        default=None,
        help=f"seconds of sustained puts while search visibility is probed"
        f" ({bench_index_lag.DEFAULT_SECONDS:g}; --quick: {bench_index_lag.QUICK_SECONDS:g};"
        " 0: no index-lag phase)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file")
    parser.add_argument("--keep", action="store_true", help="keep bench-data/cluster and etcd")
    args = parser.parse_args(argv)
    if args.ops is None:
        args.ops = QUICK_OPS if args.quick else DEFAULT_OPS
    if args.failover_rounds is None:
        args.failover_rounds = (
            bench_failover.QUICK_ROUNDS if args.quick else bench_failover.DEFAULT_ROUNDS
        )
    if args.rebalance_contexts is None:
        args.rebalance_contexts = (
            bench_rebalance.QUICK_CONTEXTS if args.quick else bench_rebalance.DEFAULT_CONTEXTS
        )
    if args.index_lag_s is None:
        args.index_lag_s = (
            bench_index_lag.QUICK_SECONDS if args.quick else bench_index_lag.DEFAULT_SECONDS
        )
    if args.index_lag_s < 0:
        parser.error("--index-lag-s must be 0 or more")
    if args.rebalance_contexts < 0:
        parser.error("--rebalance-contexts must be 0 or more")
    if args.failover_rounds < 0:
        parser.error("--failover-rounds must be 0 or more")
    if args.ops < max(CONCURRENCY):
        parser.error(f"--ops must be at least {max(CONCURRENCY)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table, update the Markdown file."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    binary = None if args.no_etcd else shutil.which("etcd")
    settings = Settings(
        ops=args.ops,
        quick=args.quick,
        etcd=binary,
        keep=args.keep,
        warmup=2 if args.quick else WARMUP_OPS,
        failover_rounds=args.failover_rounds,
        rebalance_contexts=args.rebalance_contexts,
        index_lag_s=args.index_lag_s,
    )
    revision = git_revision()
    versions = f"Python {platform.python_version()} · slurp {metadata.version('slurp')}"
    versions += f" · trio {metadata.version('trio')}"
    skipped = None
    if args.no_etcd:
        skipped = "--no-etcd was given."
    elif binary is None:
        skipped = (
            "no `etcd` binary on PATH (Debian: `apt-get install etcd-server`); slurp figures only."
        )
    else:
        versions += f" · etcd {etcd_version(binary)}"
    if skipped:
        log(f"etcd skipped: {skipped}")
    log(f"N={settings.ops} ops per measurement at commit {revision}")
    started, load_before = time.monotonic(), os.getloadavg()[0]
    results = Bench(settings).run()
    results.etcd_skipped = skipped
    results.notes.append(
        f"Whole run: {time.monotonic() - started:.0f} s (cluster start-up included); 1-minute"
        f" load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after (other"
        " processes on the machine skew every figure)."
    )
    rows, extra = build_rows(results)
    print(render_text(rows, extra, [*guarantees(skipped is None), *results.notes]))
    write_report_section(
        args.out, render_markdown(results, settings, revision, versions, rows, extra)
    )
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
