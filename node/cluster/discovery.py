"""Discovery: a Kademlia node (bmuller/kademlia under trio-asyncio) that publishes this
node's signed record and finds every member's (ARCHITECTURE.md §6).

Owns: the DHT key of a record, the member walk, the Kademlia protocol's input checks and
the JSON state file. Must not know: what members are for (ring, replication), liveness
(the RPC layer feeds ``Membership``), record verification (``node.cluster.membership``).

Scheme:

- A node's Kademlia id is its record key, ``SHA-1("slurp/node/" + name)``: the node is the
  closest node to its own key, and a contact's record sits at the key equal to its id.
- Every round (``refresh_s``, or at once after ``set_record``): bootstrap while the routing
  table is empty (ping the configured and saved addresses, then look up our own id, §2.3);
  publish (store our record at the k nodes closest to its key, §2.3); walk the overlay
  breadth-first from our contacts: ask each node its routing table (``slurp_peers``, our
  one extension RPC) and FIND_VALUE its own id; if it does not answer, look its key up on
  its replicas. Every record fetched goes to ``Membership.observe``. Each joining node is
  kept in its bootstrap node's table, so a walk from any one member reaches them all.
- Cost: a round is two small RPCs per member (N^2 across the cluster), fine for tens of
  nodes; past a few hundred, a round should walk only a slice of the members.
- Trust: Kademlia ids and contacts are unauthenticated, so a rogue can delay or hide
  records (claim an id, answer nothing), never forge one: records verify under our CA.

The library's weak parts, and what this module does instead:

- Fire-and-forget tasks: datagrams are answered synchronously (no task per datagram); the
  work the library would detach (STORE to a newcomer §2.5, PING of a full bucket's head
  §2.2) goes through a bounded queue into this service's nursery (dropped and counted when
  full). Nothing outlives ``run``; the asyncio loop exists only inside it.
- Trusting the network: requests and responses are type-checked; malformed ones are dropped
  and counted. Storage holds only records that verify under our CA, newest per key.
- pickle: the state file is JSON ``{"version": 1, "neighbours": [[host, port], ...]}``.
- The library re-adds nothing it already knows, so a restarted node (same id, new port)
  stayed unreachable: here a contact we hear from is refreshed with its current address.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import trio
import trio_asyncio
from kademlia.crawling import NodeSpiderCrawl, ValueSpiderCrawl
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.routing import RoutingTable

from node.cluster.membership import (
    CertificateVerifier,
    Membership,
    NodeRecord,
    RecordMalformed,
    RecordRejected,
    newer,
)
from node.errors import NodeError

RECORD_KEY_PREFIX = "slurp/node/"
STATE_VERSION = 1
ID_BYTES = 20
MAX_PEERS_PER_REPLY = 128  # ~40 bytes each: a reply stays far below a UDP datagram
MAX_SPAWNED_RUNNING = 64  # Kademlia tasks running at once; beyond that they wait in the channel
SPAWN_QUEUE_LEN = 128
_REQUEST, _RESPONSE = b"\x00", b"\x01"
_RPC_ARITY = {"ping": 1, "store": 3, "find_node": 2, "find_value": 2, "slurp_peers": 1}

Address = tuple[str, int]
_Work = Callable[[], Awaitable[object]]  # an asyncio coroutine function, run by the shell
Spawn = Callable[[_Work], None]


class DiscoveryStateError(NodeError):
    """The discovery state file exists but is not a version-1 state file."""


def record_key(name: str) -> bytes:
    """The DHT key of ``name``'s record, which is also that node's Kademlia id."""
    return hashlib.sha1((RECORD_KEY_PREFIX + name).encode(), usedforsecurity=False).digest()


def _address(host: object, port: object) -> Address:
    """An (IP, port) pair; kademlia sends to IP literals only (never resolves names)."""
    if type(port) is not int or not 0 < port < 65536 or not isinstance(host, str):
        raise ValueError("an address is an IP literal and a port in 1..65535")
    ipaddress.ip_address(host)  # raises ValueError
    return (host, port)


@dataclass(frozen=True)
class DiscoveryConfig:
    """Where the DHT listens, whom it joins through, and how often it refreshes.

    Attributes:
        host: UDP listen address (an IP literal).
        port: UDP port; 0 picks a free one (``run`` reports it).
        bootstrap: Addresses of any members to join through.
        refresh_s: Seconds between rounds (republish and member walk).
        rpc_timeout_s: Seconds before a DHT request counts as unanswered.
        ksize: Kademlia's k (bucket size and replication of a record).
        alpha: Kademlia's alpha (lookup parallelism).
        state_path: If set, neighbours are loaded from it on start and saved to it.
        max_members: Upper bound on the nodes one walk visits.
    """

    host: str = "127.0.0.1"
    port: int = 0
    bootstrap: Sequence[Address] = ()
    refresh_s: float = 2.0
    rpc_timeout_s: float = 2.0
    ksize: int = 20
    alpha: int = 3
    state_path: Path | None = None
    max_members: int = 1024

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.host)
            boot = tuple(_address(host, port) for host, port in self.bootstrap)
        except (ValueError, TypeError):
            raise ValueError("discovery.host and discovery.bootstrap need IP literals") from None
        object.__setattr__(self, "bootstrap", boot)
        if type(self.port) is not int or not 0 <= self.port < 65536:
            raise ValueError("discovery.port must be in 0..65535")
        for name in ("refresh_s", "rpc_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"discovery.{name} must be > 0")
        for name in ("ksize", "alpha", "max_members"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"discovery.{name} must be >= 1")


@dataclass(frozen=True)
class DiscoveryStatistics:
    """Counters since the service was created (``contacts``: routing table size now)."""

    rounds: int
    contacts: int
    records_fetched: int
    stores_refused: int
    datagrams_malformed: int
    spawns_dropped: int


def save_state_file(path: Path, neighbours: Sequence[Address]) -> None:
    """Write the state file atomically (sibling file, fsync, rename)."""
    body = {"version": STATE_VERSION, "neighbours": [list(a) for a in neighbours]}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(body, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_state_file(path: Path) -> list[Address] | None:
    """The neighbours saved in ``path``, or None if there is no such file.

    Raises:
        DiscoveryStateError: the file is unreadable or not a version-1 state file.
    """
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise DiscoveryStateError(f"cannot read {path}: {type(exc).__name__}") from None
    if not isinstance(body, dict) or body.get("version") != STATE_VERSION:
        raise DiscoveryStateError(f"{path} is not a version-{STATE_VERSION} state file")
    try:
        return [_address(*pair) for pair in body["neighbours"]]
    except (KeyError, TypeError, ValueError):
        raise DiscoveryStateError(f"{path} holds a malformed neighbour list") from None


class RecordStorage:
    """kademlia's storage interface, holding only records that verify, newest per key."""

    def __init__(self, ca: CertificateVerifier, clock_ms: Callable[[], int]) -> None:
        self._ca = ca
        self._clock_ms = clock_ms
        self._records: dict[bytes, NodeRecord] = {}
        self._encoded: dict[bytes, bytes] = {}
        self.refused = 0

    def offer(self, key: bytes, value: object) -> bool:
        """Keep ``value`` under ``key`` if it is a valid record for that key, not older."""
        if value == self._encoded.get(key):
            return True  # the usual case: a republish of what we hold (checked when stored)
        try:
            if type(value) is not bytes:
                raise RecordMalformed("a stored value is a record")
            record = NodeRecord.decode(value)
            record.verify(self._ca, self._clock_ms())
        except (RecordMalformed, RecordRejected):
            self.refused += 1
            return False
        if record_key(record.name) != key:
            self.refused += 1
            return False
        current = self._records.get(key)
        if current is not None and not newer(record, current):
            return current == record
        self._records[key], self._encoded[key] = record, value
        return True

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.offer(key, value)

    def get(self, key: bytes, default: bytes | None = None) -> bytes | None:
        return self._encoded.get(key, default)

    def __getitem__(self, key: bytes) -> bytes:
        return self._encoded[key]

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return iter(list(self._encoded.items()))

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        return []  # owners republish every round; the library's hourly republish is unused


