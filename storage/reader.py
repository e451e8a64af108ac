"""The read path of one node: from a head row to a decrypted, verified version.

Owns: resolving wildcard addresses, loading and verifying envelopes (decode, signature,
trusted signer, stored under the right key), expiry on read, choosing the role to read as,
decryption, and the decrypted-record cache. Must not write anything but the cache.

Order of checks on a miss: version row -> decode -> signature -> trusted signer -> key
match -> expiry -> role may read -> decrypt -> decode. A failure of any integrity check is
``CorruptRecord`` for that version alone.

Verify once: the signature check is skipped for bytes whose SHA-256 is in ``verified``
(``storage.cache.VerifiedDigests``: bytes this node verified before, on arrival or on an
earlier read); the trusted-signer and key-match checks run on every read (they are set
lookups and string compares). A digest is remembered only after its signature verified.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from crypto.errors import DecryptionError
from crypto.keyring import Keyring
from crypto.roles import ADMIN_ROLE
from storage.address import Address, ContextName, Temporal, parse
from storage.cache import RecordCache, VerifiedDigests, envelope_digest
from storage.envelope import Envelope, decompress_payload
from storage.errors import CorruptRecord, Forbidden, NotFound, UntrustedSigner
from storage.record import decode_secret
from storage.schema import Head
from storage.version_store import VersionStore
from storage.versions import VersionId, VersionInfo
from storage.views import VersionView


class VersionReader:
    """Reads versions for a ContextStore (thread-safe as long as the cache is)."""

    def __init__(
        self,
        versions: VersionStore,
        keyring: Keyring,
        cache: RecordCache[VersionView],
        *,
        clock_ms: Callable[[], int],
        trusted: Callable[[bytes], bool],
        verified: VerifiedDigests | None = None,
    ) -> None:
        self.versions = versions
        self.keyring = keyring
        self.cache = cache
        self._clock_ms = clock_ms
        self.trusted = trusted
        self.verified = verified if verified is not None else VerifiedDigests()

    def resolve(self, addr: Address) -> ContextName:
        """The concrete context an address names (latest-updated match for wildcards)."""
        ctx = addr.context()
        if not ctx.has_wildcard:
            return ctx
        best: tuple[int, ContextName] | None = None
        for found, head in self.versions.heads(ctx):
            if head.live and ctx.matches(found) and (best is None or head.updated_ms > best[0]):
                best = (head.updated_ms, found)
        if best is None:
            raise NotFound(f"no context matches {addr.canonical()}", input=addr.canonical())
        return best[1]

    def envelope(self, ctx: ContextName, vid: str) -> Envelope:
        """The verified envelope stored as version ``vid`` of ``ctx``.

        Raises:
            NotFound: no such row.
            CorruptRecord: it does not decode, verify, come from a trusted key, or sits
                under another key.
        """
        return self._stored(ctx, vid)[0]

    def _stored(self, ctx: ContextName, vid: str) -> tuple[Envelope, bytes]:
        """``envelope``, and the SHA-256 of the stored bytes (the view cache's variant)."""
        data = self.versions.version(ctx, vid)
        if data is None:
            raise NotFound(f"version {vid} of {ctx.canonical()} is gone", input=ctx.canonical())
        digest = envelope_digest(data)
        env = self.checked(Envelope.decode(data), digest)
        if env.context != ctx.canonical() or env.version_id != vid:
            raise CorruptRecord(f"version {vid} is stored under the wrong key", field="envelope")
        return env, digest

    def checked(self, env: Envelope, digest: bytes) -> Envelope:
        """``env`` (decoded from bytes of SHA-256 ``digest``) once its signature verified
        (here or before: ``verified``) and its signer is trusted.

        Raises:
            CorruptRecord: unsigned or forged (``UntrustedSigner``: signed by a key that is
                not trusted).
        """
        if not self.verified.seen(digest):
            env.check_signature()
            self.verified.add(digest)
        if not self.trusted(env.signer):
            raise UntrustedSigner(
                f"version {env.version_id} is signed by an untrusted key", field="signature"
            )
        return env

    def read_for_index(self, ctx: ContextName, head: Head) -> tuple[Envelope, dict[str, Any]]:
        """The latest version's envelope and decrypted fields, for the index: verified once,
        decrypted once. The view is cached under the digest of the stored bytes (the
        variant ``storage.replica.Replica.view`` looks up, so a cluster get right after
        costs no decrypt; ``read`` finds it there too).

        Raises:
            StorageError: it cannot be read (gone, corrupt, no role held may read it).
        """
        env, digest = self._stored(ctx, head.latest)
        if env.expires_at_ms is not None and env.expires_at_ms <= self._clock_ms():
            raise NotFound(f"{ctx.canonical()} expired", input=ctx.canonical())
        role = self.reader_role(env, None)
        view = self.cache.get(ctx.key(), head.latest, role, variant=digest)
        if view is None:
            view = self.decrypt_view(ctx, env, head.count, role)
            self.cache.put(ctx.key(), head.latest, role, view, variant=digest)
        return env, view.fields

    def infos(
        self, ctx: ContextName, *, keep_corrupt: bool = False
    ) -> tuple[list[VersionInfo], list[Envelope | None]]:
        """Navigation data for the local version rows of ``ctx`` (see ``infos_of``)."""
        rows = [(row.version_id, row.data) for row in self.versions.versions(ctx)]
        return infos_of(rows, self._clock_ms(), keep_corrupt=keep_corrupt)

    def rank(self, ctx: ContextName, vid: str) -> int | None:
        infos, _ = self.infos(ctx, keep_corrupt=True)
        for rank, info in enumerate(infos, start=1):
            if str(info.version_id) == vid:
                return rank
        return None

    def read(
        self,
        ctx: ContextName,
        vid: str,
        rank: int,
        as_role: str | None,
        *,
        head: Head | None = None,
    ) -> VersionView:
        key = ctx.key()
        if as_role is not None:
            cached = self.cache.get(key, vid, as_role)
            # a cached view was readable by this role (readers never change); the role's
            # identity must still be held here (an identity forgotten since is not)
            if cached is not None and self.keyring.has_identity(as_role):
                return cached
        env, digest = self._stored(ctx, vid)
        if env.expires_at_ms is not None and env.expires_at_ms <= self._clock_ms():
            if head is not None:  # the latest expired: fall back to what remains
                infos, _ = self.infos(ctx)
                if infos and not infos[-1].tombstone:
                    return self.read(ctx, str(infos[-1].version_id), len(infos), as_role)
            raise NotFound(f"{ctx.canonical()} expired", input=ctx.canonical())
        role = self.reader_role(env, as_role)
        if as_role is None:  # with as_role, this exact key was looked up (and missed) above
            cached = self.cache.get(key, vid, role)
            if cached is not None:
                return cached
        view = self.cache.get(key, vid, role, variant=digest)  # e.g. an index drain's
        if view is not None:
            if view.version != rank:  # cached with the rank of another (merged) set
                address = ctx.address(Temporal("version", rank)).canonical()
                view = dataclasses.replace(view, version=rank, address=address)
            self.cache.put(key, vid, role, view)  # the fast path next time
            return view
        view = self.decrypt_view(ctx, env, rank, role)
        self.cache.put(key, vid, role, view)
        return view

    def decrypt_view(self, ctx: ContextName, env: Envelope, rank: int, role: str) -> VersionView:
        """Decrypt a verified envelope as ``role`` (already allowed by ``reader_role``)."""
        try:
            plain = self.keyring.decrypt(env.ciphertext, role, associated=env.binding())
        except DecryptionError:
            raise CorruptRecord(
                f"version {env.version_id} of {ctx.canonical()} does not decrypt",
                field="ciphertext",
            ) from None
        fields = decode_secret(decompress_payload(plain, env.compression))
        return VersionView(
            address=ctx.address(Temporal("version", rank)).canonical(),
            context=ctx.canonical(),
            version=rank,
            version_id=env.version_id,
            parent=env.parent,
            created_at_ms=env.created_at_ms,
            created_by=env.created_by,
            readers=env.readers,
            tags=env.tags,
            technologies=env.technologies,
            influences=env.influences,
            influenced_by=env.influenced_by,
            expires_at_ms=env.expires_at_ms,
            read_as=role,
            fields=fields,
        )

    def reader_role(self, env: Envelope, as_role: str | None) -> str:
        roles = self.keyring.role_set
        if as_role is not None:
            if as_role not in roles:
                raise Forbidden(f"unknown role {as_role!r}", field="role")
            if not roles.may_read(as_role, env.readers):
                raise Forbidden(f"role {as_role!r} may not read {env.context}", field="role")
            if not self.keyring.has_identity(as_role):
                raise Forbidden(
                    f"this node does not hold the identity of role {as_role!r}", field="role"
                )
            return as_role
        # least privilege: the address's own role, then readers by rising authority, then admin
        own = _own_role(env.context)
        ranked = sorted(
            (name for name in env.readers if name in roles),
            key=lambda name: (name != own, roles.get(name).authority),
        )
        for name in (*ranked, ADMIN_ROLE):
            if self.keyring.has_identity(name):
                return name
        raise Forbidden(f"no role held by this node may read {env.context}", field="role")


@functools.lru_cache(maxsize=4096)
def _own_role(context: str) -> str:
    """The role segment of a context name (parsing is the slow part of choosing a role)."""
    return parse(context).role


def _signed(env: Envelope) -> bool:
    try:
        env.check_signature()
    except CorruptRecord:
        return False
    return True


def infos_of(
    rows: list[tuple[str, bytes]],
    now_ms: int,
    *,
    keep_corrupt: bool = False,
    decode: Callable[[bytes], Envelope] = Envelope.decode,
) -> tuple[list[VersionInfo], list[Envelope | None]]:
    """Navigation data for version rows (id, envelope bytes) sorted by id.

    Expired versions are left out (unless their expiry fails the signature check: an
    unverified expiry must not hide a version). With ``keep_corrupt``, a row that does
    not decode keeps its place (its envelope is None), so ranks never shift. ``decode``
    replaces ``Envelope.decode`` (a memo of it: ``storage.replica``).
    """
    infos: list[VersionInfo] = []
    envs: list[Envelope | None] = []
    for version_id, data in rows:
        vid = VersionId.parse(version_id)
        try:
            env = decode(data)
            parent = None if env.parent is None else VersionId.parse(env.parent)
        except CorruptRecord:
            if keep_corrupt:  # dated by its id: the HLC wall time it was created at
                infos.append(VersionInfo(vid, None, vid.wall_ms, False))
                envs.append(None)
            continue
        if env.expires_at_ms is not None and env.expires_at_ms <= now_ms:
            if _signed(env):
                continue
            if keep_corrupt:
                infos.append(VersionInfo(vid, None, vid.wall_ms, False))
                envs.append(None)
            continue
        # navigation dates a version by its id (the HLC wall time), not the clear header
        infos.append(VersionInfo(vid, parent, vid.wall_ms, env.tombstone))
        envs.append(env)
    return infos, envs
