"""An N-node cluster in one trio run: in-memory stores, in-memory network, seeded faults.

Every node is a real ``NodeService`` over a real ``ContextStore`` (age, signatures, index)
whose LevelDB is replaced by ``MemoryKV``; nodes talk through ``MemoryNetwork``. Nodes share
role identities (as a real cluster's nodes do) and trust each other's signing keys.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from crypto.roles import DEFAULT_ROLES
from node.cluster.antientropy_service import AntiEntropyConfig, AntiEntropyService
from node.cluster.handoff import HandoffService
from node.cluster.handoff_plan import HandoffConfig
from node.cluster.liveness import FailureDetector, StaticCluster
from node.cluster.replication import Quorum
from node.cluster.service import NodeService, ServiceConfig
from node.rpc.memory_transport import MemoryNetwork
from node.rpc.peers import PeerPool
from node.rpc.transport import Caller
from storage.context_store import ContextStore
from storage.hints import HintStore
from storage.kv import MemoryKV

CLIENT = "client"


@dataclass
class SimNode:
    """One simulated node."""

    name: str
    store: ContextStore
    service: NodeService
    cluster: StaticCluster
    pool: PeerPool
    antientropy: AntiEntropyService
    handoff: HandoffService | None = None


@dataclass
class SimCluster:
    """The running cluster and its network."""

    network: MemoryNetwork
    nodes: dict[str, SimNode]

    async def call(
        self, node: str, method: str, body: dict[str, Any], *, timeout_s: float = 3.0
    ) -> dict[str, Any]:
        """A client request to ``node`` (the client holds the admin role)."""
        async with self.network.open_client(CLIENT, node) as client:
            return await client.call(method, body, timeout_s=timeout_s)


def _init_nodes(root: Path, names: Sequence[str]) -> None:
    first = root / names[0]
    ContextStore.init(first, DEFAULT_ROLES)
    with ContextStore.open(first) as store:
        identities = {r.name: store.keyring.current_identity(r.name) for r in DEFAULT_ROLES}
    for name in names[1:]:
        ContextStore.init(root / name, DEFAULT_ROLES, role_identities=identities)


@asynccontextmanager
async def open_sim_cluster(
    root: Path,
    *,
    size: int = 3,
    seed: int = 0,
    drop: float = 0.0,
    duplicate: float = 0.0,
    max_delay_s: float = 0.0,
    quorum: Quorum | None = None,
    antientropy: AntiEntropyConfig | None = None,
    handoff: HandoffConfig | None = None,
) -> AsyncIterator[SimCluster]:
    """Start ``size`` nodes; yields once every server is up."""
    names = [f"n{i}" for i in range(1, size + 1)]
    _init_nodes(root, names)
    network = MemoryNetwork(
        random.Random(seed), drop=drop, duplicate=duplicate, max_delay_s=max_delay_s
    )
    network.set_identity(CLIENT, kind="client", roles=("admin",))
    for name in names:
        network.set_identity(name, kind="node", roles=())
    stores = {name: ContextStore.open(root / name, kv=MemoryKV()) for name in names}
    for store in stores.values():
        for other in stores.values():
            store.trust_signer(other.keyring.signer.public_key)
    nodes: dict[str, SimNode] = {}
    try:
        async with trio.open_nursery() as nursery:
            for name in names:
                cluster = StaticCluster(name, names)

                def connect(peer: str, me: str = name) -> AbstractAsyncContextManager[Caller]:
                    return network.open_client(me, peer)

                pool = PeerPool(connect, on_result=cluster.mark)
                config = ServiceConfig(
                    quorum=quorum or Quorum(), timeout_s=1.0, blocking_in_threads=False
                )
                service = NodeService(stores[name], cluster, pool, config)
                healer = AntiEntropyService(service, antientropy or AntiEntropyConfig())
                await nursery.start(pool.run)
                await nursery.start(service.run)
                await nursery.start(network.server(name, service.handle).run)
                nodes[name] = SimNode(name, stores[name], service, cluster, pool, healer)
                settings = handoff or HandoffConfig()
                if settings.enabled:
                    hints = HintStore(
                        stores[name].kv,
                        max_bytes=settings.max_bytes,
                        clock_ms=stores[name].clock_ms,
                    )
                    handoff_service = HandoffService(service, hints, settings)
                    nodes[name].handoff = handoff_service
                    cluster.on_up.append(handoff_service.wake)
                    await nursery.start(handoff_service.run)
            for node in nodes.values():  # every server is up before anyone probes
                detector = FailureDetector(node.cluster, node.pool, interval_s=0.5, timeout_s=0.5)
                await nursery.start(detector.run)
            for node in nodes.values():
                await nursery.start(node.antientropy.run)
            yield SimCluster(network, nodes)
            nursery.cancel_scope.cancel()
    finally:
        for store in stores.values():
            store.close()