class _BadRequest(Exception):
    """A request whose arguments are not what the RPC takes."""


def _is_id(value: object) -> bool:
    return type(value) is bytes and len(value) == ID_BYTES


def _node_id(value: object) -> bytes:
    if not _is_id(value):
        raise _BadRequest
    assert isinstance(value, bytes)
    return value


def _is_contacts(value: object) -> bool:
    if not isinstance(value, list):
        return False
    for item in value:
        if not (isinstance(item, list) and len(item) == 3 and _is_id(item[0])):
            return False
        try:
            _address(item[1], item[2])
        except ValueError:
            return False
    return True


def _is_found_value(value: object) -> bool:
    if isinstance(value, dict):
        return set(value) == {"value"} and type(value["value"]) is bytes
    return _is_contacts(value)


class _RoutingTable(RoutingTable):  # type: ignore[misc]
    def __init__(self, protocol: _Protocol, ksize: int, node: Node, spawn: Spawn) -> None:
        super().__init__(protocol, ksize, node)
        self._spawn = spawn

    def add_contact(self, node: Node) -> None:
        index = self.get_bucket_for(node)
        bucket = self.buckets[index]
        if bucket.add_node(node):
            return
        if bucket.has_in_range(self.node) or bucket.depth() % 5 != 0:  # §4.2
            self.split_bucket(index)
            self.add_contact(node)
        else:  # §2.2: ping the least recently seen contact; it is dropped if silent
            self._spawn(partial(self.protocol.call_ping, bucket.head()))


