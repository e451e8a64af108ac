"""Copies what a node's parts count into its Prometheus metrics (called by the daemon loop).

Owns the mapping from the node's own counters and status sources to ``NodeMetrics``
(node/daemon/metrics.py): the service's repair, quorum and replication totals, the
replica's refused versions, the record cache, the index queue (pending, lag), the contexts
held (a head scan, so at most every ``contexts_interval_s``), the free share of the data
directory's filesystem, and the ``handoff`` / ``antientropy`` status sources
(node/cluster/status.py), read through the same function as ``node.status`` so that
``slurp status --json`` and ``/metrics`` agree.

Must not know HTTP or trio. Invariants: ``export`` never raises for a broken source or an
unreadable filesystem (that figure is left out and logged), so the loop calling it never
stops the node; a figure that is unknown is absent from ``/metrics``, never 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from node.cluster import status
from node.cluster.service import NodeService
from node.daemon.metrics import NodeMetrics

log = logging.getLogger(__name__)
CONTEXTS_INTERVAL_S = 15.0


def disk_free_ratio(path: Path) -> float | None:
    """The share (0..1) of the filesystem holding ``path`` that unprivileged writers may use.

    Uses ``f_bavail`` (what a non-root process can still write), not ``f_bfree``.
    Returns None when the filesystem cannot be read or reports no blocks.
    """
    try:
        stats = os.statvfs(path)
    except OSError as exc:
        log.warning("cannot read the free space of %s: %s", path, exc)
        return None
    if stats.f_blocks <= 0:
        return None
    return max(0.0, min(1.0, stats.f_bavail / stats.f_blocks))


class MetricsExporter:
    """Feeds one node's ``NodeMetrics`` from its service, store and status sources."""

    def __init__(
        self,
        metrics: NodeMetrics,
        service: NodeService,
        data_dir: Path,
        *,
        clock: Callable[[], float],
        contexts_interval_s: float = CONTEXTS_INTERVAL_S,
    ) -> None:
        self.metrics = metrics
        self.service = service
        self.data_dir = data_dir
        self._clock = clock
        self._contexts_interval_s = contexts_interval_s
        self._contexts_at: float | None = None

    def export(self) -> None:
        """Copy every figure once (cheap, except the throttled contexts scan)."""
        service, metrics = self.service, self.metrics
        metrics.set_repair_pending(service.repair_pending)
        metrics.set_replication_acks(service.replication_acks)
        metrics.set_quorum_failures(service.quorum_failures_by_op)
        metrics.set_refused_versions(service.replica.refused)
        cache = service.store.cache.stats()
        metrics.set_cache(hits=cache.hits, misses=cache.misses, evictions=cache.evictions)
        metrics.set_sealing(service.store.keyring.sealing_stats())
        metrics.set_disk_free_ratio(disk_free_ratio(self.data_dir))
        lag = service.store.index.lag()
        metrics.set_index_lag(pending=lag["pending"], lag_s=lag["lag_s"])
        now = self._clock()
        if self._contexts_at is None or now - self._contexts_at >= self._contexts_interval_s:
            metrics.set_store_contexts(service.store.versions.count_contexts())
            self._contexts_at = now
        self.export_sources()
        self.export_control()

    def export_sources(self) -> None:
        """The ``handoff`` and ``antientropy`` figures (absent when their source is)."""
        snapshot = status.read_sources(self.service.status_sources)
        h, ae = status.HANDOFF, status.ANTIENTROPY
        self.metrics.set_handoff(
            hints=status.count(snapshot, h, "hints"),
            hint_bytes=status.count(snapshot, h, "hint_bytes"),
            dropped=status.count(snapshot, h, "hints_dropped"),
            delivered=status.count(snapshot, h, "hints_delivered"),
        )
        self.metrics.set_antientropy(
            last_pass_age_s=status.seconds(snapshot, ae, "last_pass_age_s"),
            versions_repaired=status.count(snapshot, ae, "versions_repaired"),
            bytes_sent=status.count(snapshot, ae, "bytes_sent"),
            bytes_received=status.count(snapshot, ae, "bytes_received"),
        )

    def export_control(self) -> None:
        """The control plane's figures, from the same ``node.status`` fields (absent until it
        runs)."""
        fields: dict[str, Any] = {}
        for source in self.service.status_fields:
            try:
                fields.update(source())
            except Exception:
                log.exception("a status source failed")
        raft = fields.get("raft")
        if not isinstance(raft, dict):
            self.export_rebalance(fields.get("rebalance"))
            self.metrics.set_control(is_leader=None, term=None, elections=None,
                                     commit_index=None, applied_index=None,
                                     admin_key_held=None)  # fmt: skip
            return
        self.export_rebalance(fields.get("rebalance"))
        held = fields.get("admin_key_held")
        self.metrics.set_control(
            is_leader=fields.get("role") == "leader", term=fields.get("term"),
            elections=raft.get("elections"), commit_index=raft.get("commit_index"),
            applied_index=raft.get("applied_index"),
            admin_key_held=held if isinstance(held, bool) else None,
        )  # fmt: skip

    def export_rebalance(self, figures: Any) -> None:
        """Range streaming's figures from the ``rebalance`` status field (absent: none)."""
        if not isinstance(figures, dict):
            figures = {}

        def count(key: str) -> int | None:
            value = figures.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) else None

        self.metrics.set_rebalance(
            pending_ranges=count("pending_ranges"),
            bytes_left=count("bytes_left"),
            streamed_bytes=count("streamed_bytes"),
        )
