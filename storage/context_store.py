"""ContextStore: the one orchestrator of a node's storage (ARCHITECTURE.md §4).

Owns the write and read paths: address validation, reader roles, encryption, signing,
the version store, the decrypted-record cache and the full-text index. The embedded CLI
and the node daemon use this same class. Must not know about the network or the CLI.

Write path: validate -> encrypt once to readers+admin -> sign -> one synced LevelDB batch
(group commit) -> invalidate the cache -> add to the index (batched commits).
Read path: head row -> cache -> version row -> signature check -> role check -> decrypt.

Thread safety: every public method may be called from several threads at once (the
daemon runs them through ``trio.to_thread``); the version store serialises head updates
and LevelDB's group commit folds concurrent fsyncs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pyrage import x25519

from crypto.audit import AuditLog
from crypto.errors import AuditChainBroken, DecryptionError, KeyringError
from crypto.keyfiles import PassphraseSource
from crypto.keyring import Keyring
from crypto.roles import ADMIN_ROLE, Role, UnknownRole
from storage.address import LATEST, Address, ContextName, Temporal, parse
from storage.cache import RecordCache
from storage.datadir import DataDir, StorageConfig, load_keys_config, load_storage_config
from storage.envelope import Compression, Envelope, compress_payload
from storage.errors import (
    AlreadyInitialised,
    CorruptRecord,
    Forbidden,
    InvalidAddress,
    InvalidPayload,
    KeyringUnusable,
    NotFound,
    StorageError,
    UntrustedSigner,
)
from storage.index import FullTextIndex, IndexCorrupt, open_index, reset_index
from storage.index_sync import IndexSync, NotYetIndexable
from storage.key_age import rotation_warnings
from storage.kv import KV, GroupCommitStats, LevelDBKV
from storage.reader import VersionReader
from storage.record import ContextRecord
from storage.schema import AUDIT_PREFIX, FORMAT_VERSION, META_FORMAT, META_HLC, Head, PurgeMarker
from storage.version_store import HeadLookup, VersionStore
from storage.versions import HybridLogicalClock, VersionId, VersionInfo, select, sibling_groups
from storage.views import ContextInfo, HistoryEntry, SearchResult, StoredRef, VersionView

ClockMs = Callable[[], int]
T = TypeVar("T")


def _default_actor(address: str | Address, node_id: str) -> str:
    """``agent/role@node`` from an address (``-@node`` when it does not parse)."""
    try:
        addr = as_address(address)
    except StorageError:
        return f"-@{node_id}"
    return f"{addr.agent}/{addr.role}@{node_id}"


def as_address(address: str | Address) -> Address:
    """``address`` parsed, unless it already is (the node parses requests at its edge).

    Raises:
        AddressError: a string that does not parse.
    """
    return address if isinstance(address, Address) else parse(address)


def wall_clock_ms() -> int:
    """Milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class WriteRequest:
    """One write of a batch: an address, the record, and optional explicit readers.

    ``address`` is a string (embedded callers) or an ``Address`` already parsed (the node
    service parses each request once, at its edge); both are validated the same way.
    """

    address: str | Address
    record: ContextRecord
    readers: tuple[str, ...] | None = None
    actor: str | None = None


@dataclass(frozen=True)
class Prepared:
    """A validated, encrypted write waiting for its version id, parent and signature."""

    address: Address
    record: ContextRecord
    readers: tuple[str, ...]
    compression: Compression
    ciphertext: bytes
    actor: str

    @property
    def context(self) -> ContextName:
        """The context written (kept by the address: computed once)."""
        return self.address.context()


