"""Cluster backups on the leader, and scheduled backups as the ``backup`` leader duty
(issue 11, "Cluster" and "Scheduled backups").

Owns the trio shell of a cluster backup and its RPC methods (node/rpc/api.py):

- ``backup.create`` {recipients: [age1...], with_keys: bool, since?: cut, since_cluster?:
  id} -> {name, bytes, sha256, leader, manifest: {...summary}} (a client with the
  ``admin`` role; a follower hands it to the leader as ``backup.create_leader``): the
  leader takes a backup into its ``[backup] dir``: full, or with ``since`` (an earlier
  backup's cut) an incremental;
- ``backup.read`` {name, offset, node?} -> {data: bytes (<= 4 MiB), eof: bool} (admin):
  a page of the file on ``node`` (``backup.create``'s ``leader``, so a leader change in
  between does not lose it), or on the current leader; another node reads it there with
  ``backup.read_leader`` (node certificates only).

How the leader takes one (docs/backup.md, "Cluster backups"):

1. ``cut`` = a fresh id of the leader's HLC (its clock is moved past every id it has
   applied or been sent, so the cut is after every write it has seen acknowledged).
2. For every set of replicas of the ring's arcs (the *old* ring during a membership
   transition: it holds every acknowledged write; ``replica_groups``: the partitions
   that set replicates, so 3 nodes with N=3 are one group), from R of those replicas
   (this node first, read without an RPC; the next one when one fails): the contexts of
   those partitions (``rep.tree`` leaves, then ``rep.digests``), then, 256 contexts at a
   time, each context's state (``rep.ids``). Fewer than R answering fails the backup
   with 503 naming the partitions: with R + W > N every write acknowledged before the
   cut is on one of any R replicas.
3. Merge (``cluster_backup_plan.merge``), keep the ids at or below the cut (``at_cut``;
   an incremental: only those above ``lower_bound(since)`` too, every purge marker
   still), fetch them (``rep.fetch``) from the replica holding the highest seal
   epoch (this node's own store on a tie), check each envelope's signature (once per
   node: ``VersionReader.checked``'s digest cache), and spool them to disk
   (``storage.backup_stream``); never more than one chunk of contexts in memory.
4. The leader's audit log and keyring (public key epochs; secrets with ``with_keys``),
   the members' signing keys, then tar + age to the admin recipient (+ recipients).

The duty: the leader's ``[backup] schedule`` is proposed as duty ``backup``'s interval;
when the duties core says it is due, the leader takes a cluster backup into its
directory, full or (``[backup] incremental``, ``storage.backup_plan.next_step`` over the
cluster backups in its own directory) an incremental continuing the newest one's cut
(from its sidecar; ``duty_base``), and prunes to ``keep`` (a cron spec is followed as an
interval of its longest gap). A new leader without the previous leader's files takes a
full one. The last
success comes from the duty's record in the log (so a new leader knows when the next one
is due) or from the newest backup in this node's directory. A cluster of one member
leaves backups to ``node.daemon.backup_service`` (which defers to this one in a cluster).

Must not know: the archive format (``storage.backup_stream``), how Raft commits.
Invariants: one backup at a time per node; a failed backup leaves no file (the spool is
removed, the output renamed only when complete); a name from a request is validated
(``check_name``) before any path is built from it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyrage
import trio
from pyrage import x25519

from crypto.errors import CryptoError
from crypto.roles import ADMIN_ROLE
from node.cluster.antientropy import MAX_ITEMS
from node.control import metadata
from node.control.cluster_backup_plan import (
    BACKUP_DUTY,
    MAX_READ_BYTES,
    SKIPPED,
    SUFFIX,
    ReplicaState,
    at_cut,
    backup_name,
    check_base,
    check_name,
    duty_base,
    duty_step,
    last_success_ms,
    merge,
    quorum_answered,
    read_quorum,
    replica_groups,
    schedule_change,
)
from node.control.duties import DutyAction
from node.control.service import ControlService
from node.daemon.backup_service import BackupService
from node.daemon.metrics import NodeMetrics
from node.errors import NodeError, PeerUnavailable, RemoteError
from node.rpc.transport import Peer
from storage import backup_io
from storage.address import ContextName
from storage.backup import PurgeRow, VersionRow
from storage.backup_plan import Taken, next_step, stale_warning, to_prune
from storage.backup_stream import ArchiveSpool
from storage.envelope import Envelope
from storage.errors import (
    Forbidden,
    InvalidPayload,
    NotFound,
    StorageError,
    Unavailable,
)
from storage.schema import PurgeMarker
from storage.versions import VersionId
from storage.views import iso_ms

log = logging.getLogger(__name__)
Body = dict[str, Any]
PEER_TIMEOUT_S = 30.0
FORWARD_TIMEOUT_S = 3600.0
CONTEXT_CHUNK = 256
SCHEDULE_CHECK_S = 5.0


class BackupFailed(Unavailable):
    """A cluster backup could not read a quorum (503: retry when more replicas are up)."""


class ClusterBackup:
    """Registers ``backup.*``, the ``backup`` duty and the ``backup`` status on one node."""

    def __init__(
        self,
        control: ControlService,
        metrics: NodeMetrics,
        *,
        directory: Path | None,
        interval_s: int | None,
        keep: int,
        incremental: int = 0,
        single: BackupService | None,
        clock_ms: Callable[[], int],
    ) -> None:
        self.control = control
        self.service = control.service
        self.store = self.service.store
        self.metrics = metrics
        self.directory = directory or self.store.data_dir.backups
        self.interval_s = interval_s
        self.keep = keep
        self.incremental = incremental
        self.single = single
        self._clock_ms = clock_ms
        self._started_ms = clock_ms()
        self.failures = 0
        self.phases: dict[str, float] = {}  # the last backup's seconds by phase
        self._lock = trio.Lock()
        self._self_peer = Peer(self.service.name, "node", (), "self")
        control.duty_handlers[BACKUP_DUTY] = self._duty
        self.service.extra_client_methods["backup.create"] = self._create
        self.service.extra_client_methods["backup.read"] = self._read
        self.service.extra_replica_methods["backup.create_leader"] = self._create_leader
        self.service.extra_replica_methods["backup.read_leader"] = self._read_leader
        if single is not None:
            single.defer = self._single_waits

    # -- membership ---------------------------------------------------------------------------

    def in_cluster(self) -> bool:
        """Whether the applied metadata has two or more ring members."""
        state = self.control.metadata
        return state is not None and len(state.ring_members()) > 1

    def _single_waits(self) -> bool:
        """The single-node service waits in a cluster, and until the control plane has
        applied its metadata (it may be a cluster); a halted control plane: it runs."""
        if self.control.metadata is None:
            return self.control.halted is None
        return self.in_cluster()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """As leader, keep duty ``backup`` scheduled at this node's ``[backup] schedule``."""
        task_status.started()
        while True:
            await trio.sleep(SCHEDULE_CHECK_S)
            state = self.control.metadata
            if self.control.leader_term() is None or state is None or not self.in_cluster():
                continue
            duty = state.duties.get(BACKUP_DUTY)
            interval = schedule_change(None if duty is None else duty.interval_s, self.interval_s)
            if interval is None:
                self._feed()
                continue
            try:
                await self.control.propose(metadata.cmd_duty_schedule(BACKUP_DUTY, interval))
            except StorageError as exc:
                log.info("backup duty not scheduled: %s", exc.message)

    # -- status and metrics ---------------------------------------------------------------------

    def _last_success_ms(self) -> int | None:
        state = self.control.metadata
        duty = None if state is None else state.duties.get(BACKUP_DUTY)
        newest = max((t.created_ms for t in self._taken()), default=None)
        if duty is None:
            return newest
        return last_success_ms(
            duty.last_ok, duty.last_finished_ms, duty.last_term, duty.last_message, newest
        )

    def _feed(self) -> None:
        if self.control.leader_term() is None:
            return
        last = self._last_success_ms()
        self.metrics.set_backup(
            last_success_s=None if last is None else last / 1000, failures=self.failures
        )

    def status(self) -> Body:
        """``node.status``'s ``backup`` (docs/backup.md): the single-node service's outside
        a cluster; in one, the cluster duty's: {schedule_s, dir, last_success_at, failures,
        warning, scope: "cluster", leader}."""
        if not self.in_cluster():
            return self.single.status() if self.single is not None else {}
        if self.interval_s is None and self.single is None:
            return {}
        state = self.control.metadata
        duty = None if state is None else state.duties.get(BACKUP_DUTY)
        interval = self.interval_s if duty is None else duty.interval_s
        last = self._last_success_ms()
        warning = None
        if interval:
            warning = stale_warning(
                self._clock_ms(), last, self._started_ms, interval, kind="cluster backup"
            )
        return {
            "backup": {
                "schedule_s": interval,
                "cron": None if self.single is None else self.single.policy.cron,
                "dir": str(self.directory),
                "last_success_at": None if last is None else iso_ms(last),
                "failures": self.failures,
                "warning": warning,
                "scope": "cluster",
                "leader": self.control.leader_name(),
            }
        }

    # -- the duty -------------------------------------------------------------------------------

    async def _duty(self, action: DutyAction, term: int) -> str:
        step = duty_step(
            members=0
            if self.control.metadata is None
            else len(self.control.metadata.ring_members()),
            interval_s=self.interval_s,
        )
        if step != "take":
            return f"{SKIPPED}{step}"
        try:
            since = await trio.to_thread.run_sync(self._duty_since)
            made = await self.take((), with_keys=False, since=since)
        except (StorageError, NodeError) as exc:
            self.failures += 1
            self._feed()
            log.error("scheduled cluster backup failed: %s", exc)
            raise
        pruned = self._prune()
        self._feed()
        manifest = made["manifest"]
        return (f"{made['name']}: {manifest['kind']}, {manifest['counts']['versions']} versions, "
                f"{pruned} pruned")  # fmt: skip

    def _duty_since(self) -> str | None:
        """The cut the duty's next backup continues (None: full; ``duty_base``)."""
        step = next_step(self._taken(), self.incremental)
        if step.since is None:
            return None
        state = self.control.metadata
        cluster_id = self.store.keyring.node_id if state is None else state.cluster_id
        try:
            base = backup_io.since_cut(self.directory / step.since, backup_io.Opener(
                keyring=self.store.keyring))  # fmt: skip
        except StorageError as exc:
            log.warning("backup duty: %s is no base (%s); taking a full backup", step.since,
                        exc.message)  # fmt: skip
            base = None
        return duty_base(step, base, cluster_id)

    def _taken(self) -> list[Taken]:
        out = []
        for entry in backup_io.list_backups(self.directory):
            created, kind = entry.get("created_ms"), entry.get("kind")
            if (entry.get("scope") == "cluster" and isinstance(created, int)
                    and kind in ("full", "incremental")):  # fmt: skip
                out.append(Taken(Path(entry["file"]).name, kind, created))
        return sorted(out, key=lambda item: item.created_ms)

    def _prune(self) -> int:
        names = to_prune(self._taken(), self.keep)
        for name in names:
            path = self.directory / name
            path.unlink(missing_ok=True)
            backup_io.sidecar_of(path).unlink(missing_ok=True)
        return len(names)

    # -- RPC --------------------------------------------------------------------------------------

    async def _create(self, peer: Peer, args: Body) -> Body:
        if ADMIN_ROLE not in peer.roles:
            raise Forbidden("backup.create needs a client certificate with the admin role")
        if self.control.leader_term() is not None:
            return await self._take_args(args)
        body = {"recipients": args["recipients"], "with_keys": args["with_keys"]}
        if args["since"] is not None:  # absent otherwise: a leader of before stays served
            body |= {"since": args["since"], "since_cluster": args["since_cluster"]}
        return await self._to_leader("backup.create_leader", body)

    async def _create_leader(self, peer: Peer, args: Body) -> Body:
        if self.control.leader_term() is None:
            raise Unavailable(f"{self.service.name} is not the leader any more; retry")
        return await self._take_args(args)

    async def _take_args(self, args: Body) -> Body:
        return await self.take(
            args["recipients"],
            with_keys=args["with_keys"],
            since=args["since"],
            since_cluster=args["since_cluster"],
        )

    async def _read(self, peer: Peer, args: Body) -> Body:
        if ADMIN_ROLE not in peer.roles:
            raise Forbidden("backup.read needs a client certificate with the admin role")
        node = args["node"]
        if node == self.service.name or (
            node is None and (self.control.leader_term() is not None or not self.in_cluster())
        ):
            return await self._page(args["name"], args["offset"])
        body = {"name": args["name"], "offset": args["offset"]}
        if node is None:
            return await self._to_leader("backup.read_leader", body)
        return await self.service.dialer.call(
            node, "backup.read_leader", body, timeout_s=PEER_TIMEOUT_S
        )

    async def _read_leader(self, peer: Peer, args: Body) -> Body:
        return await self._page(args["name"], args["offset"])

    async def _to_leader(self, method: str, body: Body) -> Body:
        leader = self.control.leader_name()
        if leader is None or leader == self.service.name:
            raise Unavailable("no control-plane leader is known yet; retry")
        return await self.service.dialer.call(leader, method, body, timeout_s=FORWARD_TIMEOUT_S)

    async def _page(self, name: str, offset: int) -> Body:
        path = self.directory / check_name(name)

        def read() -> Body:
            try:
                with path.open("rb") as handle:
                    size = path.stat().st_size
                    if offset > size:
                        raise InvalidPayload(
                            f"offset {offset} is past the end ({size})", field="offset"
                        )
                    handle.seek(offset)
                    data = handle.read(MAX_READ_BYTES)
            except FileNotFoundError:
                raise NotFound(f"no backup {name} on {self.service.name}", field="name") from None
            return {"data": data, "eof": offset + len(data) >= size}

        result: Body = await trio.to_thread.run_sync(read)
        return result

    # -- taking a backup ---------------------------------------------------------------------------

    async def take(
        self,
        recipients: Sequence[str],
        *,
        with_keys: bool,
        since: str | None = None,
        since_cluster: str | None = None,
    ) -> Body:
        """Take a cluster backup into the backup directory (module docstring): full, or
        with ``since`` (an earlier backup's cut; ``since_cluster``, when given, its
        cluster id) an incremental continuing it.

        Raises:
            BackupFailed: no read quorum somewhere, or the file could not be written (a
                full disk, an unreadable audit row): 503, nothing is left behind.
            InvalidPayload: a bad recipient; a base of another cluster, or not before the
                cut (field ``since``).
        """
        targets = [_recipient(self.store.keyring.recipient(ADMIN_ROLE))]
        targets += [_recipient(text) for text in recipients]
        try:
            return await self._take(
                targets, with_keys=with_keys, since=since, since_cluster=since_cluster
            )
        except (OSError, CryptoError) as exc:
            raise BackupFailed(
                f"the cluster backup could not be written in {self.directory}: {exc}"
            ) from None

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        """Add the time spent in the block to ``phases[phase]`` (the log and the answer)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = round(self.phases.get(phase, 0.0) + time.perf_counter() - start, 3)

    async def _take(
        self,
        targets: list[x25519.Recipient],
        *,
        with_keys: bool,
        since: str | None,
        since_cluster: str | None,
    ) -> Body:
        async with self._lock:
            self.phases = {}
            state = self.control.metadata
            cluster_id = self.store.keyring.node_id if state is None else state.cluster_id
            signers = [] if state is None else state.signing_keys(removed=True)
            cut = str(await trio.to_thread.run_sync(self.store.next_id))
            check_base(since, since_cluster, cluster_id, cut)
            created = self._clock_ms()
            self.directory.mkdir(parents=True, exist_ok=True)
            taken = [p.name for p in self.directory.glob(f"*{SUFFIX}")]
            out = self.directory / backup_name(created, taken)
            with ArchiveSpool(self.directory) as spool:
                await self._collect(cut, since, spool)
                audit = self.store.audit
                rows = () if audit is None else (entry.to_json() for entry in audit.entries())
                await trio.to_thread.run_sync(lambda: spool.set_audit(rows))
                keyring_json, secret = backup_io.key_files(self.store, with_keys=with_keys)
                spool.set_keys(
                    keyring_json, [*signers, self.store.keyring.signer.public_key], secret
                )

                def finish() -> tuple[Any, int, str]:
                    return spool.finish(out, targets, cluster_id=cluster_id,
                                        node_id=self.store.keyring.node_id, created_ms=created,
                                        cut=cut, since=since)  # fmt: skip

                with self._timed("tar_and_age"):
                    manifest, size, sha = await trio.to_thread.run_sync(finish)
            summary = backup_io.summary_json(manifest)
            sidecar = {**summary, "file_sha256": sha}
            backup_io.write_sidecar(out, sidecar)
            self.store.audit_event("backup.create_cluster", None, "ok")
            log.info("cluster backup %s: cut %s, %s versions; seconds by phase: %s", out.name, cut,
                     manifest.counts["versions"], self.phases)  # fmt: skip
            return {"name": out.name, "bytes": size, "sha256": sha, "seconds": dict(self.phases),
                    "leader": self.service.name, "manifest": summary}  # fmt: skip

    async def _collect(self, cut: str, since: str | None, spool: ArchiveSpool) -> None:
        old, _new = self.service.placement_rings()  # the old list holds every acked write
        quorum = self.service.config.quorum
        for replicas, parts in replica_groups(old.ranges(quorum.n), old.partitions):
            r = read_quorum(quorum.r, len(replicas))
            await self._arc(parts, list(replicas), r, (cut, since), spool)

    async def _call(self, name: str, method: str, body: Body) -> Body:
        if name == self.service.name:
            return await self.service.handle(self._self_peer, method, body)
        return await self.service.dialer.call(name, method, body, timeout_s=PEER_TIMEOUT_S)

    async def _arc(
        self,
        parts: list[int],
        replicas: list[str],
        r: int,
        bounds: tuple[str, str | None],
        spool: ArchiveSpool,
    ) -> None:
        cut, since = bounds
        contexts: set[str] = set()
        answered: list[str] = []
        failed: dict[str, str] = {}
        # R replicas suffice (R + W > N): this node first (no RPC), the others while one fails
        candidates = sorted(replicas, key=lambda name: (name != self.service.name, name))
        for name in candidates:
            if len(answered) >= r:
                break
            try:
                with self._timed("listing"):
                    contexts |= await self._contexts(name, parts)
                answered.append(name)
            except _PEER_FAILURES as exc:
                failed[name] = str(exc)
        where = f"partitions {parts[0]}..{parts[-1]}"
        if not quorum_answered(answered, r):
            raise BackupFailed(
                f"{where}: {len(answered)} of {replicas} answered, a backup reads R={r} "
                f"({'; '.join(f'{k}: {v}' for k, v in sorted(failed.items()))})"
            )
        ordered = sorted(contexts)
        for start in range(0, len(ordered), CONTEXT_CHUNK):
            chunk = ordered[start : start + CONTEXT_CHUNK]
            states: dict[str, dict[str, ReplicaState]] = {ctx: {} for ctx in chunk}
            ok: list[str] = []
            for name in [*answered, *(n for n in candidates if n not in answered)]:
                if len(ok) >= r:
                    break
                if name in failed:
                    continue
                try:
                    with self._timed("states"):
                        answer = await self._call(name, "rep.ids", {"contexts": chunk})
                    for ctx, state in _states(answer):
                        if ctx in states:
                            states[ctx][name] = state
                    ok.append(name)
                except _PEER_FAILURES as exc:
                    failed[name] = str(exc)
            if not quorum_answered(ok, r):
                raise BackupFailed(f"{where}: fewer than R={r} replicas answered rep.ids")
            plans: dict[str, tuple[PurgeMarker | None, dict[str, list[str]]]] = {}
            for ctx in chunk:
                merged = merge(states[ctx], prefer=self.service.name)
                plans[ctx] = (merged.marker, at_cut(merged, cut, since))
            here = {ctx: plan.get(self.service.name, []) for ctx, (_, plan) in plans.items()}
            with self._timed("local_reads"):
                rows = await trio.to_thread.run_sync(self._read_local, here)
            for ctx, (_marker, plan) in plans.items():
                for source, ids in sorted(plan.items()):
                    if source != self.service.name:
                        with self._timed("remote_fetches"):
                            fetched = await self._fetch(source, ctx, ids)
                        rows[ctx] = rows.get(ctx, []) + fetched

            with self._timed("spool"):
                await trio.to_thread.run_sync(_spool_chunk, spool, plans, rows)

    def _read_local(self, wanted: dict[str, list[str]]) -> dict[str, list[VersionRow]]:
        """The versions this node is the source of, read from its own store and checked
        (one worker-thread call per chunk of contexts, not one RPC per context)."""
        versions = self.store.versions
        out: dict[str, list[VersionRow]] = {}
        for ctx, ids in wanted.items():
            if not ids:
                continue
            name = ContextName.from_canonical(ctx)
            raws = []
            for vid in ids:
                raw = versions.version(name, vid)
                if raw is not None:  # None: purged or expired since rep.ids (purge wins)
                    raws.append(bytes(raw))
            out[ctx] = self._checked(self.service.name, ctx, raws, set(ids))
        return out

    def _checked(
        self, source: str, ctx: str, raws: list[bytes], wanted: set[str]
    ) -> list[VersionRow]:
        """``raws`` as rows, once each decodes to a wanted version of ``ctx`` signed by a
        trusted key (a replica's answer is checked like any other, nothing garbled is kept)."""
        reader = self.store.reader
        rows = []
        for raw in raws:
            env = Envelope.decode(raw)
            if env.context != ctx or env.version_id not in wanted:
                raise ValueError(f"{source} answered another version than asked for {ctx}")
            # signature and trust; a version this node verified before is not verified again
            reader.checked(env, hashlib.sha256(raw).digest())
            rows.append(VersionRow(ctx, env.version_id, raw))

        return rows

    async def _contexts(self, name: str, parts: list[int]) -> set[str]:
        segments: list[list[int]] = []
        for start in range(0, len(parts), 256):
            chunk = parts[start : start + 256]
            answer = await self._call(name, "rep.tree", {"partitions": chunk, "leaves": True})
            leaves = answer["leaves"]
            if len(leaves) != len(chunk):
                raise ValueError("rep.tree answered a different number of partitions")
            for partition, found in zip(chunk, leaves, strict=True):
                segments += [[partition, int(leaf)] for leaf, _hash in found]
        contexts: set[str] = set()
        for start in range(0, len(segments), MAX_ITEMS):
            body = {"segments": segments[start : start + MAX_ITEMS]}
            answer = await self._call(name, "rep.digests", body)
            contexts.update(str(ctx) for ctx, _digest in answer["digests"])
        return contexts

    async def _fetch(self, source: str, ctx: str, ids: list[str]) -> list[VersionRow]:
        rows: list[VersionRow] = []
        wanted = list(ids)
        while wanted:
            answer = await self._call(source, "rep.fetch", {"context": ctx, "ids": wanted})
            blobs = [bytes(b) for b in answer["envelopes"]]
            more = [str(v) for v in answer["more"]]
            rows += self._checked(source, ctx, blobs, set(wanted))
            if not blobs or not set(more) < set(wanted):
                break  # the rest was purged or expired since rep.ids (a purge wins)
            wanted = more
        return rows


_PEER_FAILURES = (PeerUnavailable, RemoteError, StorageError, NodeError, KeyError, TypeError,
                  ValueError)  # fmt: skip


def _vid_of(row: VersionRow) -> VersionId:
    return VersionId.parse(row.version_id)


def _spool_chunk(
    spool: ArchiveSpool,
    plans: dict[str, tuple[PurgeMarker | None, dict[str, list[str]]]],
    rows: dict[str, list[VersionRow]],
) -> None:
    """Spool one chunk of contexts: each one's purge marker, then its versions in order."""
    for ctx, (marker, _plan) in plans.items():
        if marker is not None:
            spool.add_purge(PurgeRow(ctx, marker))
        for row in sorted(rows.get(ctx, []), key=_vid_of):
            spool.add_version(row)


def _states(answer: Body) -> list[tuple[str, ReplicaState]]:
    """``rep.ids``' answer as replica states (a malformed answer raises ValueError)."""
    out = []
    for canonical, ids, marker, *rest in answer["states"]:
        parsed = None if marker is None else PurgeMarker.decode(bytes(marker))
        epochs = {str(vid): int(epoch) for vid, epoch in (rest[0] if rest else [])}
        out.append((str(canonical), ReplicaState(frozenset(str(v) for v in ids), parsed, epochs)))
    return out


def _recipient(text: str) -> x25519.Recipient:
    try:
        return x25519.Recipient.from_str(text)
    except pyrage.RecipientError:
        raise InvalidPayload(f"{text[:80]!r} is not an age X25519 recipient",
                             field="recipients") from None  # fmt: skip
