"""The leader duties of issue 8: TTL sweeps, compaction and the rotation-due check.

Owns: the handlers ``ControlService.duty_handlers`` runs when ``node/control/duties.py``
says a duty is due, and the ``ctl.maintain`` method through which the leader asks each
member to sweep or compact its own store. Backups (issue 11) and rotation (issue 9) add
their handlers the same way.

Must not know: Raft, when a duty is due (the duties core), how the log records it (the
control shell proposes ``duty.started`` / ``duty.finished`` around each handler).

Invariants: ``ctl.maintain`` carries the leader's term and is refused by a member whose
term or persisted fence (node/control/fence.py) is higher (a deposed leader's late order
is not obeyed); a member that does not
answer is reported in the duty's message and the duty still finishes: the next run covers
it (sweeps and compaction are idempotent).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import trio

from node.cluster.service import NodeService
from node.control.duties import DutyAction
from node.control.fence import Fence
from node.control.service import ControlService
from node.errors import NodeError
from node.rpc.transport import Peer
from storage.errors import Forbidden, StorageError
from storage.key_age import rotation_warnings

log = logging.getLogger(__name__)
Body = dict[str, Any]
MEMBER_DUTIES = ("ttl_sweep", "compaction")
MAINTAIN_TIMEOUT_S = 300.0


class Maintenance:
    """Registers the duty handlers and ``ctl.maintain`` on one node."""

    def __init__(self, control: ControlService, fence: Fence, *, max_key_age_days: int) -> None:
        self.control = control
        self.fence = fence
        self.service: NodeService = control.service
        self.max_key_age_days = max_key_age_days
        for duty in MEMBER_DUTIES:
            control.duty_handlers[duty] = self._on_every_member
        control.duty_handlers["rotation_check"] = self._rotation_check
        self.service.extra_replica_methods["ctl.maintain"] = self._maintain

    async def _on_every_member(self, action: DutyAction, term: int) -> str:
        """Ask every ring member (this node included) to run ``action.name`` on its store."""
        results: dict[str, str] = {}

        async def one(name: str) -> None:
            body = {"duty": action.name, "term": term}
            try:
                answer = await self.service.fanout.on(
                    name, "ctl.maintain", body, lambda: self._run_local(action.name)
                )
                results[name] = f"ok ({answer.get('removed', 0)} removed)"
            except (NodeError, StorageError) as exc:
                results[name] = f"failed: {exc}"

        async with trio.open_nursery() as nursery:
            for name in self.service.cluster.member_names():
                nursery.start_soon(one, name)
        return ", ".join(f"{name}: {outcome}" for name, outcome in sorted(results.items()))

    def _run_local(self, duty: str) -> Body:
        store = self.service.store
        if duty == "ttl_sweep":
            return {"removed": store.sweep_expired()}
        store.compact()
        return {"removed": 0}

    async def _maintain(self, peer: Peer, args: Body) -> Body:
        if peer.kind != "node":
            raise Forbidden("ctl.maintain is for cluster nodes only")
        duty, term = args["duty"], args["term"]

        def admitted() -> Body:
            self.fence.admit(term)  # StaleTerm (403) below the persisted fence or our term
            return self._run_local(duty)

        return await self.service.fanout.blocking(admitted)

    async def _rotation_check(self, action: DutyAction, term: int) -> str:
        """Warn (status, log) when a role key is older than ``keys.max_key_age_days``."""
        keyring = self.service.store.keyring
        warnings = rotation_warnings(keyring, self.max_key_age_days, datetime.now(UTC))
        if warnings:
            self.control.warnings["rotation_due"] = "; ".join(warnings)
            for warning in warnings:
                log.warning("%s", warning)
        else:
            self.control.warnings.pop("rotation_due", None)
        return f"{len(warnings)} role keys due for rotation"
