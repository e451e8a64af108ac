"""The cluster backup's decisions: the merge of replica states at an HLC cut, backup file
names, the ``backup.*`` request bodies, and the scheduled duty's skip rules (issue 11).

Owns, for ``node.control.cluster_backup`` (the shell):

- ``merge``: one context's state from the replicas that answered (``rep.ids``): the union
  of their version ids; the purge marker that covers more wins; for each id, the replica
  holding its highest seal epoch is where it is fetched from (as reads prefer a re-sealed
  copy); ties go to the preferred replica (the leader itself), then the first by name.
- ``at_cut``: the versions a backup at ``cut`` holds: ids at or below the cut and above
  the merged purge marker, oldest first, grouped by the replica to fetch them from; for
  an incremental continuing ``since``, only the ids above ``lower_bound(since)`` (the
  embedded incremental's overlap rule, ``storage.backup_manifest``).
- ``check_base``: whether an incremental's base (``since``) may continue into this cut:
  of this cluster, and before the cut (400 naming ``since`` otherwise).
- ``replica_groups``: the ring's partitions grouped by their replica set (one quorum read
  per group, not per arc).
- ``check_name``: a backup file name the client may ask for (no path, no traversal).
- ``parse``: the typed bodies of ``backup.create`` / ``backup.read`` (400 naming the field).
- ``duty_step``: what the ``backup`` duty does on this leader (skip, or take one),
  ``duty_base``: full or incremental (``storage.backup_plan.next_step``'s decision over
  the leader's own directory, and the newest backup's sidecar as the base), and
  ``schedule_change``: whether the leader should (re)schedule the duty in the log.

Pure: no I/O, trio, clock or randomness. Must not know: RPC, files, the archive format.
Invariants: ``merge`` is commutative in its replicas; ``at_cut`` never returns an id
above ``cut``, at or below ``lower_bound(since)``, or covered by the merged marker;
``check_name`` accepts only names ``backup_name`` can produce.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from node.cluster.antientropy import partitions_in
from storage.backup_manifest import lower_bound
from storage.backup_plan import Step as Backup
from storage.errors import CorruptRecord, InvalidPayload
from storage.schema import PurgeMarker
from storage.versions import VersionId

BACKUP_DUTY = "backup"
SKIPPED = "skipped: "  # the duty's message when it took no backup
SUFFIX = ".slurp-backup.age"
MAX_READ_BYTES = 4 << 20  # one backup.read page
MAX_RECIPIENTS = 64
_NAME = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z(-[0-9]{1,4})?\.slurp-backup\.age$")
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_RECIPIENT = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")


@dataclass(frozen=True)
class ReplicaState:
    """One replica's answer for one context (``rep.ids``)."""

    ids: frozenset[str]
    marker: PurgeMarker | None = None
    epochs: Mapping[str, int] = field(default_factory=dict)  # re-sealed copies only


@dataclass(frozen=True)
class Merged:
    """One context merged over the replicas that answered."""

    marker: PurgeMarker | None
    source: Mapping[str, str]  # version id -> the replica to fetch it from


def merge(states: Mapping[str, ReplicaState], prefer: str | None = None) -> Merged:
    """Union of the replicas' states (module docstring); on a tie of seal epochs the
    ``prefer``red replica (the leader: a local read) is the source, then the first by
    name."""
    marker: PurgeMarker | None = None
    for state in states.values():
        if state.marker is not None and (
            marker is None or VersionId.parse(state.marker.upto) > VersionId.parse(marker.upto)
        ):
            marker = state.marker
    best: dict[str, tuple[int, str]] = {}
    for name in sorted(states, key=lambda name: (name != prefer, name)):
        state = states[name]
        for vid in state.ids:
            epoch = state.epochs.get(vid, 0)
            held = best.get(vid)
            if held is None or epoch > held[0]:
                best[vid] = (epoch, name)
    return Merged(marker, {vid: name for vid, (_, name) in best.items()})