class _Protocol(KademliaProtocol):  # type: ignore[misc]
    """kademlia's protocol with checked input and no detached tasks."""

    def __init__(
        self, node: Node, storage: RecordStorage, ksize: int, *, timeout_s: float, spawn: Spawn
    ) -> None:
        super().__init__(node, storage, ksize)
        self._wait_timeout = timeout_s
        self._spawn = spawn
        self.router = _RoutingTable(self, ksize, node, self._spawn)
        self.malformed = 0  # set here: rpcudp turns unknown public attributes into RPCs

    def contacts(self) -> list[Node]:
        return [n for bucket in self.router.buckets for n in bucket.get_nodes()]

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            body = msgpack.unpackb(data[21:], raw=False, strict_map_key=False)
        except (ValueError, TypeError, RecursionError, msgpack.UnpackException):
            body = None
        kind, msg_id = data[:1], data[1:21]
        if len(data) < 22 or body is None or kind not in (_REQUEST, _RESPONSE):
            self.malformed += 1
        elif kind == _RESPONSE:
            self._accept_response(msg_id, body, addr)
        else:
            try:
                answer = self._answer(body, addr)
            except _BadRequest:
                self.malformed += 1
                return
            self.transport.sendto(_RESPONSE + msg_id + msgpack.packb(answer), addr)

    def _answer(self, body: object, addr: Address) -> object:
        if not (isinstance(body, list) and len(body) == 2 and isinstance(body[1], list)):
            raise _BadRequest
        name, args = body
        if not isinstance(name, str) or _RPC_ARITY.get(name) != len(args):
            raise _BadRequest
        return getattr(self, f"rpc_{name}")(addr, *args)

    def _accept_response(self, msg_id: bytes, data: object, address: Address) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is None:
            return  # late (timed out) or never asked
        future, timeout = pending
        timeout.cancel()
        if not future.done():  # its caller may have been cancelled
            future.set_result((True, data))

    def _timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result((False, None))

    def rpc_ping(self, sender: Address, nodeid: object) -> bytes:
        self.welcome_if_new(Node(_node_id(nodeid), sender[0], sender[1]))
        return bytes(self.source_node.id)

    def rpc_store(self, sender: Address, nodeid: object, key: object, value: object) -> bool:
        self.welcome_if_new(Node(_node_id(nodeid), sender[0], sender[1]))
        storage: RecordStorage = self.storage
        return storage.offer(_node_id(key), value)

    def rpc_find_node(self, sender: Address, nodeid: object, key: object) -> object:
        return super().rpc_find_node(sender, _node_id(nodeid), _node_id(key))

    def rpc_find_value(self, sender: Address, nodeid: object, key: object) -> object:
        return super().rpc_find_value(sender, _node_id(nodeid), _node_id(key))

    def rpc_slurp_peers(self, sender: Address, nodeid: object) -> list[list[object]]:
        self.welcome_if_new(Node(_node_id(nodeid), sender[0], sender[1]))
        return [[n.id, n.ip, n.port] for n in self.contacts()[:MAX_PEERS_PER_REPLY]]

    async def _call(
        self, rpc: str, node: Node, valid: Callable[[Any], bool], *args: object
    ) -> tuple[bool, Any]:
        """Ask ``node``; an answer that fails ``valid`` counts as none (the node is dropped)."""
        result: tuple[bool, Any] = await getattr(self, rpc)(
            (node.ip, node.port), self.source_node.id, *args
        )
        if result[0] and not valid(result[1]):
            result = (False, None)
        self.handle_call_response(result, node)
        return result

    async def call_ping(self, node: Node) -> tuple[bool, Any]:
        return await self._call("ping", node, _is_id)

    async def call_store(self, node: Node, key: bytes, value: bytes) -> tuple[bool, Any]:
        return await self._call("store", node, lambda v: isinstance(v, bool), key, value)

    async def call_find_node(self, node: Node, target: Node) -> tuple[bool, Any]:
        return await self._call("find_node", node, _is_contacts, target.id)

    async def call_find_value(self, node: Node, target: Node) -> tuple[bool, Any]:
        return await self._call("find_value", node, _is_found_value, target.id)

    async def call_slurp_peers(self, node: Node) -> tuple[bool, Any]:
        return await self._call("slurp_peers", node, _is_contacts)

    def welcome_if_new(self, node: Node) -> None:
        if node.id == self.source_node.id:
            return
        if not self.router.is_new_node(node):
            self.router.add_contact(node)  # §2.2: move to the tail, with its current address
            return
        for key, value in self.storage:  # §2.5: hand a newcomer what it is now closest to
            target = Node(key)  # (the library re-hashed the already hashed key here)
            nearest = self.router.find_neighbors(target)
            if not nearest or (
                node.distance_to(target) < nearest[-1].distance_to(target)
                and self.source_node.distance_to(target) < nearest[0].distance_to(target)
            ):
                self._spawn(partial(self.call_store, node, key, value))
        self.router.add_contact(node)


