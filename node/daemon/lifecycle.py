"""The node daemon: one ContextStore served to a cluster (a trio shell of trio shells).

Owns the life of a running node: open the store, start the RPC server (mutual TLS), the
peer pool, the node service, hinted handoff, the control plane (Raft, leader duties,
admin-key custody), Kademlia discovery, failure detection, anti-entropy, the /health and
/metrics HTTP server, and the index refresh timer (which also drains the queue of
contexts replicated writes left to index), in that order, all in one nursery; and
shut them down cleanly (in-flight requests finish or fail, then the store closes).

Membership: the ring is placed from the members of the cluster metadata the control
plane applied (node/control/metadata.py); discovery supplies addresses and liveness.
Every verified node record that discovery finds is dialled, and the public key of its
CA-issued certificate is trusted to sign versions (a node's certificate is issued for its
version-signing key, so one key ties its TLS identity to what it writes). A record signed
under another CA is ignored. Until the control plane has applied its metadata (the first
moments after start), and on a node that bootstrapped itself alone (no bootstrap written
by ``cluster up``: a node started by hand), discovery's members are placed, as before the
control plane existed; such a node leads a control plane of one.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from crypto.ca import CertificateAuthority
from crypto.certs import load_certificate
from node.cluster.antientropy_service import AntiEntropyService
from node.cluster.discovery import DiscoveryConfig as DhtConfig
from node.cluster.discovery import DiscoveryService
from node.cluster.handoff import HandoffService
from node.cluster.layout import layout_of
from node.cluster.liveness import FailureDetector, StaticCluster
from node.cluster.membership import Membership, NodeRecord
from node.cluster.rebalance import RebalanceConfig, RebalanceService
from node.cluster.replication import Quorum
from node.cluster.service import NodeService, ServiceConfig
from node.control.cluster_backup import ClusterBackup
from node.control.cluster_restore import ClusterRestore
from node.control.custody import AdminCustody
from node.control.maintenance import Maintenance
from node.control.membership import Transitions
from node.control.reshare import AdminReshare
from node.control.rotation import ClusterRotation
from node.control.service import ControlConfig, ControlService
from node.daemon.backup_service import BackupService
from node.daemon.config import NodeConfig
from node.daemon.exporter import MetricsExporter
from node.daemon.http import HealthServer
from node.daemon.metrics import NodeMetrics
from node.errors import NodeError, PeerUnavailable, RemoteError
from node.rpc.peers import PeerPool
from node.rpc.transport import (
    INTERNAL_CODE,
    UNAVAILABLE_CODE,
    Caller,
    Peer,
    RpcServer,
    ServerStatistics,
    open_rpc_client,
)
from storage.context_store import ContextStore
from storage.errors import StorageError
from storage.hints import HintStore

log = logging.getLogger(__name__)
MEMBERSHIP_SYNC_S = 0.5
PROBE_INTERVAL_S = 1.0
INDEX_DRAIN_BATCHES = 16  # storage.index_sync.DRAIN_BATCH contexts each, per round
INDEX_LOOP_MIN_S = 0.05  # index_refresh_s = 0 must not spin the loop


@dataclass(frozen=True)
class NodePorts:
    """Where a started node listens."""

    rpc: int
    http: int
    discovery: int


def now_ms() -> int:
    """Wall-clock Unix milliseconds."""
    return time.time_ns() // 1_000_000


class ConfigMismatch(NodeError):
    """The node's certificate is not issued for its signing key (or similar)."""


