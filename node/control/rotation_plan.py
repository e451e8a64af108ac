"""Cluster-wide key rotation, the pure core: the duty's cursor and its phases.

A pure core (ARCHITECTURE.md §2, §6): no I/O, no clock, no randomness. The leader's shell
(``node.control.rotation``) keeps a ``WalkCursor`` in the log (``cmd_duty_progress`` of
duty ``rotation:<role>``) and asks this module what is left to do.

Phases, in order (each member of the cluster, leader included, goes through each):

=========  ===========================================================================
phase      what the leader asks of every member not yet done
=========  ===========================================================================
install    ``keys.install``: install the new identity (sealed to the member's node
           recipient; the sealed copies are in the cursor, so a new leader resends the
           very identity its predecessor generated) as the role's current key version
epoch      none: the leader commits ``cmd_key_epoch`` (every member already holds it)
reseal     ``keys.reseal``: re-encrypt a bounded batch of its rows the role reads (the
           member keeps its own durable cursor, ``storage.rotation.reseal_step``)
retire     ``keys.retire``: retire the old key version (its identity file is deleted)
done       the duty finishes
=========  ===========================================================================

Must not know: RPC, the keyring, Raft. Invariants: ``WalkCursor.decode(c.encode()) == c``;
``encode`` never exceeds ``MAX_CURSOR_BYTES`` (it raises ``CursorTooLarge`` instead); the
sealed copies are dropped once every member installed; a phase ends only when every
current member is done with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from node.control.metadata_types import MAX_CURSOR_BYTES, frozen_map

CURSOR_SCHEMA = 1
DUTY_PREFIX = "rotation:"
PHASES = ("install", "epoch", "reseal", "retire", "done")


class CursorTooLarge(ValueError):
    """The cursor does not fit a log entry's duty cursor (too many members)."""


class MalformedCursor(ValueError):
    """The stored cursor does not decode."""


def duty_name(role: str) -> str:
    """The leader duty that rotates ``role``."""
    return DUTY_PREFIX + role


def role_of(duty: str) -> str | None:
    """The role a rotation duty rotates (None: not a rotation duty)."""
    return duty[len(DUTY_PREFIX) :] if duty.startswith(DUTY_PREFIX) else None


@dataclass(frozen=True)
class WalkCursor:
    """Where a cluster-wide rotation of ``role`` from ``from_version`` to ``version`` is.

    ``sealed``: node_id -> the new identity age-encrypted to that member (only while
    installing); ``done``: the members done with the current phase; ``rows``: node_id ->
    (rows scanned, rows held) of the re-encryption walk, for progress.
    """

    role: str
    version: int
    from_version: int
    recipient: str
    phase: str = "install"
    sealed: Mapping[str, bytes] = field(default_factory=lambda: frozen_map({}))
    done: frozenset[str] = frozenset()
    rows: Mapping[str, tuple[int, int]] = field(default_factory=lambda: frozen_map({}))

    def encode(self) -> bytes:
        """The stored form (msgpack).

        Raises:
            CursorTooLarge: over ``MAX_CURSOR_BYTES``.
        """
        data = bytes(
            msgpack.packb(
                {
                    "v": CURSOR_SCHEMA,
                    "role": self.role,
                    "version": self.version,
                    "from": self.from_version,
                    "recipient": self.recipient,
                    "phase": self.phase,
                    "sealed": dict(sorted(self.sealed.items())),
                    "done": sorted(self.done),
                    "rows": {k: list(v) for k, v in sorted(self.rows.items())},
                },
                use_bin_type=True,
            )
        )
        if len(data) > MAX_CURSOR_BYTES:
            raise CursorTooLarge(
                f"the rotation cursor takes {len(data)} bytes, over {MAX_CURSOR_BYTES}"
            )
        return data

    @classmethod
    def decode(cls, data: bytes) -> WalkCursor:
        """Parse the stored form.

        Raises:
            MalformedCursor: it does not decode or a field is wrong.
        """
        try:
            raw: Any = msgpack.unpackb(data, raw=False)
            if not isinstance(raw, dict) or raw.get("v") != CURSOR_SCHEMA:
                raise ValueError("schema")
            phase = str(raw["phase"])
            if phase not in PHASES:
                raise ValueError("phase")
            sealed = {str(k): bytes(v) for k, v in dict(raw["sealed"]).items()}
            rows = {str(k): (int(v[0]), int(v[1])) for k, v in dict(raw["rows"]).items()}
            return cls(
                role=str(raw["role"]),
                version=int(raw["version"]),
                from_version=int(raw["from"]),
                recipient=str(raw["recipient"]),
                phase=phase,
                sealed=frozen_map(sealed),
                done=frozenset(str(x) for x in raw["done"]),
                rows=frozen_map(rows),
            )
        except (ValueError, TypeError, KeyError, IndexError, msgpack.ExtraData) as exc:
            raise MalformedCursor(f"the rotation cursor does not decode: {exc}") from None

    def pending(self, members: Iterable[str]) -> tuple[str, ...]:
        """The members (node ids) not yet done with this phase, sorted."""
        return tuple(sorted(set(members) - self.done))

    def with_done(self, node_id: str) -> WalkCursor:
        """This cursor with ``node_id`` done with the phase."""
        return replace(self, done=self.done | {node_id})

    def with_rows(self, node_id: str, scanned: int, total: int) -> WalkCursor:
        """This cursor with a member's re-encryption progress."""
        return replace(self, rows=frozen_map({**self.rows, node_id: (scanned, total)}))

    def advanced(self, members: Iterable[str]) -> WalkCursor:
        """The next phase when every member in ``members`` is done (else unchanged); the
        sealed copies are dropped when installing ends."""
        if self.phase == "done" or (self.phase != "epoch" and self.pending(members)):
            return self
        nxt = PHASES[PHASES.index(self.phase) + 1]
        return replace(self, phase=nxt, done=frozenset(), sealed=frozen_map({}))

    def status(self, members: Iterable[str]) -> dict[str, Any]:
        """``{role, version, phase, members_done, members_total, rows_done, rows_total}``."""
        names = sorted(set(members))
        scanned = sum(self.rows.get(m, (0, 0))[0] for m in names)
        total = sum(self.rows.get(m, (0, 0))[1] for m in names)
        return {
            "role": self.role,
            "version": self.version,
            "phase": self.phase,
            "members_done": len(self.done & set(names)),
            "members_total": len(names),
            "rows_done": min(scanned, total) if self.phase == "reseal" else (
                total if PHASES.index(self.phase) > PHASES.index("reseal") else 0
            ),
            "rows_total": total,
        }  # fmt: skip