class _DhtServer(Server):  # type: ignore[misc]
    """kademlia's Server without its detached refresh loop (the trio shell refreshes)."""

    def __init__(self, config: DiscoveryConfig, node_id: bytes, storage: RecordStorage) -> None:
        super().__init__(ksize=config.ksize, alpha=config.alpha, node_id=node_id, storage=storage)
        self.timeout_s = config.rpc_timeout_s
        self.spawn: Spawn = lambda factory: None

    def _create_protocol(self) -> _Protocol:
        return _Protocol(
            self.node, self.storage, self.ksize, timeout_s=self.timeout_s, spawn=self.spawn
        )

    async def listen(self, port: int, interface: str) -> None:
        loop = asyncio.get_running_loop()
        endpoint = loop.create_datagram_endpoint(
            self._create_protocol, local_addr=(interface, port)
        )
        self.transport, self.protocol = await endpoint

    async def bootstrap_node(self, addr: Address) -> Node | None:
        result = await self.protocol.ping(addr, self.node.id)
        return Node(result[1], *addr) if result[0] and _is_id(result[1]) else None

    async def nearest_nodes(self, key: bytes) -> list[Node]:
        """The k nodes closest to ``key`` (a node lookup, §2.3)."""
        target = Node(key)
        nearest = self.protocol.router.find_neighbors(target)
        if not nearest:
            return []
        crawl = NodeSpiderCrawl(self.protocol, target, nearest, self.ksize, self.alpha)
        return await crawl.find()  # type: ignore[no-any-return]

    async def lookup_value(self, key: bytes) -> object:
        """The value stored under ``key`` on its replicas, or None (a value lookup, §2.3)."""
        target = Node(key)
        nearest = self.protocol.router.find_neighbors(target)
        if not nearest:
            return None
        return await ValueSpiderCrawl(self.protocol, target, nearest, self.ksize, self.alpha).find()


