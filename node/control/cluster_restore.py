"""Restore into a running cluster, on the leader (issue 11, "Restore into a running
cluster": ``slurp --profile P restore FILE...``; a trio shell).

Owns: the client methods ``restore.upload`` and ``restore.apply`` (admin role; a follower
forwards them to the leader through ``admin.forward``, ``custody_plan.LEADER_OPS``), the
uploaded files under ``DATA_DIR/restore/`` (at most ``[backup] restore_max_bytes`` of
them), opening them with the admin identity the leader holds, and the merge: purge markers
through ``rep.purge``, then every version to its owners through ``rep.store``, each
context with W durable acknowledgements.
Must not know: the backup format (``storage.backup`` verifies, ``storage.backup_io``
opens), the CLI, how replicas store (they check every signature on entry, as for any
write).

Order, and why it is safe while writes continue:

1. ``restore.upload {upload_id?, offset, data}`` appends a chunk (<= 4 MiB) to an upload
   file; a chunk sent again (same offset) is accepted once; past the limit: refused, the
   file kept as it was.
2. The first ``restore.apply {uploads, cursor}`` starts verifying in a thread: every file
   is decrypted and every member hash, signature and chain link checked
   (``storage.backup.read``, ``check_chain``), and every signer must be a key this cluster
   trusts (its members' signing keys). Until that is done it answers ``phase:
   "verifying"``; a failure answers the error, naming the file and member. Nothing is
   written before the whole chain verified.
3. Each later call merges a bounded step (``STEP_VERSIONS`` versions, or
   ``STEP_CONTEXTS`` contexts) from ``cursor`` and answers the next cursor with the step's
   counts; the client sums them. Purge markers go first: a marker is sent only when no
   live owner holds one covering as much (the larger marker wins; a replica keeps versions
   newer than a marker, ``VersionStore.purge``). Versions go next; a replica refuses one a
   marker covers (counted ``purged``), skips one it holds (``already_held``) and stores
   the rest. Version sets are grow-only, so a step run twice (a retried call, a second
   restore, a new leader) changes nothing.

Invariants: nothing is written before every file verified; only versions signed by a
cluster member's key are sent; a step reports done only after W owners of each of its
contexts acknowledged durably; the uploads are deleted when the merge is done.
Not durable across leaders or restarts: a new leader holds no uploads (a restarted node
deletes what it kept), and the client starts again (idempotent).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from crypto.roles import ADMIN_ROLE
from node.cluster import answers
from node.cluster.replication import batches_by_bytes
from node.cluster.service import NodeService
from node.control.custody import AdminCustody
from node.rpc.transport import Peer
from node.rpc.wire import MAX_BATCH_BYTES
from storage.address import ContextName
from storage.backup import Backup, check_chain, read
from storage.backup_io import Opener
from storage.errors import Forbidden, InvalidPayload, NotFound, StorageError, Unavailable
from storage.restore import newest_markers
from storage.schema import PurgeMarker
from storage.versions import VersionId

log = logging.getLogger(__name__)

Body = dict[str, Any]
RESTORE_DIR = "restore"
UPLOAD_SUFFIX = ".upload"
STEP_VERSIONS = 500  # versions merged by one restore.apply call (well inside a call's 5 s)
STEP_CONTEXTS = 100  # contexts (or purge markers) merged by one call
CONCURRENT_CONTEXTS = 16  # contexts of a step replicated at once


@dataclass
class Tally:
    """What one step did (``restore.apply``'s counts)."""

    versions_sent: int = 0  # stored by at least one owner that lacked it
    already_held: int = 0  # every acknowledging owner held it already
    purged: int = 0  # refused: a purge marker in the cluster covers it
    purges_applied: int = 0  # the backup's marker covered more than the cluster's
    purges_held: int = 0  # the cluster's marker covered as much already

    def to_wire(self) -> Body:
        return dict(self.__dict__)


@dataclass
class _Plan:
    """A verified chain, as units of work: purge markers first, then versions by context."""

    uploads: tuple[str, ...]
    purges: list[tuple[ContextName, PurgeMarker]]
    versions: list[tuple[ContextName, list[bytes]]]
    total_versions: int
    cut: str | None

    @property
    def units(self) -> int:
        return len(self.purges) + len(self.versions)


@dataclass
class _Job:
    """The uploads being verified or merged (one restore at a time per leader)."""

    uploads: tuple[str, ...]
    done: trio.Event = field(default_factory=trio.Event)
    plan: _Plan | None = None
    error: StorageError | None = None


class ClusterRestore:
    """Registers ``restore.upload``/``restore.apply`` on one node; answers them as leader."""

    def __init__(self, service: NodeService, custody: AdminCustody, *, max_bytes: int) -> None:
        self.service = service
        self.custody = custody
        self.max_bytes = max_bytes
        self.root = service.store.data_dir.root / RESTORE_DIR
        self._job: _Job | None = None
        # the uploads of the last finished merge and its answer: a call repeated because
        # its answer was lost is answered "done" again (nothing more to do)
        self._finished: tuple[tuple[str, ...], Body] | None = None
        # uploads live as long as this process: a restart drops what an earlier run left
        for stale in self.root.glob(f"*{UPLOAD_SUFFIX}") if self.root.is_dir() else ():
            stale.unlink(missing_ok=True)
        service.extra_client_methods["restore.upload"] = self._upload
        service.extra_client_methods["restore.apply"] = self._apply

    # -- upload -----------------------------------------------------------------------------

    async def _upload(self, peer: Peer, args: Body) -> Body:
        """``restore.upload {upload_id?, offset, data}`` -> ``{upload_id, size}``."""
        _admin_only(peer, "restore.upload")
        self.custody.require_leader_term()
        upload: str | None = args["upload_id"]
        data: bytes = args["data"]
        offset: int = args["offset"]
        if upload is None:
            if offset != 0:
                raise InvalidPayload("a new upload starts at offset 0", field="offset")
            upload = secrets.token_hex(16)
        path = self._path(upload)

        def append() -> int:
            if args["upload_id"] is not None and not path.exists():
                raise NotFound(
                    f"no upload {upload} on {self.service.name} (uploads are dropped when "
                    "the leader changes or the restore finishes): start the restore again",
                    field="upload_id",
                )
            size = path.stat().st_size if path.exists() else 0
            if offset != size:
                if offset + len(data) == size:
                    return size  # the same chunk sent again (a retried call)
                raise InvalidPayload(
                    f"offset {offset}: upload {upload} holds {size} bytes; send from there",
                    field="offset",
                )
            used = sum(p.stat().st_size for p in self.root.glob(f"*{UPLOAD_SUFFIX}"))
            if used + len(data) > self.max_bytes:
                raise InvalidPayload(
                    f"the upload would pass [backup] restore_max_bytes = {self.max_bytes} "
                    f"bytes on the leader {self.service.name} ({used} held): raise the "
                    "limit, or restore fewer files at once",
                    field="data",
                )
            self.root.mkdir(mode=0o700, exist_ok=True)
            with path.open("ab") as handle:
                handle.write(data)
            return size + len(data)

        size = await trio.to_thread.run_sync(append)
        return {"upload_id": upload, "size": size}

    def _path(self, upload: str) -> Path:
        return self.root / f"{upload}{UPLOAD_SUFFIX}"

    # -- apply ------------------------------------------------------------------------------

    async def _apply(self, peer: Peer, args: Body) -> Body:
        """``restore.apply {uploads, cursor}`` -> ``{phase, cursor, units, done,
        total_versions, cut, counts}`` (``phase``: "verifying" or "merging")."""
        _admin_only(peer, "restore.apply")
        term = self.custody.require_leader_term()
        uploads = tuple(args["uploads"])
        finished = self._finished
        if finished is not None and finished[0] == uploads:  # the last answer was lost
            return {**finished[1], "counts": Tally().to_wire()}
        job = self._job
        if job is None or job.uploads != uploads:
            job = self._start(uploads)
        if not job.done.is_set():
            with trio.move_on_after(1.0):
                await job.done.wait()
        if not job.done.is_set():
            return {"phase": "verifying", "cursor": args["cursor"], "done": False}
        if job.error is not None:
            self._job = None
            raise job.error
        assert job.plan is not None
        plan = job.plan
        cursor = min(args["cursor"], plan.units)
        tally = Tally()
        cursor = await self._step(plan, cursor, term, tally)
        done = cursor >= plan.units
        answer: Body = {
            "phase": "merging",
            "cursor": cursor,
            "units": plan.units,
            "done": done,
            "total_versions": plan.total_versions,
            "cut": plan.cut,
        }
        if done:
            await self._finish(plan)
            self._finished = (uploads, answer)
        return {**answer, "counts": tally.to_wire()}

    def _start(self, uploads: tuple[str, ...]) -> _Job:
        job = _Job(uploads)
        self._job = job
        nursery = self.service.fanout.nursery
        if nursery is None:
            raise Unavailable("the node is starting; retry")

        async def verify() -> None:
            try:
                job.plan = await trio.to_thread.run_sync(self._load, uploads)
            except StorageError as exc:
                job.error = exc
            except Exception:  # our bug: logged, answered as such, never stops the node
                log.exception("restore: verifying %s failed", uploads)
                job.error = StorageError("verifying the uploaded backup failed (logged)")
            finally:
                job.done.set()

        nursery.start_soon(verify)
        return job

    def _load(self, uploads: Sequence[str]) -> _Plan:
        """Decrypt and verify every upload with the admin identity (a thread)."""
        store = self.service.store
        opener = Opener(keyring=store.keyring)
        backups: list[Backup] = []
        for number, upload in enumerate(uploads, start=1):
            path = self._path(upload)
            name = f"file {number}"
            if not path.exists():
                raise NotFound(
                    f"{name}: no upload {upload} on {self.service.name}; start the restore again",
                    field="uploads",
                )
            try:
                backups.append(read(opener.decrypt(path), trusted=store.reader.trusted))
            except StorageError as exc:
                message = exc.message.replace(str(path), name)
                if "untrusted key" in message:
                    message += (
                        " (no member of this cluster, nor any of its trusted signers, holds "
                        "that signing key: a backup of another cluster is restored with "
                        "`slurp cluster up --restore`, or moved with export/import)"
                    )
                raise type(exc)(f"{name}: {message}", field=exc.field) from None
        check_chain([(f"file {i}", b.manifest) for i, b in enumerate(backups, 1)], None)
        markers = newest_markers(backups)
        by_context: dict[str, dict[str, bytes]] = {}
        for backup in backups:
            for version in backup.contents.versions:
                by_context.setdefault(version.context, {})[version.version_id] = version.envelope
        return _Plan(
            uploads=tuple(uploads),
            purges=[(ContextName.from_canonical(c), m) for c, m in sorted(markers.items())],
            versions=[
                (ContextName.from_canonical(c), [rows[v] for v in sorted(rows)])
                for c, rows in sorted(by_context.items())
            ],
            total_versions=sum(len(rows) for rows in by_context.values()),
            cut=backups[-1].manifest.cut,
        )

    async def _step(self, plan: _Plan, cursor: int, term: int, tally: Tally) -> int:
        """Merge the units from ``cursor`` (bounded); the next cursor."""
        purges: list[tuple[ContextName, PurgeMarker]] = []
        contexts: list[tuple[ContextName, list[bytes]]] = []
        budget = STEP_VERSIONS
        while cursor < plan.units and len(purges) + len(contexts) < STEP_CONTEXTS:
            if cursor < len(plan.purges):
                purges.append(plan.purges[cursor])
            else:
                unit = plan.versions[cursor - len(plan.purges)]
                if contexts and len(unit[1]) > budget:
                    break
                contexts.append(unit)
                budget -= len(unit[1])
            cursor += 1
        limiter = trio.CapacityLimiter(CONCURRENT_CONTEXTS)
        async with trio.open_nursery() as nursery:  # markers first: they win over versions
            for ctx, marker in purges:
                nursery.start_soon(self._limited, limiter, self._purge, ctx, marker, term, tally)
        async with trio.open_nursery() as nursery:
            for ctx, blobs in contexts:
                nursery.start_soon(self._limited, limiter, self._store, ctx, blobs, tally)
        return cursor

    @staticmethod
    async def _limited(limiter: trio.CapacityLimiter, fn: Any, *args: Any) -> None:
        async with limiter:
            await fn(*args)

    async def _purge(self, ctx: ContextName, marker: PurgeMarker, term: int, tally: Tally) -> None:
        """Send the backup's marker to the owners, unless the cluster's covers as much."""
        svc = self.service
        _, held = await svc._latest(ctx)
        if held is not None and VersionId.parse(held) >= VersionId.parse(marker.upto):
            tally.purges_held += 1
            return
        placement = svc._placement(ctx)
        tracker = svc._tracker(placement, svc.config.quorum.w, "purge")
        body: Body = {"context": ctx.canonical(), "marker": marker.encode(), "term": term}

        async def one(node: str) -> None:
            answers.parse_purge(await svc.fanout.on(
                node, "rep.purge", body, lambda: svc.local.purge(ctx, marker, term)
            ))  # fmt: skip

        await svc._quorum(placement, tracker, one, op="purge")
        svc.store.observe(marker.upto)
        tally.purges_applied += 1

    async def _store(self, ctx: ContextName, blobs: list[bytes], tally: Tally) -> None:
        """Store ``blobs`` (one context's versions) on its owners; W must acknowledge."""
        svc = self.service
        placement = svc._placement(ctx)
        tracker = svc._tracker(placement, svc.config.quorum.w, "restore")
        flags: dict[str, list[bool | None]] = {}

        async def one(node: str) -> None:
            got: list[bool | None] = []
            for batch in batches_by_bytes(blobs, MAX_BATCH_BYTES):
                answer = answers.parse_store(await svc.store_on(node, batch), len(batch))
                if any(flag is None for flag in answer.stored) and not answer.purged:
                    raise Unavailable(
                        f"{node} refused a version of {ctx.canonical()} (bad or untrusted "
                        "signature)"
                    )
                got.extend(answer.stored)
            flags[node] = got

        await svc._quorum(placement, tracker, one, op="restore")
        acked = [flags[node] for node in tracker.ok if node in flags]
        for number in range(len(blobs)):
            column = [found[number] for found in acked]
            if any(flag is True for flag in column):
                tally.versions_sent += 1
            elif column and all(flag is None for flag in column):
                tally.purged += 1
            else:
                tally.already_held += 1

    async def _finish(self, plan: _Plan) -> None:
        """The merge is done: observe the cut, drop the uploads, audit."""
        store = self.service.store
        if plan.cut is not None:
            store.observe(plan.cut)  # this cluster's next writes sort after the backup's

        def drop() -> None:
            for upload in plan.uploads:
                self._path(upload).unlink(missing_ok=True)
            store.audit_event("backup.restore", None, "ok")

        await trio.to_thread.run_sync(drop)
        if self._job is not None and self._job.uploads == plan.uploads:
            self._job = None


def _admin_only(peer: Peer, method: str) -> None:
    if peer.kind == "client" and ADMIN_ROLE not in peer.roles:
        raise Forbidden(f"{method} needs a client certificate with the admin role")
