"""A node's Prometheus metrics (ARCHITECTURE.md §7): one registry per node, ``slurp_*`` names.

Owns: ``NodeMetrics``, the only place that touches ``prometheus_client`` objects. Callers
report what happened through plain methods (``observe_request``, ``quorum_failure``...);
``render`` gives the text exposition format (version 0.0.4) that ``/metrics`` serves and
``promtool check metrics`` accepts.

Must not know: HTTP, trio, what a request does. Invariants: each ``NodeMetrics`` has its own
``CollectorRegistry`` (never the process-global one), so several nodes in one process (the
simulation, the tests) do not share counters; label values come from small fixed sets
chosen by the callers (method names, outcomes, reasons), never from addresses, roles or
stored values, so the number of series stays bounded.

Metrics (names carry their unit; counters end in ``_total``), with who feeds each:

    slurp_requests_total{method,outcome}          requests served       the RPC handler wrapper
    slurp_request_duration_seconds{method}        their durations       the RPC handler wrapper
    slurp_bad_frames_total{reason}                malformed, oversized or timed-out frames
    slurp_tls_failures_total                      failed TLS handshakes (refused certificates)
    slurp_connections_open                        open RPC connections  (RPC server statistics)
    slurp_members{state="up"|"down"}              known members by liveness   (membership sync)
    slurp_index_documents                         documents in the full-text index
    slurp_index_pending                           contexts whose replicated writes wait to be
                                                  indexed                 (the exporter)
    slurp_index_lag_seconds                       age of the oldest of them (0: none)
    slurp_repair_pending                          read-repair sends queued or in flight
    slurp_store_contexts                          contexts held locally (a head scan, throttled)
    slurp_disk_free_ratio                         free share of the data dir's filesystem
    slurp_replication_acks_total{outcome}         replica answers to replicated writes
    slurp_quorum_failures_total{op}               requests that missed W or R
    slurp_refused_versions_total                  versions refused (forged, unsigned, garbage)
    slurp_cache_hits_total, _misses_total, _evictions_total   record cache
    slurp_data_keys_issued_total                  data keys drawn to seal records (crypto.sealing)
    slurp_records_sealed_total                    records sealed under a data key
    slurp_data_key_cache_hits_total, _misses_total   opens that found / had to unwrap the data key
    slurp_data_key_cache_keys                     unwrapped data keys held in memory (bounded)
    slurp_internal_errors_total{where}            bugs caught at a request or task boundary
    slurp_peer_answer_malformed_total{method}     peer answers that did not parse
    slurp_requests_refused_busy_total             requests refused at max_inflight_requests
    slurp_repairs_dropped_total                   read-repair sends dropped at max_repair_sends
    slurp_hints, slurp_hint_bytes                 hinted-handoff backlog     (status source)
    slurp_hints_dropped_total, _delivered_total   hints given up / delivered (status source)
    slurp_antientropy_last_pass_age_seconds       since the last finished pass (status source)
    slurp_antientropy_versions_repaired_total     versions anti-entropy repaired
    slurp_antientropy_bytes_total{direction}      bytes anti-entropy sent / received
    slurp_rebalance_pending_ranges                moving arcs this node has not streamed yet
    slurp_rebalance_bytes_left                    bytes this node may still stream (bound)
    slurp_rebalance_streamed_bytes_total          version bytes streamed to new owners
    slurp_backup_last_success_timestamp_seconds   when the last scheduled backup succeeded
    slurp_backup_failures_total                   scheduled backups that failed (both fed
                                                  by node/daemon/backup_service.py)

Everything except the request and frame counters is copied in by the daemon's periodic
loop (``node.daemon.exporter``). Figures that are measured now and then or whose running
total another component keeps (``slurp_store_contexts`` and below) are *reported*:
exported exactly as last set, and absent until set, so a subsystem that does not run (or
a figure that is unknown, such as the age of a pass that never happened) shows as no
series rather than as an invented 0. ``FEEDERS`` names the method that feeds each metric;
a test checks that each is called outside this module.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Request latencies span in-memory hits (sub-millisecond) to quorum timeouts (seconds).
REQUEST_DURATION_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
# metric name -> the NodeMetrics method that feeds it
FEEDERS: dict[str, str] = {
    "slurp_requests_total": "observe_request",
    "slurp_request_duration_seconds": "observe_request",
    "slurp_bad_frames_total": "bad_frame",
    "slurp_tls_failures_total": "tls_failure",
    "slurp_connections_open": "set_connections_open",
    "slurp_members": "set_members",
    "slurp_index_documents": "set_index_documents",
    "slurp_index_pending": "set_index_lag",
    "slurp_index_lag_seconds": "set_index_lag",
    "slurp_store_contexts": "set_store_contexts",
    "slurp_disk_free_ratio": "set_disk_free_ratio",
    "slurp_repair_pending": "set_repair_pending",
    "slurp_replication_acks_total": "set_replication_acks",
    "slurp_quorum_failures_total": "set_quorum_failures",
    "slurp_refused_versions_total": "set_refused_versions",
    "slurp_cache_hits_total": "set_cache",
    "slurp_cache_misses_total": "set_cache",
    "slurp_cache_evictions_total": "set_cache",
    "slurp_data_keys_issued_total": "set_sealing",
    "slurp_records_sealed_total": "set_sealing",
    "slurp_data_key_cache_hits_total": "set_sealing",
    "slurp_data_key_cache_misses_total": "set_sealing",
    "slurp_data_key_cache_keys": "set_sealing",
    "slurp_hints": "set_handoff",
    "slurp_hint_bytes": "set_handoff",
    "slurp_hints_dropped_total": "set_handoff",
    "slurp_hints_delivered_total": "set_handoff",
    "slurp_antientropy_last_pass_age_seconds": "set_antientropy",
    "slurp_antientropy_versions_repaired_total": "set_antientropy",
    "slurp_antientropy_bytes_total": "set_antientropy",
    "slurp_rebalance_pending_ranges": "set_rebalance",
    "slurp_rebalance_bytes_left": "set_rebalance",
    "slurp_rebalance_streamed_bytes_total": "set_rebalance",
    "slurp_internal_errors_total": "internal_error",
    "slurp_peer_answer_malformed_total": "peer_answer_malformed",
    "slurp_requests_refused_busy_total": "refused_busy",
    "slurp_repairs_dropped_total": "repair_dropped",
    "slurp_is_leader": "set_control",
    "slurp_term": "set_control",
    "slurp_elections_total": "set_control",
    "slurp_raft_commit_index": "set_control",
    "slurp_raft_applied_index": "set_control",
    "slurp_admin_key_held": "set_control",
    "slurp_backup_last_success_timestamp_seconds": "set_backup",
    "slurp_backup_failures_total": "set_backup",
}
METRIC_NAMES = tuple(FEEDERS)

Labels = tuple[tuple[str, str], ...]


class _Reported:
    """A collector of figures kept elsewhere: each family exactly as last set, absent until."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, dict[Labels, float]]] = {}

    def set(self, name: str, kind: str, doc: str, samples: Mapping[Labels, float]) -> None:
        """Replace family ``name`` (``kind``: "counter" or "gauge") by ``samples``."""
        self._families[name] = (kind, doc, dict(samples))

    def drop(self, name: str) -> None:
        """Stop exporting family ``name`` (its figure became unknown)."""
        self._families.pop(name, None)

    def describe(self) -> list[Metric]:
        """Nothing up front: the families come and go with what is known."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The families as last set, in name order."""
        for name in sorted(self._families):
            kind, doc, samples = self._families[name]
            labelnames = [key for key, _ in next(iter(samples), ())]
            family: CounterMetricFamily | GaugeMetricFamily
            if kind == "counter":
                family = CounterMetricFamily(name, doc, labels=labelnames)
            else:
                family = GaugeMetricFamily(name, doc, labels=labelnames)
            for labels, value in sorted(samples.items()):
                family.add_metric([v for _, v in labels], value)
            yield family