@dataclass
class _Counters:
    rounds: int = 0
    records_fetched: int = 0
    spawns_dropped: int = 0
    saved: list[Address] = field(default_factory=list)


class DiscoveryService:
    """Publishes ``record`` in the DHT and feeds every member's record to ``membership``.

    Args:
        config: Listen address, bootstrap addresses, timings.
        record: This node's signed record (``set_record`` replaces it later).
        membership: The core that receives every record found.
        ca: The cluster CA; stored and published records must verify under it.
        clock_ms: Wall-clock Unix milliseconds (certificates are checked against it).
    """

    def __init__(
        self,
        config: DiscoveryConfig,
        record: NodeRecord,
        membership: Membership,
        ca: CertificateVerifier,
        *,
        clock_ms: Callable[[], int],
    ) -> None:
        self._config = config
        self._record, self._encoded = record, record.encode()
        self._key = record_key(record.name)
        self._membership = membership
        self._ca = ca
        self._clock_ms = clock_ms
        self._storage = RecordStorage(ca, clock_ms)
        self._extra_bootstrap: list[Address] = []
        self._server: _DhtServer | None = None
        self._wake = trio.Event()
        self._counters = _Counters()
        self.port: int | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, report the bound UDP port through ``task_status``, then refresh forever.

        Raises:
            RecordRejected: this node's own record does not verify under ``ca``.
            DiscoveryStateError: ``config.state_path`` holds a malformed state file.
        """
        self._record.verify(self._ca, self._clock_ms())
        if self._config.state_path is not None:
            self.load_state(self._config.state_path)
        send, receive = trio.open_memory_channel[_Work](SPAWN_QUEUE_LEN)
        async with trio_asyncio.open_loop():
            server = _DhtServer(self._config, self._key, self._storage)
            server.spawn = partial(self._spawn, send)
            await trio_asyncio.aio_as_trio(server.listen)(self._config.port, self._config.host)
            self._server = server
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._run_spawned, receive)
                    self.port = int(server.transport.get_extra_info("sockname")[1])
                    task_status.started(self.port)
                    await self._refresh_forever()
            finally:
                send.close()
                server.stop()  # open_loop's exit runs the close callbacks: the socket closes
                self._server, self.port = None, None

    def set_record(self, record: NodeRecord) -> None:
        """Publish a newer record of this node (same name) from the next round, at once.

        Raises:
            ValueError: another name, or not newer than the current record.
            RecordRejected: it does not verify under the CA.
        """
        if record.name != self._record.name or not newer(record, self._record):
            raise ValueError("set_record takes a newer record of the same node")
        record.verify(self._ca, self._clock_ms())
        self._record, self._encoded = record, record.encode()
        self._wake.set()

    def neighbours(self) -> list[Address]:
        """The addresses in the routing table now (empty when not running)."""
        if self._server is None:
            return []
        return [(n.ip, n.port) for n in self._server.protocol.contacts()]

    def save_state(self, path: Path) -> int:
        """Save the neighbours as JSON; an empty list leaves the file as it was.

        Returns:
            How many addresses were written.
        """
        neighbours = self.neighbours()
        if neighbours:
            save_state_file(path, neighbours)
        return len(neighbours)

    def load_state(self, path: Path) -> list[Address]:
        """Read saved neighbours and use them as extra bootstrap addresses.

        Returns:
            The addresses read (empty if the file does not exist).

        Raises:
            DiscoveryStateError: the file is malformed.
        """
        loaded = load_state_file(path) or []
        self._extra_bootstrap = list(dict.fromkeys([*self._extra_bootstrap, *loaded]))
        return loaded

    def statistics(self) -> DiscoveryStatistics:
        """Counters: rounds, contacts, records fetched, stores refused, malformed, dropped."""
        protocol = None if self._server is None else self._server.protocol
        return DiscoveryStatistics(
            rounds=self._counters.rounds,
            contacts=0 if protocol is None else len(protocol.contacts()),
            records_fetched=self._counters.records_fetched,
            stores_refused=self._storage.refused,
            datagrams_malformed=0 if protocol is None else protocol.malformed,
            spawns_dropped=self._counters.spawns_dropped,
        )

    def _spawn(self, send: trio.MemorySendChannel[_Work], factory: _Work) -> None:
        try:
            send.send_nowait(factory)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._counters.spawns_dropped += 1

    async def _run_spawned(self, receive: trio.MemoryReceiveChannel[_Work]) -> None:
        """Run spawned Kademlia work, at most ``MAX_SPAWNED_RUNNING`` at once; a failing
        task is logged and never reaches the nursery (the bounded channel drops excess)."""
        slots = trio.Semaphore(MAX_SPAWNED_RUNNING)

        async def guarded(factory: _Work) -> None:
            try:
                await trio_asyncio.aio_as_trio(factory)()
            except Exception:
                logging.getLogger(__name__).exception("discovery task failed")
            finally:
                slots.release()

        async with trio.open_nursery() as nursery, receive:
            async for factory in receive:
                await slots.acquire()
                nursery.start_soon(guarded, factory)

    async def _refresh_forever(self) -> None:
        while True:
            await self._round()
            with trio.move_on_after(self._config.refresh_s):
                await self._wake.wait()
            self._wake = trio.Event()

    async def _round(self) -> None:
        server = self._server
        assert server is not None
        if not server.protocol.contacts():
            await self._bootstrap(server)
        self._storage.offer(self._key, self._encoded)
        self._membership.observe(self._encoded, self._clock_ms())
        nodes = await trio_asyncio.aio_as_trio(server.nearest_nodes)(self._key)
        async with trio.open_nursery() as nursery:
            for node in nodes:
                store = trio_asyncio.aio_as_trio(server.protocol.call_store)
                nursery.start_soon(store, node, self._key, self._encoded)
        await self._walk(server)
        self._counters.rounds += 1
        neighbours = self.neighbours()
        if neighbours and set(neighbours) != set(self._counters.saved):
            self._counters.saved = neighbours
            if self._config.state_path is not None:
                save_state_file(self._config.state_path, neighbours)

    async def _bootstrap(self, server: _DhtServer) -> None:
        own = (self._config.host, self.port)
        addresses = [*self._config.bootstrap, *self._extra_bootstrap]
        addresses = [a for a in dict.fromkeys(addresses) if a != own]
        if addresses:
            await trio_asyncio.aio_as_trio(server.bootstrap)(addresses)

    async def _walk(self, server: _DhtServer) -> None:
        """Visit every node reachable through routing tables, breadth first."""
        seen = {self._key}
        frontier: list[Node] = server.protocol.contacts()
        while frontier and len(seen) < self._config.max_members:
            batch = {n.id: n for n in frontier if n.id not in seen}
            batch = dict(list(batch.items())[: self._config.max_members - len(seen)])
            seen.update(batch)
            frontier = []
            async with trio.open_nursery() as nursery:
                for node in batch.values():
                    nursery.start_soon(self._visit, server, node, frontier)

    async def _visit(self, server: _DhtServer, node: Node, found: list[Node]) -> None:
        protocol = server.protocol
        peers = await trio_asyncio.aio_as_trio(protocol.call_slurp_peers)(node)
        value: object = None
        if peers[0]:
            found.extend(Node(*contact) for contact in peers[1])
            answer = await trio_asyncio.aio_as_trio(protocol.call_find_value)(node, Node(node.id))
            if answer[0] and isinstance(answer[1], dict):
                value = answer[1]["value"]
        if value is None:  # it is away: ask its record's replicas
            value = await trio_asyncio.aio_as_trio(server.lookup_value)(node.id)
        if type(value) is bytes:
            self._counters.records_fetched += 1
            self._membership.observe(value, self._clock_ms())