class ContextStore:
    """Store, retrieve, navigate, search, delete and purge contexts on one node."""

    def __init__(
        self,
        data_dir: DataDir,
        kv: KV,
        keyring: Keyring,
        index: FullTextIndex,
        config: StorageConfig,
        *,
        clock_ms: ClockMs,
    ) -> None:
        self.data_dir = data_dir
        self.kv = kv
        self.versions = VersionStore(kv)
        self.keyring = keyring
        self.config = config
        self._clock_ms = clock_ms
        self._lock = threading.Lock()
        self._trusted_keys: set[bytes] = set()
        last = kv.get(META_HLC)
        self._hlc = HybridLogicalClock(
            keyring.node_id, clock_ms, VersionId.parse(last.decode()) if last else None
        )
        self.cache: RecordCache[VersionView] = RecordCache(
            config.cache, sizeof=VersionView.approx_size
        )
        self.audit: AuditLog | None
        self.audit_error: AuditChainBroken | None = None
        try:  # the in-memory store of the simulation tier keeps no audit log
            self.audit = (
                AuditLog(kv.raw, clock_ms=clock_ms, prefix=AUDIT_PREFIX)
                if isinstance(kv, LevelDBKV)
                else None
            )
        except AuditChainBroken as exc:  # keep serving; `slurp audit verify` reports it
            self.audit, self.audit_error = None, exc
        self.reader = VersionReader(
            self.versions, keyring, self.cache, clock_ms=clock_ms, trusted=self._trusted_signer
        )
        self.index = IndexSync(
            index, data_dir.index, self._index_doc_source, kv=kv, clock_ms=clock_ms,
            refresh_interval_s=config.index.refresh_interval_s,
        )  # fmt: skip

    # -- lifecycle ----------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        root: Path,
        roles: Sequence[Role],
        *,
        backend: str = "tantivy",
        passphrase: str | None = None,
        role_identities: Mapping[str, x25519.Identity] | None = None,
    ) -> DataDir:
        """Create a data directory: layout, config, keyring, empty database.

        Raises:
            StorageError: it already holds a node, or a role is invalid.
        """
        data_dir = DataDir(root)
        if data_dir.exists():
            raise AlreadyInitialised(f"{root} already holds a slurp node", field="data_dir")
        data_dir.create_layout(backend=backend)
        try:
            Keyring.create(
                data_dir.keys, roles, passphrase=passphrase, role_identities=role_identities
            )
        except KeyringError as exc:
            raise InvalidPayload(str(exc), field="roles") from None
        kv = LevelDBKV(data_dir.db, create=True)
        try:
            kv.write([(META_FORMAT, str(FORMAT_VERSION).encode())], sync=True)
        finally:
            kv.close()
        return data_dir

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        clock_ms: ClockMs = wall_clock_ms,
        passphrase: PassphraseSource | None = None,
        kv: KV | None = None,
    ) -> ContextStore:
        """Open an initialised data directory (LevelDB first, so a busy dir fails fast).

        ``kv`` replaces LevelDB (the simulation tier passes a ``MemoryKV``).

        Raises:
            NotFound: no node was initialised at ``root``.
            DataDirInUse: another process holds it.
            StorageError: the database format is unknown, or the keyring is unusable.
        """
        data_dir = DataDir(root)
        if not data_dir.exists():
            raise NotFound(f"no slurp node at {root} (run `slurp init` first)", field="data_dir")
        config = load_storage_config(data_dir.config)
        if kv is None:
            kv = LevelDBKV(data_dir.db, create=False)
        elif kv.get(META_FORMAT) is None:
            kv.write([(META_FORMAT, str(FORMAT_VERSION).encode())])
        try:
            found = kv.get(META_FORMAT)
            if found != str(FORMAT_VERSION).encode():
                raise StorageError(
                    f"{data_dir.db} has storage format {found!r}; "
                    f"this slurp reads {FORMAT_VERSION}",
                    field="format",
                )
            keyring = Keyring.open(data_dir.keys, passphrase)
            keyring.configure_sealing(load_keys_config(data_dir.config).seal_policy())
            if keyring.protected:  # a wrong passphrase fails here (one scrypt), not mid-read;
                keyring.unlock(roles=())  # identities unseal lazily, on first use
            index, needs_rebuild = _open_or_reset_index(data_dir, config)
        except KeyringError as exc:
            kv.close()
            raise KeyringUnusable(str(exc), field="keys") from None
        except BaseException:
            kv.close()
            raise
        store = cls(data_dir, kv, keyring, index, config, clock_ms=clock_ms)
        store.sweep_expired()
        store.index.recover(store.versions, rebuild=needs_rebuild)
        return store

    def close(self) -> None:
        """Commit the index and close everything (idempotent)."""
        self.index.close()
        self.kv.close()

    def __enter__(self) -> ContextStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writes -------------------------------------------------------------------------

    def store(
        self,
        address: str | Address,
        record: ContextRecord,
        *,
        readers: Sequence[str] | None = None,
        actor: str | None = None,
    ) -> StoredRef:
        """Append a new version to the context ``address`` names.

        Args:
            address: a concrete address whose temporal segment is ``*^`` (a string, or an
                ``Address`` already parsed).
            record: the validated record.
            readers: roles that may read it; default: the address's role, every role of
                higher authority, and admin.
            actor: who writes (default ``agent/role@node`` from the address).

        Raises:
            InvalidAddress: a wildcard or a temporal segment other than ``*^``.
            InvalidPayload: an unknown role (in the address without ``readers``, or in them).
        """
        req = WriteRequest(address, record, None if readers is None else tuple(readers), actor)
        return self.store_batch([req])[0]

    def store_batch(self, requests: Sequence[WriteRequest]) -> list[StoredRef]:
        """Write many versions in one synced batch (all or none).

        Raises:
            InvalidAddress, InvalidPayload: for the first bad request (nothing is written).
        """
        try:
            prepared = [self.prepare(req) for req in requests]
            refs = self._store_batch(prepared)
        except StorageError as exc:
            self._audit_many(
                [(req.actor or "-", "store", str(req.address), exc.code) for req in requests]
            )
            raise
        self._audit_many(
            [
                (item.actor, "store", ref.address, "ok")
                for item, ref in zip(prepared, refs, strict=True)
            ]
        )
        return refs

    def _store_batch(self, prepared: Sequence[Prepared]) -> list[StoredRef]:

        def build(lookup: HeadLookup) -> tuple[list[Envelope], list[tuple[bytes, bytes]]]:
            def parent_of(ctx: ContextName) -> str | None:
                head = lookup(ctx)
                return head.latest if head else None

            envelopes = self.seal_prepared(prepared, parent_of)
            return envelopes, [(META_HLC, str(self._hlc.last).encode())]

        envelopes, heads = self.versions.append_built(build)
        refs = []
        for env, head, item in zip(envelopes, heads, prepared, strict=True):
            assert head is not None, "a fresh local version id is never known already"
            ctx = item.context
            self.cache.invalidate_context(ctx.key())
            self.index.add(ctx, env, item.record.secret_fields())
            address = ctx.address(Temporal("version", head.count)).canonical()
            refs.append(StoredRef(address, head.count, env.version_id))
        self.index.maybe_commit()
        return refs

    def seal_prepared(
        self, prepared: Sequence[Prepared], parent_of: Callable[[ContextName], str | None]
    ) -> list[Envelope]:
        """Give prepared writes version ids and parents, and sign them (nothing is stored).

        ``parent_of`` names the latest version of a context before this batch; versions of
        one context within the batch chain onto each other.
        """
        parents: dict[ContextName, str | None] = {}
        envelopes = []
        for item in prepared:
            ctx = item.context
            if ctx not in parents:
                parents[ctx] = parent_of(ctx)
            vid = self.next_id()
            record = item.record
            env = Envelope(
                context=ctx.canonical(),
                version_id=str(vid),
                parent=parents[ctx],
                kind="put",
                created_at_ms=vid.wall_ms,
                created_by=item.actor,
                readers=item.readers,
                tags=record.tags,
                technologies=record.technologies,
                influences=record.influences,
                influenced_by=record.influenced_by,
                expires_at_ms=None if record.ttl is None else vid.wall_ms + record.ttl * 1000,
                compression=item.compression,
                ciphertext=item.ciphertext,
            ).sealed(self.keyring.signer)
            parents[ctx] = env.version_id
            envelopes.append(env)
        return envelopes

    def seal_tombstone(self, ctx: ContextName, parent: str, actor: str) -> Envelope:
        """A signed delete marker for ``ctx`` after version ``parent`` (nothing is stored)."""
        vid = self.next_id()
        return Envelope(
            context=ctx.canonical(),
            version_id=str(vid),
            parent=parent,
            kind="tombstone",
            created_at_ms=vid.wall_ms,
            created_by=actor,
            readers=(),
            tags=(),
            technologies=(),
            influences=(),
            influenced_by=(),
            expires_at_ms=None,
            compression="none",
            ciphertext=b"",
        ).sealed(self.keyring.signer)

    def observe(self, version_id: str) -> None:
        """Move the clock past a version id seen from another node (HLC receive event)."""
        with self._lock:
            self._hlc.observe(VersionId.parse(version_id))

    def next_id(self) -> VersionId:
        """A fresh version id from this node's hybrid logical clock."""
        with self._lock:
            return self._hlc.next_id()

    def prepare(self, req: WriteRequest) -> Prepared:
        """Validate and encrypt outside every lock (encryption is the slow part).

        Raises:
            InvalidAddress: a wildcard or a temporal segment other than ``*^``.
            AddressError: a string address that does not parse.
            InvalidPayload: an unknown role.
        """
        addr = as_address(req.address)
        if addr.has_wildcard:
            raise InvalidAddress(
                "a write must not contain wildcards", field="address", input=str(req.address)
            )
        if addr.temporal != LATEST:
            raise InvalidAddress(
                "a write's temporal segment must be *^", field="temporal", input=str(req.address)
            )
        readers = self._readers(addr, req.readers)
        payload, compression = compress_payload(req.record.encode_secret())
        return Prepared(
            address=addr,
            record=req.record,
            readers=readers,
            compression=compression,
            ciphertext=self.keyring.seal(payload, readers),
            actor=req.actor or f"{addr.agent}/{addr.role}@{self.keyring.node_id}",
        )

    def _readers(self, addr: Address, named: tuple[str, ...] | None) -> tuple[str, ...]:
        roles = self.keyring.role_set
        try:
            if named:
                return roles.readers(named)
            return roles.default_readers(addr.role)
        except UnknownRole as exc:
            known = ", ".join(roles.names)
            hint = "" if named else "; name the readers with --role"
            raise InvalidPayload(
                f"role {exc.role!r} is not a known role (known: {known}){hint}", field="roles"
            ) from None

    def delete(self, address: str, *, actor: str | None = None) -> StoredRef:
        """Append a tombstone: the context then reads as not found; its history stays.

        Raises:
            NotFound: no such live context.
        """
        who = actor or _default_actor(address, self.keyring.node_id)
        return self._audited("delete", address, who, lambda: self._delete(address, who))

    def _delete(self, address: str, actor: str) -> StoredRef:
        addr = parse(address)
        if addr.has_wildcard:
            raise InvalidAddress("delete needs a concrete address", field="address", input=address)
        ctx = addr.context()

        def build(lookup: HeadLookup) -> tuple[list[Envelope], list[tuple[bytes, bytes]]]:
            head = lookup(ctx)
            if head is None or not head.live:
                raise NotFound(f"no such context: {ctx.canonical()}", input=address)
            env = self.seal_tombstone(ctx, head.latest, actor)
            return [env], [(META_HLC, str(self._hlc.last).encode())]

        (env,), (head,) = self.versions.append_built(build)
        assert head is not None
        self.cache.invalidate_context(ctx.key())
        self.index.remove(ctx)
        self.index.maybe_commit()
        address_n = ctx.address(Temporal("version", head.count)).canonical()
        return StoredRef(address_n, head.count, env.version_id)

    def purge(self, address: str, *, actor: str | None = None) -> int:
        """Remove every version of a context and leave a purge marker (admin only).

        Returns:
            The number of versions removed.

        Raises:
            Forbidden: this keyring does not hold the admin identity.
            NotFound: the context has no versions.
        """
        who = actor or f"{ADMIN_ROLE}@{self.keyring.node_id}"
        return self._audited("purge", address, who, lambda: self._purge(address, who))

    def _purge(self, address: str, actor: str) -> int:
        if not self.keyring.has_identity(ADMIN_ROLE):
            raise Forbidden("purge needs the admin identity, which this node does not hold")
        addr = parse(address)
        if addr.has_wildcard:
            raise InvalidAddress("purge needs a concrete address", field="address", input=address)
        ctx = addr.context()
        head = self.versions.head(ctx)
        if head is None:
            raise NotFound(f"no such context: {ctx.canonical()}", input=address)
        with self._lock:
            upto = str(max(self._hlc.next_id(), VersionId.parse(head.latest)))
        removed = self.versions.purge(ctx, PurgeMarker(upto, self._clock_ms(), actor))
        self.cache.invalidate_context(ctx.key())
        self.index.remove(ctx)
        self.index.commit()
        return removed

    # -- reads --------------------------------------------------------------------------

    def retrieve(self, address: str, *, as_role: str | None = None) -> VersionView:
        """The version an address selects, decrypted for ``as_role`` (audited).

        With wildcards, the most recently updated matching context is used.
        ``as_role=None`` reads as the first role this keyring holds that may read it.

        Raises:
            NotFound, TemporalOutOfRange, Forbidden, CorruptRecord, AddressError.
        """
        try:
            view = self._retrieve(address, as_role)
        except StorageError as exc:
            self._audit(f"{as_role or '-'}@{self.keyring.node_id}", "retrieve", address, exc.code)
            raise
        self._audit(f"{view.read_as}@{self.keyring.node_id}", "retrieve", view.address, "ok")
        return view

    def _retrieve(self, address: str, as_role: str | None) -> VersionView:
        """The version an address selects, decrypted for ``as_role``.

        With wildcards, the most recently updated matching context is used.
        ``as_role=None`` reads as the first role this keyring holds that may read it.

        Raises:
            NotFound, TemporalOutOfRange, Forbidden, CorruptRecord, AddressError.
        """
        addr = parse(address)
        ctx = self.reader.resolve(addr)
        head = self.versions.head(ctx)
        if head is None:
            raise NotFound(f"no such context: {ctx.canonical()}", input=address)
        if addr.temporal == LATEST:
            if not head.live:
                raise NotFound(f"{ctx.canonical()} was deleted", input=address)
            return self.reader.read(ctx, head.latest, head.count, as_role, head=head)
        infos, _ = self.reader.infos(ctx, keep_corrupt=True)  # a corrupt version keeps its rank
        index = select(infos, addr.temporal, where=address)
        if infos[index].tombstone:
            raise NotFound(
                f"version {index + 1} of {ctx.canonical()} is a delete marker", input=address
            )
        return self.reader.read(ctx, str(infos[index].version_id), index + 1, as_role)

    def retrieve_encrypted(self, address: str) -> tuple[StoredRef, bytes]:
        """The version ``address`` selects as a standalone age file (audited).

        ``age -d -i <reader or admin identity>`` opens it and yields the stored secret
        payload (zstd-compressed when the header says so). A record written before
        sealing is returned as stored; a sealed one is opened with an identity held here
        and encrypted afresh to the current recipients of its readers plus admin.

        Raises:
            NotFound: no such version, or it is a delete marker.
            KeyringUnusable: this node holds no identity that may open it.
            CorruptRecord: the stored ciphertext is damaged.
        """
        who = f"-@{self.keyring.node_id}"
        return self._audited("retrieve.encrypted", address, who, lambda: self._ciphertext(address))

    def _ciphertext(self, address: str) -> tuple[StoredRef, bytes]:
        addr = parse(address)
        ctx = self.reader.resolve(addr)
        infos, _ = self.reader.infos(ctx, keep_corrupt=True)
        if not infos:
            raise NotFound(f"no such context: {ctx.canonical()}", input=address)
        index = select(infos, addr.temporal, where=address)
        vid = str(infos[index].version_id)
        env = self.reader.envelope(ctx, vid)
        if env.tombstone:
            raise NotFound(
                f"version {index + 1} of {ctx.canonical()} is a delete marker", input=address
            )
        ref = StoredRef(ctx.address(Temporal("version", index + 1)).canonical(), index + 1, vid)
        try:
            exported = self.keyring.export_age(env.ciphertext, env.readers, env.binding())
        except KeyringError as exc:
            raise KeyringUnusable(str(exc), field="keys") from None
        except DecryptionError:
            raise CorruptRecord(
                f"version {vid} of {ctx.canonical()} does not decrypt", field="ciphertext"
            ) from None
        return ref, exported

    def retrieve_batch(
        self, addresses: Sequence[str], *, as_role: str | None = None
    ) -> list[VersionView | StorageError]:
        """Retrieve many addresses; each failure is returned in its slot, not raised."""
        out: list[VersionView | StorageError] = []
        for address in addresses:
            try:
                out.append(self.retrieve(address, as_role=as_role))
            except StorageError as exc:
                out.append(exc)
        return out

    def history(self, address: str) -> list[HistoryEntry]:
        """Every version of the context, oldest first (nothing is decrypted)."""
        addr = parse(address)
        ctx = self.reader.resolve(addr)
        infos, envs = self.reader.infos(ctx, keep_corrupt=True)
        if not infos:
            raise NotFound(f"no such context: {ctx.canonical()}", input=address)
        return history_of(ctx, infos, envs)

    def list_contexts(self, pattern: str, *, include_deleted: bool = False) -> list[ContextInfo]:
        """Every context matching ``pattern`` (wildcards; its path matches as a prefix)."""
        pat = parse(pattern).context()
        out = []
        for ctx, head in self.versions.heads(pat):
            if not pat.matches(ctx, path_prefix=True) or not (head.live or include_deleted):
                continue
            out.append(
                ContextInfo(
                    context=ctx.canonical(),
                    address=ctx.address(Temporal("version", head.count)).canonical(),
                    versions=head.count,
                    latest_version_id=head.latest,
                    updated_at_ms=head.updated_ms,
                    live=head.live,
                )
            )
        return out

    def search(
        self,
        text: str,
        *,
        project: str | None = None,
        task: str | None = None,
        tags: Sequence[str] = (),
        as_role: str | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        limit: int = 20,
    ) -> list[SearchResult]:
        """Ranked full-text search over the latest version of every readable context.

        Raises:
            Forbidden: ``as_role`` is not a role of this node.
            InvalidPayload: a query the index cannot parse, or a bad limit.
        """
        if as_role is not None and as_role not in self.keyring.role_set:
            raise Forbidden(f"unknown role {as_role!r}", field="role")
        if not 1 <= limit <= 1000:
            raise InvalidPayload("limit must be between 1 and 1000", field="limit")
        hits = self.index.search(
            text,
            project=project,
            task=task,
            tags=tuple(tags),
            as_role=as_role,
            since_ms=since_ms,
            until_ms=until_ms,
            limit=limit,
        )
        out = []
        for hit in hits:
            ctx = parse(hit.context).context()
            head = self.versions.head(ctx)
            if head is None or not head.live:
                continue  # deleted since it was indexed; the index catches up
            rank = (
                head.count
                if head.latest == hit.version_id
                else self.reader.rank(ctx, hit.version_id)
            )
            if rank is None:
                continue
            out.append(
                SearchResult(
                    ctx.address(Temporal("version", rank)).canonical(),
                    ctx.canonical(),
                    rank,
                    hit.version_id,
                    hit.score,
                )
            )
        return out

    # -- maintenance --------------------------------------------------------------------

    def sweep_expired(self) -> int:
        """Physically remove versions whose TTL ran out; returns how many."""
        due = self.versions.due_for_expiry(self._clock_ms())
        by_ctx: dict[ContextName, list[str]] = {}
        for ctx, vid in due:
            by_ctx.setdefault(ctx, []).append(vid)
        removed = 0
        for ctx, vids in by_ctx.items():
            removed += self.versions.remove_versions(ctx, vids)
            self.cache.invalidate_context(ctx.key())
            self.index.refresh_context(ctx, self.versions.head(ctx))
        return removed

    def compact(self) -> None:
        """Sweep expired versions, then compact LevelDB."""
        self.sweep_expired()
        self.kv.compact()

    def rebuild_index(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Drop the full-text index and rebuild it from LevelDB; returns documents indexed."""
        return self.index.rebuild(self.versions, progress)

    def stats(self) -> dict[str, Any]:
        """Counters for ``slurp stats``."""
        contexts = versions = deleted = 0
        for _, head in self.versions.heads(ContextName("any", "any", "any", "any", "")):
            contexts += 1
            versions += head.count
            deleted += 0 if head.live else 1
        db_bytes = sum(p.stat().st_size for p in self.data_dir.db.iterdir() if p.is_file())
        group = self.group_stats
        return {
            "data_dir": str(self.data_dir.root),
            "node_id": self.keyring.node_id,
            "contexts": contexts,
            "deleted_contexts": deleted,
            "versions": versions,
            "purged_contexts": self.versions.count_purged(),
            "db_bytes": db_bytes,
            "group_commit": {
                "writes": group.writes,
                "syncs": group.syncs,
                "largest_group": group.largest_group,
            },
            "cache": self.cache.stats().to_dict(),
            "index": self.index.stats(),
            "roles": [
                {
                    "name": rk.role.name,
                    "authority": rk.role.authority.label,
                    "recipient": rk.recipient,
                    "held": self.keyring.has_identity(rk.role.name),
                }
                for rk in self.keyring.role_keys()
            ],
            "audit": "ok" if self.audit is not None else f"broken: {self.audit_error}",
            "warnings": rotation_warnings(
                self.keyring,
                load_keys_config(self.data_dir.config).max_key_age_days,
                datetime.fromtimestamp(self._clock_ms() / 1000, tz=UTC),
            ),
        }

    # -- internals ----------------------------------------------------------------------

    @property
    def group_stats(self) -> GroupCommitStats:
        """Synced writes and the fsyncs that served them, since open (LevelDB only)."""
        return self.kv.group_stats if isinstance(self.kv, LevelDBKV) else GroupCommitStats()

    def clock_ms(self) -> int:
        """The store's clock (milliseconds since the epoch)."""
        return self._clock_ms()

    def audit_event(
        self, op: str, address: str | None, outcome: str, actor: str | None = None
    ) -> None:
        """Record an operation done outside the data path (key operations)."""
        self._audit(actor or f"{ADMIN_ROLE}@{self.keyring.node_id}", op, address, outcome)

    def _audit(self, actor: str, op: str, address: str | None, outcome: str) -> None:
        """Append to the audit log (after the operation; see docs/storage.md, Audit log)."""
        if self.audit is not None:
            self.audit.append(actor, op, address, outcome)

    def _audit_many(self, entries: list[tuple[str, str, str | None, str]]) -> None:
        """``_audit`` of each entry, in one write (a batch's records)."""
        if self.audit is not None:
            self.audit.append_many(entries)

    def _audited(self, op: str, address: str, actor: str, action: Callable[[], T]) -> T:
        try:
            result = action()
        except StorageError as exc:
            self._audit(actor, op, address, exc.code)
            raise
        self._audit(actor, op, address, "ok")
        return result

    def trust_signer(self, public_key: bytes) -> None:
        """Trust versions signed by ``public_key`` (a node key certified by the cluster CA)."""
        if bytes(public_key) not in self._trusted_keys:
            self._trusted_keys.add(bytes(public_key))
            self.index.retry_deferred()  # what waited for this key can be indexed now

    def _trusted_signer(self, public_key: bytes) -> bool:
        """This node's own key, plus every key the cluster told it to trust."""
        return public_key == self.keyring.signer.public_key or public_key in self._trusted_keys

    def _index_doc_source(
        self, ctx: ContextName, head: Head
    ) -> tuple[Envelope, dict[str, Any]] | None:
        """The latest live version of a context, decrypted for indexing (None if unreadable).

        Raises:
            NotYetIndexable: its signer is not trusted (yet).
        """
        if not head.live:
            return None
        try:  # verified once (storage.reader's digest set), decrypted at most once (cache)
            return self.reader.read_for_index(ctx, head)
        except UntrustedSigner:  # its signer may be trusted later: keep it queued
            raise NotYetIndexable(ctx.canonical()) from None
        except StorageError:
            return None


def _open_or_reset_index(data_dir: DataDir, config: StorageConfig) -> tuple[FullTextIndex, bool]:
    """Open the index; a missing or corrupt one is reset and flagged for rebuild."""
    missing = not data_dir.index.exists() or not any(data_dir.index.iterdir())
    try:
        return open_index(data_dir.index, config.index), missing
    except IndexCorrupt:
        reset_index(data_dir.index)
        return open_index(data_dir.index, config.index), True


def history_of(
    ctx: ContextName, infos: Sequence[VersionInfo], envs: Sequence[Envelope | None]
) -> list[HistoryEntry]:
    """History entries (oldest first) from navigation data; a None envelope is corrupt."""
    siblings = sibling_groups([info for info, env in zip(infos, envs, strict=True) if env])
    out = []
    for rank, (info, env) in enumerate(zip(infos, envs, strict=True), start=1):
        out.append(
            HistoryEntry(
                address=ctx.address(Temporal("version", rank)).canonical(),
                version=rank,
                version_id=str(info.version_id),
                parent=None if info.parent is None else str(info.parent),
                kind="corrupt" if env is None else env.kind,
                created_at_ms=info.created_at_ms,
                created_by="" if env is None else env.created_by,
                readers=() if env is None else env.readers,
                tags=() if env is None else env.tags,
                siblings=siblings.get(info.version_id, 0),
            )
        )
    return out