class NodeMetrics:
    """The metrics of one node, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self._requests = Counter(
            "slurp_requests_total",
            "Requests handled by this node, by method and outcome.",
            ["method", "outcome"],
            registry=reg,
        )
        self._duration = Histogram(
            "slurp_request_duration_seconds",
            "Time to handle a request, by method.",
            ["method"],
            buckets=REQUEST_DURATION_BUCKETS_S,
            registry=reg,
        )
        self._bad_frames = Counter(
            "slurp_bad_frames_total",
            "Malformed or oversized wire frames received, by reason.",
            ["reason"],
            registry=reg,
        )
        self._tls_failures = Counter(
            "slurp_tls_failures_total", "Failed TLS handshakes.", registry=reg
        )
        self._connections = Gauge("slurp_connections_open", "Open RPC connections.", registry=reg)
        self._members = Gauge(
            "slurp_members", "Known cluster members, by liveness state.", ["state"], registry=reg
        )
        self._index_documents = Gauge(
            "slurp_index_documents", "Documents in the local full-text index.", registry=reg
        )
        self._repair_pending = Gauge(
            "slurp_repair_pending", "Read-repair sends queued or in flight.", registry=reg
        )
        # (method, outcome) -> its counter and histogram children: bounded by the label sets
        self._request_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._reported = _Reported()
        reg.register(self._reported)
        self._internal_errors = Counter(
            "slurp_internal_errors_total",
            "Internal errors (bugs) caught at a request or task boundary, by where.",
            ["where"],
            registry=reg,
        )
        self._malformed = Counter(
            "slurp_peer_answer_malformed_total",
            "Peer answers that did not parse (the replica counted as failed), by method.",
            ["method"],
            registry=reg,
        )
        self._refused_busy = Counter(
            "slurp_requests_refused_busy_total",
            "Requests refused because the node was at its in-flight limit.",
            registry=reg,
        )
        self._repairs_dropped = Counter(
            "slurp_repairs_dropped_total",
            "Background read-repair sends dropped at the fan-out bound.",
            registry=reg,
        )
        self.set_members(up=0, down=0)

    def internal_error(self, where: str) -> None:
        """Count a bug caught at ``where`` (a method name or a task kind)."""
        self._internal_errors.labels(where=where).inc()

    def peer_answer_malformed(self, method: str) -> None:
        """Count a peer answer to ``method`` that did not parse."""
        self._malformed.labels(method=method).inc()

    def refused_busy(self) -> None:
        """Count a request refused at the in-flight limit."""
        self._refused_busy.inc()

    def repair_dropped(self, count: int = 1) -> None:
        """Count read-repair sends dropped at the fan-out bound."""
        self._repairs_dropped.inc(count)

    def observe_request(self, method: str, outcome: str, seconds: float) -> None:
        """Count one finished request and record how long it took.

        Args:
            method: The request's method (``"ctx.put"``, ``"ctx.get"``...).
            outcome: ``"ok"`` or the UCXL error code the request ended with.
            seconds: Its duration, from a monotonic clock.
        """
        key = (method, outcome)
        children = self._request_children.get(key)
        if children is None:  # labels() builds and checks the label tuple under a lock
            children = (
                self._requests.labels(method=method, outcome=outcome),
                self._duration.labels(method=method),
            )
            self._request_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def bad_frame(self, reason: str) -> None:
        """Count a malformed or oversized frame (``reason``: ``"oversized"``, ``"decode"``...)."""
        self._bad_frames.labels(reason=reason).inc()

    def tls_failure(self) -> None:
        """Count a failed TLS handshake."""
        self._tls_failures.inc()

    def set_connections_open(self, count: int) -> None:
        """Set the number of open RPC connections."""
        self._connections.set(count)

    def set_members(self, *, up: int, down: int) -> None:
        """Set the number of known members that are up and down."""
        self._members.labels(state="up").set(up)
        self._members.labels(state="down").set(down)

    def set_index_documents(self, count: int) -> None:
        """Set the number of documents in the full-text index."""
        self._index_documents.set(count)

    def set_index_lag(self, *, pending: int | None, lag_s: float | None) -> None:
        """The index queue (``storage.index_sync``): contexts waiting, age of the oldest;
        None leaves a figure out (unknown)."""
        self._report("slurp_index_pending", "gauge",
                     "Contexts whose replicated writes wait to be indexed.", pending)  # fmt: skip
        self._report("slurp_index_lag_seconds", "gauge",
                     "Age of the oldest write not yet indexed (0 when none waits).",
                     lag_s)  # fmt: skip

    def set_store_contexts(self, count: int) -> None:
        """Set the number of contexts in the local store."""
        self._report("slurp_store_contexts", "gauge", "Contexts held in the local store.", count)

    def set_disk_free_ratio(self, ratio: float | None) -> None:
        """Set the free share (0..1) of the data directory's filesystem; None: unknown."""
        self._report("slurp_disk_free_ratio", "gauge",
                     "Free share (0..1) of the filesystem holding the data directory.",
                     ratio)  # fmt: skip

    def set_repair_pending(self, count: int) -> None:
        """Set the number of read-repair sends queued or in flight."""
        self._repair_pending.set(count)

    def set_replication_acks(self, totals: Mapping[str, int]) -> None:
        """Replica answers to replicated writes so far, by outcome (``"ok"``, ``"error"``)."""
        self._reported.set(
            "slurp_replication_acks_total", "counter",
            "Replica answers to replicated writes, by outcome.",
            {(("outcome", k),): v for k, v in totals.items()},
        )  # fmt: skip

    def set_quorum_failures(self, totals: Mapping[str, int]) -> None:
        """Requests that missed their quorum so far, by operation (``"write"``, ``"read"``...)."""
        self._reported.set(
            "slurp_quorum_failures_total", "counter",
            "Requests that did not reach their write or read quorum, by operation.",
            {(("op", k),): v for k, v in totals.items()},
        )  # fmt: skip

    def set_refused_versions(self, total: int) -> None:
        """Versions refused so far (bad, forged or untrusted signature, garbage)."""
        self._reported.set(
            "slurp_refused_versions_total", "counter",
            "Versions refused by this replica: forged, unsigned, untrusted or garbage.",
            {(): total},
        )  # fmt: skip

    def set_cache(self, *, hits: int, misses: int, evictions: int) -> None:
        """The record cache's counters so far."""
        for name, doc, value in (
            ("slurp_cache_hits_total", "Record cache hits.", hits),
            ("slurp_cache_misses_total", "Record cache misses.", misses),
            ("slurp_cache_evictions_total", "Record cache evictions.", evictions),
        ):
            self._reported.set(name, "counter", doc, {(): value})

    def set_sealing(self, stats: Mapping[str, int]) -> None:
        """Record sealing's counters (``crypto.keyring.Keyring.sealing_stats``)."""
        for name, kind, doc, key in (
            ("slurp_data_keys_issued_total", "counter",
             "Data keys drawn (and age-wrapped) to seal records.", "data_keys_issued"),
            ("slurp_records_sealed_total", "counter",
             "Records sealed under a data key.", "records_sealed"),
            ("slurp_data_key_cache_hits_total", "counter",
             "Record opens that found their data key unwrapped in memory.", "open_key_hits"),
            ("slurp_data_key_cache_misses_total", "counter",
             "Record opens that had to unwrap their data key with age.", "open_key_misses"),
            ("slurp_data_key_cache_keys", "gauge",
             "Unwrapped data keys (and refusals) held in memory.", "open_keys"),
        ):  # fmt: skip
            self._report(name, kind, doc, stats.get(key))

    def set_handoff(
        self, *, hints: int | None, hint_bytes: int | None, dropped: int | None,
        delivered: int | None,
    ) -> None:  # fmt: skip
        """The hinted-handoff figures; None leaves a figure out (unknown)."""
        self._report("slurp_hints", "gauge", "Hints held for members that are down.", hints)
        self._report("slurp_hint_bytes", "gauge", "Bytes of hints held.", hint_bytes)
        self._report("slurp_hints_dropped_total", "counter",
                     "Hints given up (expired or over the limits).", dropped)  # fmt: skip
        self._report("slurp_hints_delivered_total", "counter",
                     "Hints delivered to their member.", delivered)  # fmt: skip

    def set_control(
        self, *, is_leader: bool | None, term: int | None, elections: int | None,
        commit_index: int | None, applied_index: int | None, admin_key_held: bool | None,
    ) -> None:  # fmt: skip
        """The control plane's figures; None leaves a figure out (no control plane yet)."""
        self._report("slurp_is_leader", "gauge", "1 while this node is the control-plane leader.",
                     _flag(is_leader))  # fmt: skip
        self._report("slurp_term", "gauge", "This node's Raft term.", term)
        self._report("slurp_elections_total", "counter",
                     "Elections this node started (as a candidate).", elections)  # fmt: skip
        self._report("slurp_raft_commit_index", "gauge",
                     "The highest control-log index this node knows committed.",
                     commit_index)  # fmt: skip
        self._report("slurp_raft_applied_index", "gauge",
                     "The highest control-log index this node applied.", applied_index)  # fmt: skip
        self._report("slurp_admin_key_held", "gauge",
                     "1 while this node holds the rebuilt admin identity (leaders only).",
                     _flag(admin_key_held))  # fmt: skip

    def set_antientropy(
        self, *, last_pass_age_s: float | None, versions_repaired: int | None,
        bytes_sent: int | None, bytes_received: int | None,
    ) -> None:  # fmt: skip
        """The anti-entropy figures; None leaves a figure out (unknown, or no pass yet)."""
        self._report("slurp_antientropy_last_pass_age_seconds", "gauge",
                     "Seconds since the last finished anti-entropy pass.",
                     last_pass_age_s)  # fmt: skip
        self._report("slurp_antientropy_versions_repaired_total", "counter",
                     "Versions repaired by anti-entropy.", versions_repaired)  # fmt: skip
        name = "slurp_antientropy_bytes_total"
        if bytes_sent is None or bytes_received is None:
            self._reported.drop(name)
        else:
            self._reported.set(
                name, "counter", "Bytes anti-entropy sent and received, by direction.",
                {(("direction", "received"),): bytes_received,
                 (("direction", "sent"),): bytes_sent},
            )  # fmt: skip

    def set_rebalance(
        self, *, pending_ranges: int | None, bytes_left: int | None, streamed_bytes: int | None
    ) -> None:
        """Range streaming's figures (node/cluster/rebalance.py); None leaves one out."""
        self._report("slurp_rebalance_pending_ranges", "gauge",
                     "Ring arcs whose replicas change that this node has not streamed yet.",
                     pending_ranges)  # fmt: skip
        self._report("slurp_rebalance_bytes_left", "gauge",
                     "Version bytes this node may still stream to new owners (upper bound).",
                     bytes_left)  # fmt: skip
        self._report("slurp_rebalance_streamed_bytes_total", "counter",
                     "Version bytes streamed to new owners during membership changes.",
                     streamed_bytes)  # fmt: skip

    def set_backup(self, *, last_success_s: float | None, failures: int) -> None:
        """Scheduled backups (node/daemon/backup_service.py); no success yet leaves it out."""
        self._report("slurp_backup_last_success_timestamp_seconds", "gauge",
                     "Unix time of the last scheduled backup that succeeded.",
                     last_success_s)  # fmt: skip
        self._report("slurp_backup_failures_total", "counter",
                     "Scheduled backups that failed since the node started.", failures)  # fmt: skip

    def _report(self, name: str, kind: str, doc: str, value: float | None) -> None:
        if value is None:
            self._reported.drop(name)
        else:
            self._reported.set(name, kind, doc, {(): value})

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format, version 0.0.4."""
        return generate_latest(self.registry)


def _flag(value: bool | None) -> int | None:
    return None if value is None else int(value)