def at_cut(merged: Merged, cut: str, since: str | None = None) -> dict[str, list[str]]:
    """replica -> the ids to fetch from it: at or below ``cut``, above the marker and (an
    incremental continuing ``since``) above ``lower_bound(since)``, in order."""
    top = VersionId.parse(cut)
    floors = [VersionId.parse(merged.marker.upto)] if merged.marker is not None else []
    low = lower_bound(since)
    if low is not None:
        floors.append(low)
    floor = max(floors, default=None)
    out: dict[str, list[str]] = {}
    for vid in sorted(merged.source, key=VersionId.parse):
        parsed = VersionId.parse(vid)
        if parsed > top or (floor is not None and parsed <= floor):
            continue
        out.setdefault(merged.source[vid], []).append(vid)
    return out


def replica_groups(
    ranges: Iterable[tuple[int, int, tuple[str, ...]]], partitions: int
) -> list[tuple[tuple[str, ...], list[int]]]:
    """The ring's partitions grouped by the set of replicas that hold them (from
    ``Ring.ranges``): (replicas sorted by name, partitions in order), groups sorted. Arcs
    with the same replicas in another order are one group: a quorum read asks each
    replica once for all of them."""
    groups: dict[tuple[str, ...], set[int]] = {}
    for start, end, replicas in ranges:
        parts = partitions_in(start, end, partitions)
        if parts and replicas:
            groups.setdefault(tuple(sorted(replicas)), set()).update(parts)
    return [(replicas, sorted(parts)) for replicas, parts in sorted(groups.items())]


def quorum_answered(answered: Sequence[str], r: int) -> bool:
    """Whether enough replicas answered for a read quorum (R of the preference list)."""
    return len(set(answered)) >= r


# -- names and request bodies -------------------------------------------------------------


def backup_name(created_ms: int, taken: Sequence[str] = ()) -> str:
    """``YYYYMMDDTHHMMSS.ffffffZ.slurp-backup.age`` (UTC), with ``-N`` if that is taken."""
    seconds, ms = divmod(created_ms, 1000)
    days, rest = divmod(seconds, 86_400)
    y, m, d = _civil(days)
    hh, rem = divmod(rest, 3600)
    mm, ss = divmod(rem, 60)
    stem = f"{y:04d}{m:02d}{d:02d}T{hh:02d}{mm:02d}{ss:02d}.{ms * 1000:06d}Z"
    name = stem + SUFFIX
    number = 1
    while name in taken:
        name = f"{stem}-{number}{SUFFIX}"
        number += 1
    return name


