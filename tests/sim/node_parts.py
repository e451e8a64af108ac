"""The parts of one simulated node that outlive or surround its processes.

Owns: ``SimNode`` (a node across its lives: its durable ``MemoryKV``, its committed index
documents, its fault switches), ``FaultyKV`` (the durable store seen through a disk that
can fail), the dialer that kills an armed coordinator mid-write, the per-process
templates (data directories, rings), the simulation's wall clock, and letting go of a
store as a dying process does. Used by ``tests.sim.engine``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from crypto.roles import DEFAULT_ROLES
from node.cluster.ring import Ring, RingMember
from node.cluster.service import NodeService, ServiceConfig
from node.errors import PeerUnavailable
from node.rpc.peers import PeerPool
from storage.context_store import ContextStore
from storage.errors import Unavailable
from storage.kv import Deletes, MemoryKV, Puts
from tests.sim import memory_index

BASE_MS = 1_700_000_000_000  # the wall clock of the simulation at trio time 0


class FaultyKV:
    """A node's durable ``MemoryKV`` seen through a disk that can fail; ``close`` leaves the
    durable store intact (it outlives the process that crashed)."""

    def __init__(self, durable: MemoryKV, node: SimNode) -> None:
        self._durable = durable
        self._node = node
        self._closed = False

    def get(self, key: bytes) -> bytes | None:
        """Read through."""
        self._check()
        return self._durable.get(key)

    def write(self, puts: Puts, deletes: Deletes = (), *, sync: bool = True) -> None:
        """Write through, or fail as ``LevelDBKV`` does when the disk is full."""
        self._check()
        if self._node.disk_failing:
            self._node.disk_failures += 1
            raise Unavailable(
                "the database write failed: IO error: No space left on device (simulated)",
                field="data_dir",
            )
        self._durable.write(puts, deletes, sync=sync)

    def scan(self, prefix: bytes, *, reverse: bool = False, after: bytes | None = None) -> Any:
        """Scan through."""
        self._check()
        return self._durable.scan(prefix, reverse=reverse, after=after)

    def scan_keys(self, prefix: bytes) -> Iterator[bytes]:
        """Scan keys through."""
        self._check()
        return self._durable.scan_keys(prefix)

    def compact(self) -> None:
        """Nothing to reclaim."""

    def close(self) -> None:
        """This process lets go; the durable store stays."""
        self._closed = True

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError("a crashed node's store was used after the crash")


@dataclass
class SimNode:
    """One simulated node across its lives."""

    name: str
    root: Path
    durable: MemoryKV = field(default_factory=MemoryKV)
    index_docs: dict[str, Any] = field(default_factory=dict)  # committed index documents
    disk_failing: bool = False
    disk_failures: int = 0
    crash_after_sends: int | None = None
    store: ContextStore | None = None
    service: NodeService | None = None
    scope: trio.CancelScope | None = None
    stopped: trio.Event | None = None
    failures: list[str] = field(default_factory=list)
    teardown_errors: int = 0
    lives: int = 0

    @property
    def running(self) -> bool:
        """Whether the node is up (started and not crashed)."""
        return self.stopped is not None and not self.stopped.is_set()


class CrashingDialer:
    """The service's dialer: the pool, except that an armed node dies on a replica send."""

    def __init__(self, pool: PeerPool, node: SimNode) -> None:
        self._pool = pool
        self._node = node

    async def call(
        self, name: str, method: str, body: dict[str, Any], *, timeout_s: float
    ) -> dict[str, Any]:
        node = self._node
        if method == "rep.store" and node.crash_after_sends is not None:
            if node.crash_after_sends == 0:
                node.crash_after_sends = None
                assert node.scope is not None
                node.scope.cancel()
                await trio.lowlevel.checkpoint()
                raise PeerUnavailable("unreachable: the coordinator crashed")
            node.crash_after_sends -= 1
        return await self._pool.call(name, method, body, timeout_s=timeout_s)


_TEMPLATES: dict[int, tuple[Path, list[bytes]]] = {}


def template(nodes: int) -> tuple[Path, list[bytes]]:
    """Initialised data directories ``n1``..``nK`` sharing role identities, and their
    signing keys; built once per process (age identities and keyrings are slow to make)
    and copied per schedule."""
    if nodes not in _TEMPLATES:
        root = Path(tempfile.mkdtemp(prefix=f"slurp-sim-template-{nodes}-"))
        names = [f"n{i}" for i in range(1, nodes + 1)]
        ContextStore.init(root / names[0], DEFAULT_ROLES)
        with ContextStore.open(root / names[0], kv=MemoryKV()) as store:
            identities = {r.name: store.keyring.current_identity(r.name) for r in DEFAULT_ROLES}
        for name in names[1:]:
            ContextStore.init(root / name, DEFAULT_ROLES, role_identities=identities)
        keys = []
        for name in names:
            config = root / name / "config.toml"  # index commits only on purge, close, 256 docs
            text = config.read_text(encoding="utf-8")
            config.write_text(text.replace("index_refresh_s = 1.0", "index_refresh_s = 3600.0"))
            with ContextStore.open(root / name, kv=MemoryKV()) as store:
                keys.append(store.keyring.signer.public_key)
        _TEMPLATES[nodes] = (root, keys)
    return _TEMPLATES[nodes]


def sim_clock_ms() -> int:
    """Wall milliseconds of the simulation: trio's (mock) clock from ``BASE_MS``."""
    try:
        return BASE_MS + int(trio.current_time() * 1000)
    except RuntimeError:  # outside trio (opening the template)
        return BASE_MS


_RINGS: dict[tuple[str, ...], Ring] = {}


def ring_of(names: Sequence[str]) -> Ring:
    """The ring of ``names`` as a ``NodeService`` builds it, built once per process."""
    key = tuple(sorted(names))
    if key not in _RINGS:
        _RINGS[key] = Ring([RingMember(name) for name in key], vnodes=ServiceConfig().vnodes)
    return _RINGS[key]


def share_ring(service: NodeService, names: Sequence[str]) -> None:
    """Give a new service the process's ring (rings are immutable and slow to build; the
    service would build the same one on its first request)."""
    service._ring, service._ring_key = ring_of(names), tuple(sorted(names))


def abandon(store: ContextStore) -> None:
    """Let go of a store as a dying process does: buffered index changes are lost (not
    committed; the watermark stays unclean, so the next open re-indexes) and the index
    directory's locks are released; the durable KV is untouched."""
    index: Any = store.index._index  # the BufferedIndex under IndexSync (sim-only reach-in)
    store.index._closed = True
    if not index._closed:
        memory_index.abandon(index)
    store.kv.close()


def leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found
