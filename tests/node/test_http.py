"""node.daemon.http + node.daemon.metrics: the health and metrics endpoint on 127.0.0.1, port 0,
spoken to with raw bytes, so malformed and hostile requests can be sent as they are."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from node.daemon.config import ListenConfig
from node.daemon.http import HealthServer, HttpLimits
from node.daemon.metrics import METRIC_NAMES, NodeMetrics

SEED = 20260102
IO_TIMEOUT_S = 5.0


@dataclass
class Probe:
    """A health function whose answer the test sets."""

    ready: bool = True
    checks: dict[str, object] = field(default_factory=lambda: {"store": "ok", "members": 3})
    broken: bool = False

    def __call__(self) -> tuple[bool, dict[str, object]]:
        if self.broken:
            raise RuntimeError("probe bug")
        return self.ready, self.checks


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def busy_metrics() -> NodeMetrics:
    """Metrics with a sample in every family (labelled ones included)."""
    metrics = NodeMetrics()
    metrics.observe_request("put", "ok", 0.004)
    metrics.observe_request("get", "not_found", 0.0002)
    metrics.bad_frame("oversized")
    metrics.tls_failure()
    metrics.set_connections_open(4)
    metrics.set_members(up=3, down=1)
    metrics.set_index_documents(12)
    metrics.set_index_lag(pending=2, lag_s=0.25)
    metrics.set_repair_pending(2)
    metrics.set_store_contexts(10)
    metrics.set_disk_free_ratio(0.5)
    metrics.set_replication_acks({"ok": 2, "error": 1})
    metrics.set_quorum_failures({"write": 1})
    metrics.set_refused_versions(3)
    metrics.set_cache(hits=5, misses=1, evictions=1)
    metrics.set_sealing({"data_keys_issued": 2, "records_sealed": 9, "open_keys": 3,
                         "open_key_hits": 7, "open_key_misses": 3})  # fmt: skip
    metrics.set_handoff(hints=4, hint_bytes=4096, dropped=1, delivered=7)
    metrics.set_antientropy(last_pass_age_s=12.5, versions_repaired=3, bytes_sent=100,
                            bytes_received=200)  # fmt: skip
    metrics.set_control(is_leader=True, term=3, elections=2, commit_index=9, applied_index=9,
                        admin_key_held=True)  # fmt: skip
    metrics.set_rebalance(pending_ranges=4, bytes_left=1024, streamed_bytes=2048)
    metrics.set_backup(last_success_s=1_767_225_600.0, failures=1)
    return metrics


async def start(
    nursery: trio.Nursery,
    probe: Probe | None = None,
    metrics: NodeMetrics | None = None,
    limits: HttpLimits | None = None,
) -> int:
    server = HealthServer(
        ListenConfig("127.0.0.1", 0), probe or Probe(), metrics or NodeMetrics(), limits
    )
    port: int = await nursery.start(server.run)
    assert server.port == port
    return port


async def exchange(port: int, data: bytes, *, eof: bool = True) -> Reply:
    """Send ``data`` (then EOF unless told), read the whole reply."""
    with trio.fail_after(IO_TIMEOUT_S):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(data)
            if eof:
                await stream.send_eof()
            raw = bytearray()
            while chunk := await stream.receive_some(65536):
                raw += chunk
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    status_line, *lines = head.decode("ascii").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    return Reply(int(status_line.split(" ")[1]), {k.lower(): v for k, v in headers.items()}, body)


async def get(port: int, path: str, method: str = "GET") -> Reply:
    return await exchange(port, f"{method} {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())


async def test_health_ready(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    reply = await get(port, "/health")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["connection"] == "close"
    assert int(reply.headers["content-length"]) == len(reply.body)
    assert json.loads(reply.body) == {
        "live": True,
        "ready": True,
        "checks": {"store": "ok", "members": 3},
    }


async def test_health_not_ready_is_503_but_live(nursery: trio.Nursery) -> None:
    probe = Probe(ready=False, checks={"quorum": "2 of 3 members down"})
    port = await start(nursery, probe)
    reply = await get(port, "/health")
    assert reply.status == 503
    assert json.loads(reply.body)["ready"] is False
    assert json.loads(reply.body)["checks"] == {"quorum": "2 of 3 members down"}
    live = await get(port, "/health/live")
    assert (live.status, json.loads(live.body)) == (200, {"live": True})


async def test_readiness_follows_the_probe(nursery: trio.Nursery) -> None:
    probe = Probe(ready=False)
    port = await start(nursery, probe)
    assert (await get(port, "/health")).status == 503
    probe.ready = True
    assert (await get(port, "/health")).status == 200


async def test_broken_probe_is_500_and_the_server_keeps_serving(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    port = await start(nursery, Probe(broken=True))
    reply = await get(port, "/health")
    assert reply.status == 500
    assert json.loads(reply.body)["ready"] is False
    assert "probe bug" in caplog.text
    assert (await get(port, "/health/live")).status == 200


async def test_metrics_parse_and_name_every_family(nursery: trio.Nursery) -> None:
    port = await start(nursery, metrics=busy_metrics())
    reply = await get(port, "/metrics?format=ignored")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = reply.body.decode("utf-8")
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text
        assert name.removesuffix("_total") in families
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in families.values()
        for sample in family.samples
    }
    assert samples[("slurp_requests_total", (("method", "put"), ("outcome", "ok")))] == 1.0
    assert samples[("slurp_members", (("state", "down"),))] == 1.0
    assert samples[("slurp_hints", ())] == 4.0
    assert samples[("slurp_records_sealed_total", ())] == 9.0
    assert samples[("slurp_data_key_cache_misses_total", ())] == 3.0
    assert samples[("slurp_is_leader", ())] == 1.0
    assert samples[("slurp_term", ())] == 3.0
    assert samples[("slurp_antientropy_bytes_total", (("direction", "sent"),))] == 100.0
    assert samples[("slurp_request_duration_seconds_count", (("method", "get"),))] == 1.0
    # nothing is exported that METRIC_NAMES (and so FEEDERS) does not list
    created = {name for name in families if name.endswith("_created")}  # client timestamps
    assert set(families) - created == {name.removesuffix("_total") for name in METRIC_NAMES}


async def test_metrics_are_per_node() -> None:
    first, second = NodeMetrics(), NodeMetrics()
    first.tls_failure()
    assert b"slurp_tls_failures_total 1.0" in first.render()
    assert b"slurp_tls_failures_total 0.0" in second.render()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian prometheus)")
async def test_metrics_pass_promtool(nursery: trio.Nursery) -> None:
    port = await start(nursery, metrics=busy_metrics())
    body = (await get(port, "/metrics")).body
    result = await trio.run_process(
        ["promtool", "check", "metrics"], stdin=body, capture_stdout=True, capture_stderr=True
    )
    assert result.stdout + result.stderr == b""


async def test_head_has_headers_and_no_body(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    reply = await get(port, "/metrics", method="HEAD")
    assert reply.status == 200
    assert int(reply.headers["content-length"]) > 0
    assert reply.body == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"POST /health HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405),
        (b"GET /health/live HTTP/1.0\n\n", 200),  # bare LF line ends are tolerated
        (b"\x00\xffgarbage\r\n\r\n", 400),
        (b"GET /health\r\n\r\n", 400),
        (b"GET /health HTTP/2.0\r\n\r\n", 400),
        (b"get /health HTTP/1.1\r\n\r\n", 400),
        (b"GET http://node/health HTTP/1.1\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nX: caf\xc3\xa9\r\n\r\n", 400),
        (b"GET /health HTTP/1.1\r\nHost: a", 400),  # EOF inside the head
        (b"GET /health HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
        (b"GET /health HTTP/1.1\r\nX: " + b"a" * 20000, 431),
    ],
)
async def test_bad_requests_are_answered_and_the_server_keeps_serving(
    nursery: trio.Nursery, request_bytes: bytes, status: int
) -> None:
    port = await start(nursery)
    reply = await exchange(port, request_bytes)
    assert reply.status == status
    if status != 200:
        assert "error" in json.loads(reply.body)
    assert (await get(port, "/health/live")).status == 200


async def test_405_says_what_is_allowed(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    reply = await get(port, "/metrics", method="DELETE")
    assert (reply.status, reply.headers["allow"]) == (405, "GET, HEAD")


async def test_random_garbage_never_stops_the_server(nursery: trio.Nursery) -> None:
    rng = random.Random(SEED)
    port = await start(nursery)
    for case in range(30):
        blob = rng.randbytes(rng.randrange(1, 300))
        if case % 3 == 0:
            blob += b"\r\n\r\n"
        reply = await exchange(port, blob)
        assert reply.status in (400, 404, 405, 431), f"seed {SEED} case {case}"
    assert (await get(port, "/health/live")).status == 200


async def test_silent_client_is_closed_without_reply(nursery: trio.Nursery) -> None:
    port = await start(nursery)
    with trio.fail_after(IO_TIMEOUT_S):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_eof()
            assert await stream.receive_some(100) == b""
    assert (await get(port, "/health/live")).status == 200


async def test_slow_request_head_times_out(nursery: trio.Nursery) -> None:
    """Slowloris: a head that never ends gets 408 after head_timeout_s."""
    port = await start(nursery, limits=HttpLimits(head_timeout_s=0.2))
    reply = await exchange(port, b"GET /health HTTP/1.1\r\nX-Slow: 1\r\n", eof=False)
    assert reply.status == 408
    assert (await get(port, "/health/live")).status == 200


async def test_connections_beyond_the_limit_get_503(nursery: trio.Nursery) -> None:
    server = HealthServer(
        ListenConfig("127.0.0.1", 0), Probe(), NodeMetrics(), HttpLimits(max_connections=1)
    )
    port = await nursery.start(server.run)
    with trio.fail_after(IO_TIMEOUT_S):
        async with await trio.open_tcp_stream("127.0.0.1", port) as idle:
            await idle.send_all(b"GET /health")  # holds the only slot
            await trio.testing.wait_all_tasks_blocked()
            assert server.statistics().connections_active == 1
            assert (await get(port, "/health")).status == 503
            await idle.send_all(b" HTTP/1.1\r\n\r\n")
            await idle.send_eof()
            raw = bytearray()
            while chunk := await idle.receive_some(65536):
                raw += chunk
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n")
    assert (await get(port, "/health")).status == 200


async def test_repeated_requests_count_on_the_same_series() -> None:
    """observe_request keeps each (method, outcome) series' children: repeats add up."""
    metrics = NodeMetrics()
    for seconds in (0.001, 0.002, 0.004):
        metrics.observe_request("ctx.put", "ok", seconds)
    metrics.observe_request("ctx.put", "UCXL-404-NOT_FOUND", 0.5)
    text = metrics.render().decode()
    assert 'slurp_requests_total{method="ctx.put",outcome="ok"} 3.0' in text
    assert 'slurp_requests_total{method="ctx.put",outcome="UCXL-404-NOT_FOUND"} 1.0' in text
    assert 'slurp_request_duration_seconds_count{method="ctx.put"} 4.0' in text
