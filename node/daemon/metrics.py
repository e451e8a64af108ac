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

Metrics (names carry their unit; counters end in ``_total``):

    slurp_requests_total{method,outcome}          requests this node coordinated or served
    slurp_request_duration_seconds{method}        histogram of their durations
    slurp_replication_acks_total{outcome}         replica answers to replicated writes
    slurp_quorum_failures_total{op}               requests that missed W or R
    slurp_bad_frames_total{reason}                malformed or oversized wire frames
    slurp_tls_failures_total                      failed TLS handshakes
    slurp_connections_open                        open RPC connections
    slurp_members{state="up"|"down"}              known cluster members by liveness
    slurp_cache_hits_total, _misses_total, _evictions_total   record cache
    slurp_index_documents                         documents in the full-text index
    slurp_store_contexts                          contexts in the local store
    slurp_leader_term                             the latest election term this node knows
    slurp_is_leader                               1 while this node leads, else 0
    slurp_internal_errors_total{where}            bugs caught at a request or task boundary
    slurp_peer_answer_malformed_total{method}     peer answers that did not parse
    slurp_requests_refused_busy_total             requests refused at max_inflight_requests
    slurp_repairs_dropped_total                   read-repair sends dropped at max_repair_sends
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

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
METRIC_NAMES = (
    "slurp_requests_total",
    "slurp_request_duration_seconds",
    "slurp_replication_acks_total",
    "slurp_quorum_failures_total",
    "slurp_bad_frames_total",
    "slurp_tls_failures_total",
    "slurp_connections_open",
    "slurp_members",
    "slurp_cache_hits_total",
    "slurp_cache_misses_total",
    "slurp_cache_evictions_total",
    "slurp_index_documents",
    "slurp_store_contexts",
    "slurp_leader_term",
    "slurp_is_leader",
    "slurp_internal_errors_total",
    "slurp_peer_answer_malformed_total",
    "slurp_requests_refused_busy_total",
    "slurp_repairs_dropped_total",
)


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
        self._acks = Counter(
            "slurp_replication_acks_total",
            "Replica answers to replicated writes, by outcome.",
            ["outcome"],
            registry=reg,
        )
        self._quorum_failures = Counter(
            "slurp_quorum_failures_total",
            "Requests that did not reach their write or read quorum, by operation.",
            ["op"],
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
        self._cache_hits = Counter("slurp_cache_hits_total", "Record cache hits.", registry=reg)
        self._cache_misses = Counter(
            "slurp_cache_misses_total", "Record cache misses.", registry=reg
        )
        self._cache_evictions = Counter(
            "slurp_cache_evictions_total", "Record cache evictions.", registry=reg
        )
        self._index_documents = Gauge(
            "slurp_index_documents", "Documents in the local full-text index.", registry=reg
        )
        self._store_contexts = Gauge(
            "slurp_store_contexts", "Contexts in the local store.", registry=reg
        )
        self._leader_term = Gauge(
            "slurp_leader_term", "The latest election term this node knows.", registry=reg
        )
        self._is_leader = Gauge(
            "slurp_is_leader", "1 while this node is the leader, else 0.", registry=reg
        )
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
            method: The request's method (``"put"``, ``"get"``...).
            outcome: A short fixed word: ``"ok"``, ``"not_found"``, ``"error"``...
            seconds: Its duration, from a monotonic clock.
        """
        self._requests.labels(method=method, outcome=outcome).inc()
        self._duration.labels(method=method).observe(seconds)

    def replication_ack(self, outcome: str, count: int = 1) -> None:
        """Count replica answers to a replicated write (``"ok"``, ``"error"``, ``"timeout"``)."""
        self._acks.labels(outcome=outcome).inc(count)

    def quorum_failure(self, op: str) -> None:
        """Count a request that missed its quorum (``op``: ``"write"`` or ``"read"``)."""
        self._quorum_failures.labels(op=op).inc()

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

    def cache_hits(self, count: int = 1) -> None:
        """Count record cache hits."""
        self._cache_hits.inc(count)

    def cache_misses(self, count: int = 1) -> None:
        """Count record cache misses."""
        self._cache_misses.inc(count)

    def cache_evictions(self, count: int = 1) -> None:
        """Count record cache evictions."""
        self._cache_evictions.inc(count)

    def set_index_documents(self, count: int) -> None:
        """Set the number of documents in the full-text index."""
        self._index_documents.set(count)

    def set_store_contexts(self, count: int) -> None:
        """Set the number of contexts in the local store."""
        self._store_contexts.set(count)

    def set_leader(self, *, term: int, is_leader: bool) -> None:
        """Set the latest known term and whether this node leads in it."""
        self._leader_term.set(term)
        self._is_leader.set(1 if is_leader else 0)

    def render(self) -> bytes:
        """Every metric in the Prometheus text exposition format, version 0.0.4."""
        return generate_latest(self.registry)