def _civil(days: int) -> tuple[int, int, int]:
    """(year, month, day) of a day count since 1970-01-01 (H. Hinnant's algorithm)."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (1 if month <= 2 else 0), month, day


def check_name(value: Any) -> str:
    """A backup file name from a request.

    Raises:
        InvalidPayload: not a name this module makes (field ``name``).
    """
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidPayload(
            "name must be a backup file name as backup.create answers it "
            "(YYYYMMDDTHHMMSS.ffffffZ.slurp-backup.age), without a directory",
            field="name",
        )
    return value


def parse(method: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """The typed arguments of a ``backup.*`` request.

    Raises:
        InvalidPayload: a field is missing, of the wrong type or out of range (named).
    """
    if method in ("backup.create", "backup.create_leader"):
        recipients = body.get("recipients") or []
        if not isinstance(recipients, list) or len(recipients) > MAX_RECIPIENTS:
            raise InvalidPayload(
                f"recipients must be a list of at most {MAX_RECIPIENTS} age1... recipients",
                field="recipients",
            )
        for item in recipients:
            if not isinstance(item, str) or not _RECIPIENT.match(item):
                raise InvalidPayload(
                    f"{str(item)[:80]!r} is not an age X25519 recipient (age1...)",
                    field="recipients",
                )
        with_keys = body.get("with_keys", False)
        if not isinstance(with_keys, bool):
            raise InvalidPayload("with_keys must be true or false", field="with_keys")
        since, since_cluster = body.get("since"), body.get("since_cluster")
        if since is not None:
            try:
                VersionId.parse(since if isinstance(since, str) else "")
            except (ValueError, CorruptRecord):
                raise InvalidPayload(
                    "since must be the cut (a version id) of an earlier backup of this "
                    "cluster, as its sidecar FILE.json holds it",
                    field="since",
                ) from None
        if since_cluster is not None and (
            since is None or not isinstance(since_cluster, str) or len(since_cluster) > 256
        ):
            raise InvalidPayload(
                "since_cluster must be the cluster id of the backup since is the cut of",
                field="since",
            )
        return {"recipients": list(recipients), "with_keys": with_keys, "since": since,
                "since_cluster": since_cluster}  # fmt: skip
    if method in ("backup.read", "backup.read_leader"):
        offset = body.get("offset", 0)
        if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < 2**48:
            raise InvalidPayload("offset must be a whole number of bytes", field="offset")
        node = body.get("node")
        if node is not None and (not isinstance(node, str) or not _NODE.match(node)):
            raise InvalidPayload("node must be a node name (backup.create's leader)", field="node")
        return {"name": check_name(body.get("name")), "offset": offset, "node": node}
    raise InvalidPayload(f"unknown method {method!r}", field="method")


# -- the scheduled duty ---------------------------------------------------------------------

Step = Literal["take", "skip_not_cluster", "skip_no_schedule"]


def duty_step(*, members: int, interval_s: int | None) -> Step:
    """What the ``backup`` duty does when the duties core says it is due on this leader.

    A cluster of one member backs up through the single-node service instead
    (``node.daemon.backup_service``); a leader without ``[backup] schedule`` takes none.
    """
    if members < 2:
        return "skip_not_cluster"
    if interval_s is None:
        return "skip_no_schedule"
    return "take"


def check_base(since: str | None, since_cluster: str | None, cluster_id: str, cut: str) -> None:
    """An incremental's base may continue into ``cut``: a backup of this cluster (when the
    client said whose it is), taken before ``cut``.

    Raises:
        InvalidPayload: a foreign base, or a base cut not before this one (field ``since``).
    """
    if since is None:
        return
    if since_cluster is not None and since_cluster != cluster_id:
        raise InvalidPayload(
            f"since: the base is a backup of {since_cluster}, not of this cluster "
            f"({cluster_id}); take a full backup (leave --since out)",
            field="since",
        )
    if VersionId.parse(since) >= VersionId.parse(cut):
        raise InvalidPayload(
            f"since: the base's cut {since} is not before this backup's cut {cut} (another "
            "leader's clock runs ahead of this one's): retry later, or take a full backup",
            field="since",
        )


def duty_base(step: Backup, base: tuple[str | None, str] | None, cluster_id: str) -> str | None:
    """The cut the ``backup`` duty's next backup continues (None: a full backup).

    ``step``: ``storage.backup_plan.next_step`` over the cluster backups in the leader's
    own directory; ``base``: (cut, cluster id) from the sidecar of ``step.since``, or None
    when it is missing or does not belong to its file. A new leader that lacks the
    previous leader's files finds no full backup there and takes a full one; so does a
    leader whose newest file is another cluster's or has no cut.
    """
    if step.kind == "full" or base is None:
        return None
    cut, owner = base
    if owner != cluster_id or cut is None:
        return None
    return cut


def schedule_change(logged_s: int | None, configured_s: int | None) -> int | None:
    """The interval the leader should propose for the ``backup`` duty (None: nothing).

    The leader's ``[backup] schedule`` is the cluster's: a duty not yet in the log, or
    logged with another interval, is (re)scheduled; without a schedule nothing is
    proposed (a logged duty then finds ``skip_no_schedule``).
    """
    if configured_s is None or logged_s == configured_s:
        return None
    return configured_s


def last_success_ms(
    duty_ok: bool, finished_ms: int, term: int, message: str, newest_file_ms: int | None
) -> int | None:
    """When the last good cluster backup finished: the duty's record in the log if its last
    run took one and succeeded (a skipped run took none), or the newest backup in this
    node's directory, whichever is later."""
    took = duty_ok and term > 0 and not message.startswith(SKIPPED)
    times = [t for t in (finished_ms if took else None, newest_file_ms) if t]
    return max(times, default=None)


def read_quorum(r: int, replicas: int) -> int:
    """R for a replica set smaller than N (a cluster of fewer than N members): all of them."""
    return max(1, min(r, replicas))
