"""The parts of one simulated node that outlive or surround its processes.

Owns: ``SimNode`` (a node across its lives: its durable ``MemoryKV``, its committed index
documents, its fault switches), ``FaultyKV`` (the durable store seen through a disk that
can fail), the dialer that kills an armed coordinator mid-write, the per-process
templates (data directories, rings), the simulation's wall clock, and letting go of a
store as a dying process does. Used by ``tests.sim.engine``.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from crypto.keyfiles import write_secret_file
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from crypto.signing import Signer
from node.cluster.ring import Ring, RingMember
from node.cluster.service import NodeService, ServiceConfig
from node.control.bootstrap import (
    cluster_snapshot,
    custody_of,
    key_epochs_of,
    mark_join,
    member_of,
)
from node.control.log_store import write_bootstrap
from node.errors import PeerUnavailable
from node.rpc.peers import PeerPool
from storage.admin_key import META_ADMIN_SPLIT, OWN_SHARE_FILE, split_admin
from storage.context_store import ContextStore
from storage.errors import Unavailable
from storage.kv import Deletes, MemoryKV, Puts
from storage.schema import FORMAT_VERSION, META_FORMAT
from tests.sim import memory_index

BASE_MS = 1_700_000_000_000  # the wall clock of the simulation at trio time 0
FORMAT_ROW = (META_FORMAT, str(FORMAT_VERSION).encode())  # as `slurp init` writes it


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
    starting: trio.Event | None = None  # set when the start under way is over
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


@dataclass(frozen=True)
class Spare:
    """A node directory created to join: what ``ctl.member_add`` records of it."""

    name: str
    node_id: str
    recipient: str
    signing_key: bytes


@dataclass(frozen=True)
class Template:
    """Initialised data directories ``n1``..``nK`` (the founders) and the spares after
    them, and what every schedule copies from them."""

    root: Path
    signers: list[bytes]  # every node's version-signing key (the spares' too)
    # the storage format row, the Raft bootstrap snapshot and the admin split record
    control_rows: list[tuple[bytes, bytes]]
    spares: dict[str, Spare] = field(default_factory=dict)
    # a spare's first rows: the storage format row and the join marker
    join_rows: list[tuple[bytes, bytes]] = field(default_factory=list)


_TEMPLATES: dict[tuple[int, int], Template] = {}


def template(nodes: int, spares: int = 0) -> Template:
    """Initialised data directories ``n1``..``nK`` sharing role identities, their signing
    keys, and the rows each node's durable store starts with; built once per process (age
    identities, keyrings and Shamir splits are slow to make) and linked per schedule.

    As ``node.daemon.cluster_init`` does: the admin identity is Shamir-split across the
    nodes (majority threshold; node i keeps share i in ``keys/admin.share.age``, the admin
    key file is forgotten), and one bootstrap snapshot of the cluster metadata (every node
    a voter, custody of the split) goes into every node's store with the split record.

    The ``spares`` directories after the founders are made as ``cluster add`` makes a
    joiner's: the cluster's role identities without admin's, and (``join_rows``) the join
    marker in place of a bootstrap. Both row sets start with the storage format row, as
    ``slurp init`` writes it into the database (``ContextStore.open`` writes it only into
    a passed KV that lacks it: without it, a spare whose first start found its disk
    failing raised out of the engine, seeds 9050 and 9135).

    Each node's version-signing key, hence its node id (the Raft id; ids order the
    configuration, the members and their rows), is derived from its name
    (``seeded_signer``), so a replay in another process runs the same schedule.
    """
    if (nodes, spares) not in _TEMPLATES:
        root = Path(tempfile.mkdtemp(prefix=f"slurp-sim-template-{nodes}-{spares}-"))
        names = [f"n{i}" for i in range(1, nodes + spares + 1)]
        with seeded_signer(names[0]):
            ContextStore.init(root / names[0], DEFAULT_ROLES)
        with ContextStore.open(root / names[0], kv=MemoryKV()) as store:
            identities = {r.name: store.keyring.current_identity(r.name) for r in DEFAULT_ROLES}
        for name in names[1:]:
            with seeded_signer(name):
                ContextStore.init(root / name, DEFAULT_ROLES, role_identities=identities)
        for name in names:
            config = root / name / "config.toml"  # index commits only on purge, close, 256 docs
            text = config.read_text(encoding="utf-8")
            config.write_text(text.replace("index_refresh_s = 1.0", "index_refresh_s = 3600.0"))
        signers, rows = _split_and_bootstrap(root, names[:nodes])
        made = {name: _spare(root, name) for name in names[nodes:]}
        joining = MemoryKV()
        joining.write([FORMAT_ROW])
        mark_join(joining)
        _TEMPLATES[(nodes, spares)] = Template(
            root, signers + [spare.signing_key for spare in made.values()], rows, made,
            list(joining.scan(b"")),
        )  # fmt: skip
    return _TEMPLATES[(nodes, spares)]


@contextmanager
def seeded_signer(name: str) -> Iterator[None]:
    """While open, ``Signer.generate`` makes the key derived from ``name`` (sim only: a
    node's id is then the same in every process)."""
    seed = hashlib.sha256(f"slurp-sim-node-signing-key:{name}".encode()).digest()
    original = Signer.generate

    def generate() -> Signer:
        return Signer(Ed25519PrivateKey.from_private_bytes(seed))

    Signer.generate = generate  # type: ignore[method-assign]
    try:
        yield
    finally:
        Signer.generate = original  # type: ignore[method-assign]


def _spare(root: Path, name: str) -> Spare:
    """Forget the spare's admin identity (the cluster's is split); its identity."""
    with ContextStore.open(root / name, kv=MemoryKV()) as store:
        store.keyring.forget(ADMIN_ROLE)
        keyring = store.keyring
        return Spare(name, keyring.node_id, keyring.node_recipient, keyring.signer.public_key)


def _split_and_bootstrap(
    root: Path, names: list[str]
) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """Split admin, keep one share per node, forget admin; the signers and the rows."""
    stores = [ContextStore.open(root / name, kv=MemoryKV()) for name in names]
    try:
        first = stores[0]
        split_admin(
            first, threshold=len(names) // 2 + 1, shares=len(names),
            to=[store.keyring.node_recipient for store in stores], out_dir=root / "shares",
        )  # fmt: skip
        record = first.kv.get(META_ADMIN_SPLIT)
        assert record is not None
        for number, store in enumerate(stores, start=1):
            own = store.keyring.keys_dir / OWN_SHARE_FILE
            write_secret_file(own, (root / "shares" / f"share-{number}.age").read_bytes())
            store.keyring.forget(ADMIN_ROLE)
        founding = [
            member_of(store.keyring, name, "127.0.0.1", 0)
            for name, store in zip(names, stores, strict=True)
        ]
        holders = {member.node_id: number for number, member in enumerate(founding, start=1)}
        snapshot = cluster_snapshot(
            founding, custody_of(first, holders), key_epochs_of(first.keyring),
            cluster_id="slurp-sim",
        )  # fmt: skip
        rows = MemoryKV()
        rows.write([FORMAT_ROW])
        write_bootstrap(rows, snapshot)
        rows.write([(META_ADMIN_SPLIT, record)])
        signers = [store.keyring.signer.public_key for store in stores]
        return signers, list(rows.scan(b""))
    finally:
        for store in stores:
            store.close()


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
