"""Scheduled backups of this node's store (issue 11, "Scheduled backups", single node).

Owns the trio shell around ``storage.backup_plan``: read what is in the backup directory
(the sidecars), ask the core whether a backup is due, take it in a worker thread
(``storage.backup_io.create``: to the admin recipient, no identity needed), prune what
retention drops, feed ``slurp_backup_last_success_timestamp_seconds`` and
``slurp_backup_failures_total``, sleep until the next one is due; and the ``backup``
field of ``node.status`` (``status``), whose ``warning`` says when the last good backup
is older than twice the schedule.
Must not know: the backup format, the schedule grammar (the core parses it).

A node outside a cluster (one ring member) that has ``[backup] schedule`` set backs up
its own store; in a cluster the leader takes cluster backups as a duty instead
(``node.control.cluster_backup`` sets ``defer``) and this service only waits. A bad
schedule or a failed backup is logged and counted, never fatal to the node; a failed
backup is retried after
``RETRY_S`` (or the interval, if shorter).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from node.daemon.metrics import NodeMetrics
from storage import backup_io
from storage.backup_plan import (
    Policy,
    Step,
    Taken,
    due_in_ms,
    parse,
    plan,
    stale_warning,
    to_prune,
)
from storage.context_store import ContextStore
from storage.errors import StorageError
from storage.views import iso_ms

log = logging.getLogger(__name__)
RETRY_S = 300.0
DEFER_CHECK_S = 5  # while deferring: how often to look again (no I/O)


class BackupService:
    """Takes this node's backups on a schedule (see the module docstring)."""

    def __init__(
        self,
        store: ContextStore,
        policy: Policy,
        directory: Path,
        metrics: NodeMetrics,
        *,
        clock_ms: Callable[[], int],
    ) -> None:
        self.store = store
        self.policy = policy
        self.directory = directory
        self.metrics = metrics
        self._clock_ms = clock_ms
        self.failures = 0
        self.last_success_ms: int | None = None
        # set by the cluster backup: True while the node is in a cluster, whose leader
        # takes the backups as a duty (node.control.cluster_backup); this service waits
        self.defer: Callable[[], bool] = lambda: False
        self.checked = trio.Event()  # set after the first check (and backup, if due)
        self._started_ms = clock_ms()

    @classmethod
    def from_config(
        cls,
        store: ContextStore,
        schedule: str,
        *,
        keep: int,
        incremental: int,
        directory: Path | None,
        metrics: NodeMetrics,
        clock_ms: Callable[[], int],
    ) -> BackupService:
        """A service for the ``[backup]`` table.

        Raises:
            InvalidPayload: the schedule does not parse (``field`` is ``backup.schedule``).
        """
        parsed = parse(schedule)
        policy = Policy(parsed.interval_s, keep=keep, incremental=incremental, cron=parsed.cron)
        return cls(store, policy, directory or store.data_dir.backups, metrics,
                   clock_ms=clock_ms)  # fmt: skip

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take backups when due, forever."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.last_success_ms = self._newest_ms()
        self._feed()
        task_status.started()
        while True:
            wait_s = await trio.to_thread.run_sync(self.step)
            self.checked.set()
            await trio.sleep(wait_s)

    def step(self) -> float:
        """Take the backup that is due, if any; returns seconds until the next check."""
        if self.defer():
            return float(min(self.policy.interval_s, DEFER_CHECK_S))
        taken = self.taken()
        due = plan(self._clock_ms(), taken, self.policy)
        if due is None:
            return due_in_ms(self._clock_ms(), taken, self.policy) / 1000
        try:
            self._take(due)
        except (StorageError, OSError) as exc:
            self.failures += 1
            self._feed()
            log.error("scheduled backup failed: %s", exc)
            return min(RETRY_S, float(self.policy.interval_s))
        self.last_success_ms = self._clock_ms()
        self._feed()
        for name in to_prune(self.taken(), self.policy.keep):
            path = self.directory / name
            path.unlink(missing_ok=True)
            backup_io.sidecar_of(path).unlink(missing_ok=True)
        return due_in_ms(self._clock_ms(), self.taken(), self.policy) / 1000

    def taken(self) -> list[Taken]:
        """The backups in the directory that have a readable sidecar, oldest first."""
        out = []
        for entry in backup_io.list_backups(self.directory):
            kind, created = entry.get("kind"), entry.get("created_ms")
            if kind in ("full", "incremental") and isinstance(created, int):
                out.append(Taken(Path(entry["file"]).name, kind, created))
        return sorted(out, key=lambda item: item.created_ms)

    def _take(self, due: Step) -> None:
        out = backup_io.default_path(self.store)
        out = self.directory / out.name
        since = None if due.since is None else self.directory / due.since
        made = backup_io.create(self.store, out, cluster_id=self.store.keyring.node_id, since=since)
        log.info("scheduled %s backup %s (cut %s)", made.manifest.kind, out.name,
                 made.manifest.cut)  # fmt: skip

    def status(self) -> dict[str, Any]:
        """``node.status``'s ``backup``: {schedule_s, cron, dir, last_success_at, failures,
        warning}; ``schedule_s`` is the interval (for a cron spec, in ``cron``, its
        longest gap between two runs); ``warning`` is null unless the last good backup (or,
        without one, the service's start) is older than twice the schedule."""
        warning = stale_warning(
            self._clock_ms(),
            self.last_success_ms,
            self._started_ms,
            self.policy.interval_s,
            cron=self.policy.cron,
        )
        return {
            "backup": {
                "schedule_s": self.policy.interval_s,
                "cron": self.policy.cron,
                "dir": str(self.directory),
                "last_success_at": None
                if self.last_success_ms is None
                else iso_ms(self.last_success_ms),
                "failures": self.failures,
                "warning": warning,
            }
        }

    def _newest_ms(self) -> int | None:
        taken = self.taken()
        return taken[-1].created_ms if taken else None

    def _feed(self) -> None:
        last_s = None if self.last_success_ms is None else self.last_success_ms / 1000
        self.metrics.set_backup(last_success_s=last_s, failures=self.failures)
