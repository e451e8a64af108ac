"""The version store: grow-only version sets per context, heads, TTL index, purge markers.

Owns: the meaning of the rows in ``storage.schema`` and keeping them consistent. A batch
of versions, their head updates and TTL rows is one atomic, synced KV write (group commit
folds concurrent batches into one fsync). Works over any ``storage.kv.KV``.
Must not know about keys, plaintext, the cache or the index.

Invariants:
- versions are never overwritten: appending a version id that exists is a no-op (merge by
  union, ARCHITECTURE.md §3). The one exception is ``rewrite``, used by key rotation
  (``storage.rotation``): same id, same clear header, new ciphertext and signature;
- a head row always describes the version rows committed with it (latest id, count, whether
  the latest is live);
- versions covered by a purge marker are refused forever;
- every committed change to a context's set of version ids or to its purge marker is
  reported, once, to each observer (``add_observer``) right after its batch is durable
  (anti-entropy keeps its hash tree by these deltas), with the seal epochs of the versions
  added or removed; ``rewrite`` keeps ids and reports each re-seal it wrote (old and new
  seal epoch), since anti-entropy's digests cover seal epochs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from storage.address import ContextName
from storage.envelope import Envelope, seal_epoch_of
from storage.errors import CorruptRecord, Internal
from storage.kv import KV
from storage.schema import (
    HEAD_PREFIX,
    PURGE_PREFIX,
    SEP,
    TTL_PREFIX,
    VERSION_PREFIX,
    Head,
    PurgeMarker,
    head_key,
    purge_key,
    split_ttl_key,
    ttl_key,
    version_key,
    versions_prefix,
)
from storage.versions import VersionId


@dataclass(frozen=True)
class SetChange:
    """One committed change to a context's version ids or purge marker (for observers).

    ``epochs``: the seal epochs of the versions added or removed, where not 0;
    ``resealed``: (version id, old seal epoch, new seal epoch) of each copy rewritten.
    """

    ctx: bytes
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    old_upto: str | None = None
    new_upto: str | None = None
    epochs: Mapping[str, int] = field(default_factory=dict)
    resealed: tuple[tuple[str, int, int], ...] = ()


ChangeObserver = Callable[[SetChange], None]
HeadLookup = Callable[[ContextName], Head | None]
Builder = Callable[[HeadLookup], tuple[Sequence[Envelope], Sequence[tuple[bytes, bytes]]]]


@dataclass(frozen=True)
class StoredRow:
    """One version row as read: its id (from the key) and its raw envelope bytes."""

    version_id: str
    data: bytes


class VersionStore:
    """Versions, heads, TTL rows and purge markers over a KV store."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv
        self._lock = threading.Lock()
        # heads computed for batches that are queued but not yet committed
        self._pending_heads: dict[bytes, Head] = {}
        self._pending_versions: set[bytes] = set()
        self._observers: list[ChangeObserver] = []

    def add_observer(self, observer: ChangeObserver) -> None:
        """Report every later committed change to ``observer`` (called in the writer's
        thread, after the write is durable; it must be quick and thread-safe)."""
        self._observers.append(observer)

    def _report(self, changes: Sequence[SetChange]) -> None:
        for observer in self._observers:
            for change in changes:
                observer(change)

    # -- writes --------------------------------------------------------------------------

    def append(
        self, envelopes: Sequence[Envelope], *, meta: Sequence[tuple[bytes, bytes]] = ()
    ) -> list[bool]:
        """Durably add versions (one atomic synced batch); True for each one newly stored.

        A version already present, or covered by a purge marker, is skipped (False).
        ``meta`` rows (e.g. the clock) are written in the same batch.
        """
        _, heads = self.append_built(lambda _lookup: (envelopes, meta))
        return [head is not None for head in heads]

    def append_built(self, build: Builder) -> tuple[Sequence[Envelope], list[Head | None]]:
        """Build versions under the store lock, then add them durably (one synced batch).

        ``build`` gets a head lookup that sees batches still being committed by other
        threads, so a local writer always names the true latest version as its parent and
        learns its exact rank. It returns the envelopes and extra ``meta`` rows.

        Returns:
            The envelopes, and for each the context's head right after it was added (its
            ``count`` is the version's rank for a local write), or None when skipped.
        """
        results: list[Head | None] = []
        with self._lock:

            def lookup(context: ContextName) -> Head | None:
                return self._head_for_update(context.key())

            envelopes, meta = build(lookup)
            puts: list[tuple[bytes, bytes]] = list(meta)
            heads: dict[bytes, Head | None] = {}
            added: dict[bytes, list[str]] = {}
            epochs: dict[bytes, dict[str, int]] = {}
            for env in envelopes:
                ctx = ContextName.from_canonical(env.context).key()
                vkey = version_key(ctx, env.version_id)
                known = vkey in self._pending_versions or self.kv.get(vkey) is not None
                if known or self._purged(ctx, env.version_id):
                    results.append(None)
                    continue
                if ctx not in heads:
                    heads[ctx] = self._head_for_update(ctx)
                head = _advance(heads[ctx], env)
                heads[ctx] = head
                results.append(head)
                puts.append((vkey, env.encode()))
                added.setdefault(ctx, []).append(env.version_id)
                if env.seal_epoch:
                    epochs.setdefault(ctx, {})[env.version_id] = env.seal_epoch
                self._pending_versions.add(vkey)
                if env.expires_at_ms is not None:
                    puts.append((ttl_key(env.expires_at_ms, ctx, env.version_id), b""))
            new_heads = {ctx: head for ctx, head in heads.items() if head is not None}
            for ctx, head in new_heads.items():
                puts.append((head_key(ctx), head.encode()))
                self._pending_heads[ctx] = head
        try:
            if puts:
                self.kv.write(puts, sync=True)
        finally:
            with self._lock:
                for key, _ in puts:
                    self._pending_versions.discard(key)
                for ctx, head in new_heads.items():
                    if self._pending_heads.get(ctx) is head:
                        del self._pending_heads[ctx]
        self._report(
            [
                SetChange(ctx, added=tuple(vids), epochs=epochs.get(ctx, {}))
                for ctx, vids in added.items()
            ]
        )
        return envelopes, results

    def purge(self, context: ContextName, marker: PurgeMarker) -> int:
        """Remove every version of ``context`` the marker covers (id <= ``upto``) and leave
        ``marker``; returns rows removed. Versions newer than the marker stay (a restored
        backup's older marker, or a write that sorts after it), with the head recomputed."""
        ctx = context.key()
        upto = VersionId.parse(marker.upto)
        prefix = len(versions_prefix(ctx))
        with self._lock:
            old = self.kv.get(purge_key(ctx))
            rows: list[tuple[bytes, bytes]] = []
            kept: list[Envelope] = []
            for key, data in self.kv.scan(versions_prefix(ctx)):
                if VersionId.parse(key[prefix:].decode("ascii")) <= upto:
                    rows.append((key, data))
                else:
                    kept.append(Envelope.decode(data))
            deletes = [key for key, _ in rows]
            for _, data in rows:
                deletes.extend(self._ttl_rows_of(ctx, data))
            head: Head | None = None
            for env in kept:
                head = _advance(head, env)
            puts = [(purge_key(ctx), marker.encode())]
            if head is None:
                deletes.append(head_key(ctx))
            else:
                puts.append((head_key(ctx), head.encode()))
            self.kv.write(puts, deletes, sync=True)
            change = SetChange(
                ctx,
                removed=tuple(key[prefix:].decode("ascii") for key, _ in rows),
                old_upto=None if old is None else PurgeMarker.decode(old).upto,
                new_upto=marker.upto,
                epochs=_epochs_of(prefix, rows),
            )
            self._report([change])
        return len(rows)

    def remove_versions(self, context: ContextName, version_ids: Sequence[str]) -> int:
        """Physically drop versions (TTL expiry) and recompute the head; returns count."""
        ctx = context.key()
        with self._lock:
            drop = set(version_ids)
            deletes: list[bytes] = []
            dropped: list[str] = []
            dropped_rows: list[tuple[bytes, bytes]] = []
            kept: list[Envelope] = []
            for key, data in self.kv.scan(versions_prefix(ctx)):
                vid = key[len(versions_prefix(ctx)) :].decode("ascii")
                if vid in drop:
                    dropped.append(vid)
                    dropped_rows.append((key, data))
                    deletes.append(key)
                    deletes.extend(self._ttl_rows_of(ctx, data))
                else:
                    kept.append(Envelope.decode(data))
            if not deletes:
                return 0
            head: Head | None = None
            for env in kept:
                head = _advance(head, env)
            puts = [(head_key(ctx), head.encode())] if head else []
            if head is None:
                deletes.append(head_key(ctx))
            self.kv.write(puts, deletes, sync=True)
            epochs = _epochs_of(len(versions_prefix(ctx)), dropped_rows)
            self._report([SetChange(ctx, removed=tuple(dropped), epochs=epochs)])
        return len(drop)

    def rewrite(
        self, envelopes: Sequence[Envelope], *, meta: Sequence[tuple[bytes, bytes]] = ()
    ) -> int:
        """Replace stored versions in place, with ``meta`` rows, in one synced batch.

        Only for key rotation: each envelope keeps its version id and clear header and
        carries a new ciphertext, signature and seal epoch. A stored copy with a higher
        seal epoch than the envelope's is kept (``Envelope.supersedes``). A version no
        longer stored (purged or expired since it was read) is not written back. Heads and
        TTL rows do not change.

        Returns:
            How many versions were replaced.

        Raises:
            Internal: an envelope's header differs from the stored one (a caller's bug).
        """
        written: dict[bytes, tuple[bytes, Envelope, int]] = {}  # key -> (ctx, copy, old epoch)
        with self._lock:
            for env in envelopes:
                ctx = ContextName.from_canonical(env.context).key()
                key = version_key(ctx, env.version_id)
                if key in written:
                    held, old_epoch = written[key][1], written[key][2]
                else:
                    stored = self.kv.get(key)
                    if stored is None:
                        continue
                    held = Envelope.decode(stored)
                    old_epoch = held.seal_epoch
                if not held.same_header(env):
                    raise Internal(f"a rewrite must keep the header of version {env.version_id}")
                if held.seal_epoch > env.seal_epoch:
                    continue  # the convergence rule: a newer re-seal is never taken back
                written[key] = (ctx, env, old_epoch)
            puts = [*meta, *((key, env.encode()) for key, (_, env, _) in written.items())]
            if puts:
                self.kv.write(puts, sync=True)
            resealed: dict[bytes, list[tuple[str, int, int]]] = {}
            for ctx, env, old_epoch in written.values():
                if old_epoch != env.seal_epoch:
                    resealed.setdefault(ctx, []).append((env.version_id, old_epoch, env.seal_epoch))
            self._report([SetChange(ctx, resealed=tuple(c)) for ctx, c in resealed.items()])
        return len(puts) - len(meta)

    @staticmethod
    def _ttl_rows_of(ctx: bytes, data: bytes) -> list[bytes]:
        try:
            env = Envelope.decode(data)
        except CorruptRecord:
            return []
        if env.expires_at_ms is None:
            return []
        return [ttl_key(env.expires_at_ms, ctx, env.version_id)]

    # -- reads ---------------------------------------------------------------------------

    def head(self, context: ContextName) -> Head | None:
        """The committed head of ``context``, or None."""
        data = self.kv.get(head_key(context.key()))
        return None if data is None else Head.decode(data)

    def version(self, context: ContextName, version_id: str) -> bytes | None:
        """The raw envelope of one version, or None."""
        return self.kv.get(version_key(context.key(), version_id))

    def versions(self, context: ContextName) -> list[StoredRow]:
        """Every version row of ``context`` in id order."""
        prefix = versions_prefix(context.key())
        return [
            StoredRow(key[len(prefix) :].decode("ascii"), data)
            for key, data in self.kv.scan(prefix)
        ]

    def version_ids(self, context: ContextName) -> list[str]:
        """The ids of every version of ``context``, in id order (keys only)."""
        prefix = versions_prefix(context.key())
        return [key[len(prefix) :].decode("ascii") for key in self.kv.scan_keys(prefix)]

    def heads(self, pattern: ContextName) -> Iterator[tuple[ContextName, Head]]:
        """(context, head) of every context whose key starts with the pattern's prefix."""
        for key, data in self.kv.scan(HEAD_PREFIX + pattern.key_prefix()):
            yield ContextName.from_key(key[len(HEAD_PREFIX) :]), Head.decode(data)

    def purge_marker(self, context: ContextName) -> PurgeMarker | None:
        """The purge marker of ``context``, or None."""
        data = self.kv.get(purge_key(context.key()))
        return None if data is None else PurgeMarker.decode(data)

    def due_for_expiry(self, now_ms: int) -> list[tuple[ContextName, str]]:
        """(context, version id) of every version whose TTL ran out at or before ``now_ms``."""
        out = []
        for key, _ in self.kv.scan(TTL_PREFIX):
            expires_ms, ctx, vid = split_ttl_key(key)
            if expires_ms > now_ms:
                break
            out.append((ContextName.from_key(ctx), vid))
        return out

    def version_sets(self) -> Iterator[tuple[bytes, list[str], str | None]]:
        """(ctx key, version ids, purge marker upto) of every context that has either.

        Reads keys only for versions (one pass over the ``v/`` rows, no envelope is
        decoded) and every purge marker: for anti-entropy's one tree build at start.
        """
        markers = {
            key[len(PURGE_PREFIX) :]: PurgeMarker.decode(data).upto
            for key, data in self.kv.scan(PURGE_PREFIX)
        }
        current: bytes | None = None
        ids: list[str] = []
        for key in self.kv.scan_keys(VERSION_PREFIX):
            ctx, _, vid = key[len(VERSION_PREFIX) :].rpartition(SEP)
            if ctx != current:
                if current is not None:
                    yield current, ids, markers.pop(current, None)
                current, ids = ctx, []
            ids.append(vid.decode("ascii"))
        if current is not None:
            yield current, ids, markers.pop(current, None)
        for ctx, upto in markers.items():
            yield ctx, [], upto

    def version_states(self) -> Iterator[tuple[bytes, list[str], str | None, dict[str, int]]]:
        """``version_sets`` with the seal epochs of the re-sealed versions (id -> epoch,
        where not 0): one pass over the ``v/`` rows with their values (a version as
        written is recognised from its first bytes, ``seal_epoch_of``), for anti-entropy's
        tree build at start."""
        markers = {
            key[len(PURGE_PREFIX) :]: PurgeMarker.decode(data).upto
            for key, data in self.kv.scan(PURGE_PREFIX)
        }
        current: bytes | None = None
        ids: list[str] = []
        epochs: dict[str, int] = {}
        for key, data in self.kv.scan(VERSION_PREFIX):
            ctx, _, raw = key[len(VERSION_PREFIX) :].rpartition(SEP)
            if ctx != current:
                if current is not None:
                    yield current, ids, markers.pop(current, None), epochs
                current, ids, epochs = ctx, [], {}
            vid = raw.decode("ascii")
            ids.append(vid)
            epoch = seal_epoch_of(data)
            if epoch:
                epochs[vid] = epoch
        if current is not None:
            yield current, ids, markers.pop(current, None), epochs
        for ctx, upto in markers.items():
            yield ctx, [], upto, {}

    def seal_epochs(self, context: ContextName) -> dict[str, int]:
        """version id -> seal epoch of the re-sealed versions of ``context`` (not 0)."""
        return _epochs_of(len(versions_prefix(context.key())),
                          self.kv.scan(versions_prefix(context.key())))  # fmt: skip

    def count_contexts(self) -> int:
        """How many contexts have a head."""
        return sum(1 for _ in self.kv.scan(HEAD_PREFIX))

    def count_purged(self) -> int:
        """How many purge markers exist."""
        return sum(1 for _ in self.kv.scan(PURGE_PREFIX))

    # -- helpers -------------------------------------------------------------------------

    def _head_for_update(self, ctx: bytes) -> Head | None:
        pending = self._pending_heads.get(ctx)
        if pending is not None:
            return pending
        data = self.kv.get(head_key(ctx))
        return None if data is None else Head.decode(data)

    def _purged(self, ctx: bytes, version_id: str) -> bool:
        data = self.kv.get(purge_key(ctx))
        if data is None:
            return False
        marker = PurgeMarker.decode(data)
        return VersionId.parse(version_id) <= VersionId.parse(marker.upto)


def _epochs_of(prefix: int, rows: Iterable[tuple[bytes, bytes]]) -> dict[str, int]:
    """version id -> seal epoch of the re-sealed ones among version rows (key, value)."""
    out = {}
    for key, data in rows:
        epoch = seal_epoch_of(data)
        if epoch:
            out[key[prefix:].decode("ascii")] = epoch
    return out


def _advance(head: Head | None, env: Envelope) -> Head:
    """The head after adding ``env`` (which is not yet in the set)."""
    if head is None:
        return Head(env.version_id, 1, not env.tombstone, env.created_at_ms)
    if VersionId.parse(env.version_id) > VersionId.parse(head.latest):
        return Head(env.version_id, head.count + 1, not env.tombstone, env.created_at_ms)
    return Head(head.latest, head.count + 1, head.live, head.updated_ms)