class NodeDaemon:
    """A running node; ``run`` serves until cancelled."""

    def __init__(self, config: NodeConfig, store: ContextStore) -> None:
        self.config = config
        self.store = store
        store.keyring.configure_sealing(config.keys.seal_policy())  # node.toml's [keys]
        self.metrics = NodeMetrics()
        self.cluster = StaticCluster(config.name, [config.name])
        self.addresses: dict[str, tuple[str, int]] = {}
        self.ready = False
        self._rpc: RpcServer | None = None
        self._seen = ServerStatistics()
        self._ca = CertificateAuthority.verifier(config.tls.ca)
        self.membership = Membership(self._ca)
        self._tls = config.tls.files()
        self._key = _load_key(config.tls.key.read_bytes())
        self._check_key()
        self.pool = PeerPool(self._connect, on_result=self.cluster.mark)
        quorum = Quorum(config.cluster.n, config.cluster.w, config.cluster.r)
        self.service = NodeService(
            store,
            self.cluster,
            self.pool,
            ServiceConfig(
                quorum, config.cluster.vnodes, config.cluster.request_timeout_s,
                max_inflight_requests=config.cluster.max_inflight_requests,
                max_repair_sends=config.cluster.max_repair_sends,
            ),
        )  # fmt: skip
        self.service.report_faults_to(self.metrics)
        self.exporter = MetricsExporter(
            self.metrics, self.service, config.data_dir, clock=time.monotonic
        )
        # built before anything is served: its hash tree is scanned once from the store
        self.antientropy = AntiEntropyService(self.service, config.antientropy)
        self.handoff: HandoffService | None = None
        if config.handoff.enabled:
            hints = HintStore(store.kv, max_bytes=config.handoff.max_bytes, clock_ms=now_ms)
            self.handoff = HandoffService(self.service, hints, config.handoff)
            self.cluster.on_up.append(self.handoff.wake)
        election = config.election
        self.control = ControlService(
            self.service,
            ControlConfig.from_election(election.heartbeat_ms, election.election_timeout_ms),
            rng=random.Random(),  # seeded from the OS: election jitter differs per node
            clock_ms=now_ms, rpc_host=config.rpc.host, rpc_port=config.rpc.port,
        )  # fmt: skip
        self.service.status_fields.append(self.control.status)
        self.custody = AdminCustody(self.service, self.control)
        # the leader re-shares the admin key when the membership changes
        self.reshare = AdminReshare(self.control, self.custody, self.service)
        # range streaming paced like anti-entropy ([antientropy] bytes_per_s)
        self.rebalance = RebalanceService(
            self.service, self.control, RebalanceConfig(config.antientropy.bytes_per_s)
        )
        self.control.on_apply.append(self._on_apply)
        self._placed_epoch: int | None = None
        self.service.status_fields.append(lambda: {"admin_key_held": self.custody.held()})
        Maintenance(self.control, self.custody.fence, max_key_age_days=config.keys.max_key_age_days)
        self.transitions = Transitions(self.control)  # ctl.member_* and the transition driver
        self.rotation = ClusterRotation(self.control, self.custody.fence)
        # restore.upload / restore.apply: a backup merged into this cluster by the leader
        ClusterRestore(self.service, self.custody, max_bytes=config.backup.restore_max_bytes)

    def _check_key(self) -> None:
        public = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        if public != self.store.keyring.signer.public_key:
            raise ConfigMismatch(
                f"{self.config.tls.key} is not this node's signing key: issue the node "
                "certificate for it (slurp ca issue-node NAME --signing-key "
                "DATA_DIR/keys/node.ed25519)"
            )

    def _connect(self, name: str) -> AbstractAsyncContextManager[Caller]:
        if name not in self.addresses:  # e.g. a joiner, before discovery or the metadata
            raise PeerUnavailable(f"no address known for {name} yet")
        host, port = self.addresses[name]
        return open_rpc_client(
            host, port, self._tls, node=self.config.name,
            connect_timeout_s=self.config.cluster.request_timeout_s,
        )  # fmt: skip

    async def run(
        self, *, task_status: trio.TaskStatus[NodePorts] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start everything, report the ports, serve until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pool.run)
            await nursery.start(self.service.run)
            if self.handoff is not None:
                await nursery.start(self.handoff.run)
            rpc = RpcServer(self._instrumented(self.service.handle), self._tls,
                            self.config.rpc.host, self.config.rpc.port)  # fmt: skip
            rpc_port = await nursery.start(rpc.run)
            self._rpc = rpc
            await nursery.start(self.control.run)
            self._sync_members()  # the applied metadata's members: addresses, trust, ring
            await nursery.start(self.custody.run)
            await nursery.start(self.reshare.run)
            await nursery.start(self.transitions.run)
            http = HealthServer(self.config.http, self._health, self.metrics)
            http_port = await nursery.start(http.run)
            record = NodeRecord.signed(
                self._key,
                name=self.config.name,
                node_id=self.store.keyring.node_id,
                rpc_host=self.config.rpc.host,
                rpc_port=rpc_port,
                http_port=http_port,
                dht_port=0,
                cert_pem=self.config.tls.cert.read_bytes(),
                age_recipient=self.store.keyring.node_recipient,
                issued_ms=now_ms(),
            )
            self.membership.observe(record.encode(), now_ms())
            dht = DiscoveryService(
                DhtConfig(
                    host=self.config.discovery.host,
                    port=self.config.discovery.port,
                    bootstrap=[(s.host, s.port) for s in self.config.discovery.seeds],
                    state_path=self.config.data_dir / "dht-state.json",
                    refresh_s=1.0,
                ),
                record,
                self.membership,
                self._ca,
                clock_ms=now_ms,
            )
            dht_port = await nursery.start(dht.run)
            self._sync_members()
            nursery.start_soon(self._membership_loop)
            detector = FailureDetector(self.cluster, self.pool, interval_s=PROBE_INTERVAL_S,
                                       timeout_s=self.config.cluster.request_timeout_s)  # fmt: skip
            await nursery.start(detector.run)
            await nursery.start(self.antientropy.run)
            await nursery.start(self.rebalance.run)
            nursery.start_soon(self._index_loop)
            backups = self._backup_service()
            cluster_backup = self._cluster_backup(backups)
            self.service.status_fields.append(cluster_backup.status)
            await nursery.start(cluster_backup.run)
            if backups is not None:
                await nursery.start(backups.run)
            self.ready = True
            log.info("%s serving: rpc %s, http %s, dht %s", self.config.name, rpc_port,
                     http_port, dht_port)  # fmt: skip
            task_status.started(NodePorts(rpc_port, http_port, dht_port))
            await trio.sleep_forever()

    def _instrumented(
        self, handler: Callable[[Peer, str, dict[str, Any]], Awaitable[dict[str, Any]]]
    ) -> Callable[[Peer, str, dict[str, Any]], Awaitable[dict[str, Any]]]:
        async def handle(peer: Peer, method: str, body: dict[str, Any]) -> dict[str, Any]:
            start = time.perf_counter()
            outcome = "ok"
            try:
                return await handler(peer, method, body)
            except (StorageError, RemoteError) as exc:
                outcome = exc.code
                raise
            except PeerUnavailable:
                outcome = UNAVAILABLE_CODE
                raise
            except trio.Cancelled:  # the request's deadline passed, or the node is stopping
                outcome = "cancelled"
                raise
            except Exception:  # answered UCXL-500-INTERNAL by the transport
                outcome = INTERNAL_CODE
                raise
            finally:
                self.metrics.observe_request(method, outcome, time.perf_counter() - start)

        return handle

    def _health(self) -> tuple[bool, Mapping[str, object]]:
        up = [name for name in self.cluster.member_names() if self.cluster.is_up(name)]
        checks = {
            "store": "open",
            "members": len(self.cluster.member_names()),
            "members_up": len(up),
            "quorum_possible": len(up) >= self.config.cluster.w,
            "leader_known": self.control.leader_name() is not None,
            "leader": self.control.leader_name(),
            "role": self.control.status()["role"],
        }
        return self.ready, checks

    async def _membership_loop(self) -> None:
        while True:
            await trio.sleep(MEMBERSHIP_SYNC_S)
            self._sync_members()
            self._export_transport_counters()
            self.exporter.export()

    def _export_transport_counters(self) -> None:
        """Bad traffic the RPC server closed connections for, as Prometheus counters."""
        if self._rpc is None:
            return
        now = self._rpc.statistics()
        for _ in range(now.tls_failures - self._seen.tls_failures):
            self.metrics.tls_failure()
        for reason in ("protocol_errors", "oversized_frames", "handshake_timeouts"):
            for _ in range(getattr(now, reason) - getattr(self._seen, reason)):
                self.metrics.bad_frame(reason)
        self.metrics.set_connections_open(now.connections_open)
        self.metrics.set_index_documents(int(self.store.index.stats()["documents"]))
        self._seen = now

    def _on_apply(self, _entry: object) -> None:
        """Place by a new ring epoch as soon as it is applied; wake the rebalancer."""
        applied = self.control.metadata
        if applied is not None and applied.ring.epoch != self._placed_epoch:
            self._sync_members()
        self.rebalance.wake()

    def _sync_members(self) -> None:
        """Dial and trust every verified member; place the members of the applied cluster
        metadata (discovery's members until the control plane has applied it)."""
        names = []
        applied = self.control.metadata
        if applied is not None:
            for member in applied.members.values():
                if member.rpc_port and member.name not in self.addresses:
                    self.addresses[member.name] = (member.rpc_host, member.rpc_port)
            for key in applied.signing_keys():  # members', and the founding trusted signers
                self.store.trust_signer(key)
        for record in self.membership.members():
            names.append(record.name)
            self.addresses[record.name] = (record.rpc_host, record.rpc_port)
            public = load_certificate(record.cert_pem).public_key()
            if isinstance(public, Ed25519PublicKey):
                self.store.trust_signer(
                    public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                )
        if applied is not None:
            self._placed_epoch = applied.ring.epoch
        if applied is not None and len(applied.ring_members()) > 1:
            layout = layout_of(applied)  # else a standalone node (bootstrap_single)
            names = list(layout.members)  # joining members are written to as well
            self.service.set_layout(layout)
        self.cluster.set_members(names)
        up = sum(1 for name in names if self.cluster.is_up(name))
        self.metrics.set_members(up=up, down=len(names) - up)

    def _backup_service(self) -> BackupService | None:
        """The scheduled-backup service when ``[backup] schedule`` is set (a bad schedule is
        logged and counted as a failure; the node runs on)."""
        cfg = self.config.backup
        if cfg.schedule is None:
            return None
        try:
            return BackupService.from_config(
                self.store, cfg.schedule, keep=cfg.keep, incremental=cfg.incremental,
                directory=cfg.dir, metrics=self.metrics, clock_ms=now_ms,
            )  # fmt: skip
        except StorageError as exc:
            log.error("no scheduled backups: %s", exc.message)
            self.metrics.set_backup(last_success_s=None, failures=1)
            return None

    def _cluster_backup(self, single: BackupService | None) -> ClusterBackup:
        """``backup.*`` and the ``backup`` leader duty (at this node's ``[backup] schedule``
        while it leads); ``single`` waits while the node is in a cluster."""
        cfg = self.config.backup
        interval = None if single is None else single.policy.interval_s
        return ClusterBackup(
            self.control, self.metrics, directory=cfg.dir, interval_s=interval,
            keep=cfg.keep, incremental=cfg.incremental, single=single, clock_ms=now_ms,
        )  # fmt: skip

    async def _index_loop(self) -> None:
        """Keep the search refresh bound even when nobody searches: every half refresh
        interval, index what replicated writes queued (``IndexSync.drain``, bounded per
        round so a busy node still commits) and commit what local writes buffered."""
        interval = max(self.config.storage.index.refresh_interval_s / 2, INDEX_LOOP_MIN_S)
        index = self.store.index
        while True:
            await trio.sleep(interval)
            try:
                await trio.to_thread.run_sync(lambda: index.drain(max_batches=INDEX_DRAIN_BATCHES))
                await trio.to_thread.run_sync(index.maybe_commit)
            except Exception:  # a bug or a broken index must not stop the node: next round
                log.exception("the index refresh failed; retrying in %.2f s", interval)
                self.metrics.internal_error("index_loop")


def _load_key(pem: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigMismatch("the node's TLS key must be Ed25519")
    return key
