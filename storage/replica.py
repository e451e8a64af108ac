"""What a node does as one replica of a cluster, on top of its ContextStore.

Owns: applying versions that arrive from other nodes (verified, then merged by union),
handing out a context's version set, applying purge markers, and building views, history
and tombstones from a *merged* version set (which the coordinator assembled from several
replicas). Must not know about RPC, the ring or quorums (``node/`` does).

Invariant: nothing is stored that does not carry a valid signature by a trusted node key
(``ContextStore.trust_signer``); a refused version is counted in ``refused`` and never
stored. Versions covered by a purge marker are refused by the version store itself.

Fast path (issue 10):

- ``apply`` acknowledges after the durable store: verified versions and their contexts'
  durable "index is stale" rows go in one synced batch; indexing happens later, in
  batches, one decrypt per version (``storage.index_sync``: ``begin``/``end``/``drain``).
- Verify once: a signature is checked where bytes enter the node (``verify``) and the
  SHA-256 of those bytes is remembered (``storage.cache.VerifiedDigests``, shared with the
  store's reader); ``view`` checks the signature again only for bytes not remembered
  (e.g. a row another replica sent into a merged read set), then remembers them.
- ``view`` caches the decrypted view in the store's record cache under (version id, role,
  SHA-256 of the envelope bytes), after the role checks: a re-sealed copy has other bytes,
  so it never meets the plaintext of another copy; purge and every stored change drop the
  context's entries. The rank a view shows is the merged set's, stamped on every read.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

from cachetools import LRUCache

from storage.address import ContextName, Temporal
from storage.cache import envelope_digest
from storage.context_store import ContextStore, history_of
from storage.envelope import Envelope
from storage.errors import CorruptRecord, Forbidden, NotFound
from storage.reader import infos_of
from storage.schema import Head, PurgeMarker
from storage.versions import VersionId, select
from storage.views import HistoryEntry, VersionView

DECODED_ENVELOPES = 4096


class Replica:
    """The replica-side operations of one node."""

    def __init__(self, store: ContextStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self.refused = 0
        self.resealed = 0  # held copies replaced by a newer re-seal (convergence rule)
        # decoded envelopes of merged read sets, by the SHA-256 of their bytes (envelopes
        # are immutable values: equal bytes decode to equal envelopes)
        self._decoded: LRUCache[bytes, Envelope] = LRUCache(maxsize=DECODED_ENVELOPES)

    # -- as a replica ---------------------------------------------------------------------

    def verify(self, data: bytes) -> Envelope:
        """Decode and verify one envelope from the network.

        Raises:
            CorruptRecord: undecodable, unsigned, forged, or signed by an untrusted key.
        """
        return self._verified(data)[0]

    def _verified(self, data: bytes) -> tuple[Envelope, ContextName]:
        env = Envelope.decode(data)
        digest = envelope_digest(data)
        verified = self.store.reader.verified
        if not verified.seen(digest):
            env.check_signature()
        if not self.store.reader.trusted(env.signer):
            raise CorruptRecord(
                f"version {env.version_id} is signed by a key this cluster does not trust",
                field="signature",
            )
        ctx = ContextName.from_canonical(env.context)
        VersionId.parse(env.version_id)
        verified.add(digest)
        return env, ctx

    def sealed_here(self, data: bytes) -> None:
        """Remember that ``data`` (an envelope this node just sealed with its own key, e.g.
        a coordinator's client write) needs no signature check when ``apply`` gets it."""
        self.store.reader.verified.add(envelope_digest(data))

    def apply(self, blobs: Sequence[bytes]) -> tuple[list[bool | None], dict[str, int]]:
        """Verify and store versions; (per blob: True stored, False already held, None
        refused; and context -> version count after).

        A blob that fails verification is refused and counted; the others are stored in
        one synced batch. Already-held versions are no-ops (merge by union), except that a
        re-sealed copy with a higher seal epoch replaces the held one (key rotation's
        convergence rule, ``storage.envelope``). A version a
        purge marker here covers is refused too (None), never reported as held: a writer
        must not count it as a durable copy.
        """
        verified: list[Envelope | None] = []
        contexts: dict[str, ContextName] = {}
        for data in blobs:
            try:
                env, ctx = self._verified(data)
                verified.append(env)
                contexts.setdefault(env.context, ctx)
            except CorruptRecord:
                with self._lock:
                    self.refused += 1
                verified.append(None)
        good = [env for env in verified if env is not None]
        for env in good:
            self.store.observe(env.version_id)
        changed: set[str] = set()
        index = self.store.index
        stale_rows = index.begin(contexts.values())
        try:
            stored_flags = self.store.versions.append(good, meta=stale_rows) if good else []
            changed.update(e.context for e, f in zip(good, stored_flags, strict=True) if f)
            changed.update(self._take_newer_seals(good, stored_flags))
            for name in changed:  # before the drain can see them: ranks may have moved
                self.store.cache.invalidate_context(contexts[name].key())
        finally:  # indexing happens later, off the acknowledgement path (index_sync.drain)
            index.end(
                [ctx for name, ctx in contexts.items() if name in changed],
                [ctx for name, ctx in contexts.items() if name not in changed],
            )
        heads: dict[str, int] = {}
        for name, ctx in contexts.items():
            head = self.store.versions.head(ctx)
            if head is not None:
                heads[name] = head.count
        flags = iter(stored_flags)
        result: list[bool | None] = []
        for item in verified:
            flag: bool | None = None if item is None else next(flags)
            if flag is False and item is not None and self._covered(item):
                flag = None
            result.append(flag)
        return result, heads

    def _take_newer_seals(self, envs: Sequence[Envelope], stored: Sequence[bool]) -> set[str]:
        """Replace held copies that an arriving re-seal supersedes (the convergence rule,
        ``storage.envelope``: the higher seal epoch wins; never the reverse); returns the
        contexts whose copies were replaced."""
        newer = []
        for env, flag in zip(envs, stored, strict=True):
            if flag or not env.seal_epoch:
                continue
            ctx = ContextName.from_canonical(env.context)
            held = self.store.versions.version(ctx, env.version_id)
            try:
                if held is not None and env.supersedes(Envelope.decode(held)):
                    newer.append(env)
            except CorruptRecord:
                newer.append(env)  # a damaged held copy: the verified arrival replaces it
        if newer:
            self.resealed += self.store.versions.rewrite(newer)
        return {env.context for env in newer}

    def _covered(self, env: Envelope) -> bool:
        marker = self.store.versions.purge_marker(ContextName.from_canonical(env.context))
        return marker is not None and VersionId.parse(env.version_id) <= VersionId.parse(
            marker.upto
        )

    def version_set(self, ctx: ContextName) -> tuple[list[tuple[str, bytes]], PurgeMarker | None]:
        """Every version row of ``ctx`` this node holds, and its purge marker."""
        rows = [(row.version_id, row.data) for row in self.store.versions.versions(ctx)]
        return rows, self.store.versions.purge_marker(ctx)

    def head(self, ctx: ContextName) -> Head | None:
        """This node's head of ``ctx``."""
        return self.store.versions.head(ctx)

    def apply_purge(self, ctx: ContextName, marker: PurgeMarker) -> int:
        """Remove the versions a purge marker covers and keep the marker."""
        self.store.observe(marker.upto)  # a write coordinated here later sorts after it
        current = self.store.versions.purge_marker(ctx)
        if current is not None and VersionId.parse(current.upto) >= VersionId.parse(marker.upto):
            return 0
        removed = self.store.versions.purge(ctx, marker)
        self.store.cache.invalidate_context(ctx.key())
        self.store.index.remove(ctx)
        head = self.store.versions.head(ctx)
        if head is not None:  # versions newer than the marker stay (VersionStore.purge)
            self.store.index.refresh_context(ctx, head)
        self.store.index.commit()
        return removed

    # -- as a coordinator, over a merged version set ----------------------------------------

    def seal_tombstone(self, ctx: ContextName, parent: str, actor: str) -> Envelope:
        """A signed delete marker for ``ctx`` after version ``parent``."""
        return self.store.seal_tombstone(ctx, parent, actor)

    def purge_marker_for(self, latest: str | None, actor: str) -> PurgeMarker:
        """A purge marker covering everything up to now (and at least ``latest``)."""
        upto = self.store.next_id()
        if latest is not None:
            upto = max(upto, VersionId.parse(latest))
        return PurgeMarker(str(upto), self.store.clock_ms(), actor)

    def history(self, ctx: ContextName, rows: Sequence[tuple[str, bytes]]) -> list[HistoryEntry]:
        """History of a merged version set, oldest first."""
        infos, envs = infos_of(
            list(rows), self.store.clock_ms(), keep_corrupt=True, decode=self._decode
        )
        if not infos:
            raise NotFound(f"no such context: {ctx.canonical()}", input=ctx.canonical())
        return history_of(ctx, infos, envs)

    def view(
        self,
        ctx: ContextName,
        rows: Sequence[tuple[str, bytes]],
        temporal: Temporal,
        *,
        as_role: str | None,
        allowed_roles: Sequence[str] | None,
        where: str,
    ) -> VersionView:
        """Navigate a merged version set and decrypt the selected version.

        Args:
            ctx: the context.
            rows: (version id, envelope) in id order.
            temporal: the temporal segment.
            as_role: the role asked for (must be in ``allowed_roles`` when that is given).
            allowed_roles: the caller's roles (a client certificate's), or None for any.
            where: the address, for messages.

        Raises:
            NotFound, TemporalOutOfRange, Forbidden, CorruptRecord.
        """
        infos, envs = infos_of(
            list(rows), self.store.clock_ms(), keep_corrupt=True, decode=self._decode
        )
        if not infos:
            raise NotFound(f"no such context: {ctx.canonical()}", input=where)
        index = select(infos, temporal, where=where)
        env = envs[index]
        if env is None:
            raise CorruptRecord(f"version {index + 1} of {ctx.canonical()} is damaged")
        vid = str(infos[index].version_id)
        digest = envelope_digest(_row_bytes(rows, vid, env))
        reader = self.store.reader
        reader.checked(env, digest)  # verified once per distinct bytes; trusted every time
        if env.context != ctx.canonical() or env.version_id != vid:
            raise CorruptRecord(f"version {vid} is held under the wrong key", field="envelope")
        if env.tombstone:
            raise NotFound(f"{ctx.canonical()} was deleted (version {index + 1})", input=where)
        role = self._role_for(env, as_role, allowed_roles)  # FORBIDDEN before any plaintext
        cached = self.store.cache.get(ctx.key(), vid, role, variant=digest)
        if cached is None:
            cached = reader.decrypt_view(ctx, env, index + 1, role)
            self.store.cache.put(ctx.key(), vid, role, cached, variant=digest)
        if cached.version != index + 1:  # the merged set's rank, not the one cached with
            address = ctx.address(Temporal("version", index + 1)).canonical()
            cached = dataclasses.replace(cached, version=index + 1, address=address)
        return cached

    def _decode(self, data: bytes) -> Envelope:
        """``Envelope.decode``, remembered for the last ``DECODED_ENVELOPES`` byte strings."""
        digest = envelope_digest(data)
        with self._lock:
            env = self._decoded.get(digest)  # a hit moves it to the recent end
            if env is not None:
                return env
        env = Envelope.decode(data)  # raises CorruptRecord: nothing is remembered
        with self._lock:
            self._decoded[digest] = env  # past DECODED_ENVELOPES, the least recent goes
        return env

    def _role_for(self, env: Envelope, as_role: str | None, allowed: Sequence[str] | None) -> str:
        if allowed is None:
            return self.store.reader.reader_role(env, as_role)
        if as_role is not None:
            if as_role not in allowed:
                raise Forbidden(f"the client's certificate does not grant role {as_role!r}")
            return self.store.reader.reader_role(env, as_role)
        roles = self.store.keyring.role_set
        usable = [r for r in allowed if r in roles and roles.may_read(r, env.readers)]
        for role in sorted(usable, key=lambda r: roles.get(r).authority):
            if self.store.keyring.has_identity(role):
                return role
        raise Forbidden(f"none of the client's roles may read {env.context}", field="role")


def _row_bytes(rows: Sequence[tuple[str, bytes]], version_id: str, env: Envelope) -> bytes:
    """The envelope bytes of ``version_id`` in a merged row set; when the set holds it
    twice, the canonical encoding of the selected envelope (the same fields, so the same
    signature verdict)."""
    found = [data for vid, data in rows if vid == version_id]
    return found[0] if len(found) == 1 else env.encode()
