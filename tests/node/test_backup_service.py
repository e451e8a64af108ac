"""Scheduled backups on one node: due times, full/incremental, retention, failures counted
and never fatal, the two metrics, and the trio service reporting readiness."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from prometheus_client.parser import text_string_to_metric_families

from crypto.roles import DEFAULT_ROLES
from node.daemon.backup_service import BackupService
from node.daemon.metrics import NodeMetrics
from storage import backup_io
from storage.context_store import ContextStore
from storage.errors import InvalidPayload
from storage.record import ContextRecord

ADDRESS = "ucxl://claude:backend_developer@chorus:auth/*^/src/a.py"
HOUR_MS = 3_600_000


class Clock:
    def __init__(self) -> None:
        self.now_ms = 1_767_225_600_000

    def __call__(self) -> int:
        return self.now_ms


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[ContextStore]:
    ContextStore.init(tmp_path / "node", DEFAULT_ROLES)
    opened = ContextStore.open(tmp_path / "node", clock_ms=clock)
    yield opened
    opened.close()


def service(store: ContextStore, clock: Clock, metrics: NodeMetrics) -> BackupService:
    return BackupService.from_config(
        store, "1h", keep=2, incremental=1, directory=None, metrics=metrics, clock_ms=clock
    )


def figures(metrics: NodeMetrics) -> dict[str, float]:
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
        if sample.name.startswith("slurp_backup")
    }


def test_schedule_chain_and_retention(store: ContextStore, clock: Clock) -> None:
    metrics = NodeMetrics()
    backups = service(store, clock, metrics)
    kinds = []
    for hour in range(6):
        store.store(ADDRESS, ContextRecord.from_fields({"summary": f"hour {hour}"}))
        assert backups.step() == 3600.0
        kinds.append(backups.taken()[-1].kind)
        assert backups.step() == 3600.0  # not due again yet: nothing taken
        clock.now_ms += HOUR_MS
    assert kinds == ["full", "incremental"] * 3
    kept = backups.taken()
    assert [item.kind for item in kept] == ["full", "incremental", "full", "incremental"]
    assert len(backup_io.list_backups(store.data_dir.backups)) == 4  # sidecars pruned too
    assert figures(metrics) == {
        "slurp_backup_last_success_timestamp_seconds": (clock.now_ms - HOUR_MS) / 1000,
        "slurp_backup_failures_total": 0.0,
    }


def test_a_failed_backup_is_counted_and_retried(store: ContextStore, clock: Clock) -> None:
    metrics = NodeMetrics()
    backups = service(store, clock, metrics)
    backups.step()
    clock.now_ms += HOUR_MS
    (first,) = backups.taken()
    sidecar = backup_io.sidecar_of(store.data_dir.backups / first.file)
    sidecar.write_text(sidecar.read_text().replace('"file_sha256": "', '"file_sha256": "0'))
    assert backups.step() == 300.0
    assert figures(metrics)["slurp_backup_failures_total"] == 1.0


def test_a_bad_schedule_is_refused_by_name(store: ContextStore, clock: Clock) -> None:
    with pytest.raises(InvalidPayload) as raised:
        BackupService.from_config(
            store, "0 25 * * *", keep=1, incremental=0, directory=None,
            metrics=NodeMetrics(), clock_ms=clock,
        )  # fmt: skip
    assert raised.value.field == "backup.schedule"
    assert "hour field '25'" in raised.value.message


def test_a_cron_schedule_backs_up_at_its_runs(store: ContextStore, clock: Clock) -> None:
    backups = BackupService.from_config(
        store, "0 3 * * *", keep=2, incremental=1, directory=None,
        metrics=NodeMetrics(), clock_ms=clock,
    )  # fmt: skip
    assert backups.step() == 3 * 3600.0  # the first at once (00:00), the next at 03:00
    clock.now_ms += 3 * HOUR_MS - 1
    assert backups.step() == 0.001
    assert len(backups.taken()) == 1
    clock.now_ms += 1
    assert backups.step() == 24 * 3600.0
    assert [t.kind for t in backups.taken()] == ["full", "incremental"]
    status = backups.status()["backup"]
    assert status["cron"] == "0 3 * * *"
    assert status["schedule_s"] == 86_400
    assert status["warning"] is None
    clock.now_ms += 2 * 86_400_000 + 1
    assert "longest gap of '0 3 * * *'" in backups.status()["backup"]["warning"]


async def test_the_service_takes_the_first_backup_then_waits(
    store: ContextStore, clock: Clock, autojump_clock: trio.testing.MockClock
) -> None:
    backups = service(store, clock, NodeMetrics())
    with trio.move_on_after(2 * 3600):
        async with trio.open_nursery() as nursery:
            await nursery.start(backups.run)
            await backups.checked.wait()  # the first pass runs in a worker thread
            assert [item.kind for item in backups.taken()] == ["full"]
            nursery.cancel_scope.cancel()


def test_status_warns_when_the_last_good_backup_is_old(store: ContextStore, clock: Clock) -> None:
    backups = service(store, clock, NodeMetrics())
    assert backups.status()["backup"]["warning"] is None
    backups.step()
    clock.now_ms += 2 * HOUR_MS
    assert backups.status()["backup"]["warning"] is None
    clock.now_ms += 1
    found = backups.status()["backup"]
    assert "older than twice the schedule" in found["warning"]
    assert found["failures"] == 0
    assert found["schedule_s"] == 3600
