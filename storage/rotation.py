"""Key rotation of one role on one node (ARCHITECTURE.md §5, "Key rotation").

Owns the re-encryption walk that lets a role's old key be retired, its resumable cursor
(``m/rotation/<role>``, ``storage.schema.RotationCursor``); the rotation-due warnings live in
``storage.key_age`` (the ContextStore reports them, so they must not import this module).
Must not know about the CLI or the network; the keyring (``crypto.keyring``) owns the
key files and their crash-safe moves.

**The one in-place rewrite in the system.** Versions are immutable everywhere else. A
rotation gives an existing version a new ciphertext (re-sealed: a new data key wrapped to
the *current* recipients of its readers plus admin and a new box bound to the new header,
never a re-wrap of the old data key, which the old identity could still open;
docs/storage.md, "Key rotation re-seals") and a new signature (by this node's key, which
thereby vouches for the re-encryption; ``created_by`` still names the writer), under the
same version id and the same clear header. It never creates a version: ranks, heads,
history, TTL rows and the full-text index stay as they are.

Order (``rotate_role``):

1. ``Keyring.begin_rotation``: a new key version becomes current, so every new write is
   encrypted to it at once (skipped when a rotation of the role is already in progress:
   the call resumes it).
2. The main pass walks every version row (``v/``) in key order after the cursor. A row is
   rewritten when it is not a tombstone, the role reads it (listed as a reader, or the
   role is admin, which is a recipient of everything) and the new identity does not
   already open it. Each batch writes its rows *and* the advanced cursor in one synced
   write: a crash loses at most the batch in progress, and doing a batch twice is
   harmless. Rows that fail their signature check, are signed by another key or are
   stored under the wrong key are never re-signed (that would launder tampering), and
   rows no held identity opens are left too; both are counted as ``skipped`` and do not
   hold up retirement, since the store refuses or cannot read them anyway.
3. The tail pass checks again every row created since ``TAIL_MARGIN_MS`` before the
   rotation began: a write whose ciphertext was made just before step 1 may commit
   behind the cursor. (A write still in flight after the whole main pass would be missed;
   closing that needs the write path to re-encrypt when the key version changed between
   encrypting and committing.)
4. ``Keyring.finish_rotation`` retires the old version and deletes its identity file;
   then the cursor is deleted and the decrypted-record cache cleared.

``stop_after_batches`` returns early (``finished=False``) after that many synced batches,
leaving exactly what a crash at that point leaves; the next call resumes.

**Cost per row** (what keeps a member at thousands of rows a second, docs/storage.md "Key
rotation"): one decode, one header digest, one AEAD open, one AEAD seal under the writer's
current data key of the reader set (one age wrap per 4096 rows), one Ed25519 signature and
a share of one synced batch. The signature check is done once per stored bytes ("verify
once", ``storage.cache.VerifiedDigests``): bytes this node verified on arrival or on an
earlier read are not verified again (their digest is forgotten once they are replaced), and
the bytes of every re-seal, signed here, are remembered as verified, so the tail pass and
the reads after the rotation do not verify them again. Rows the walk has not verified
before are verified before they are opened. Rows a role does not read are decoded and
left. The rows in the store are counted once, when the rotation's cursor is created (the
count is kept in the cursor, for progress); the decrypted-record cache loses only the
contexts a batch rewrote.

Rotations are serialised within a process; LevelDB's lock keeps other processes out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

from crypto.errors import DecryptionError, KeyringError
from crypto.keyring import Keyring
from crypto.roles import ADMIN_ROLE
from storage.address import ContextName
from storage.cache import VerifiedDigests, envelope_digest
from storage.context_store import ContextStore
from storage.envelope import Envelope
from storage.errors import CorruptRecord, StorageError
from storage.schema import (
    HEAD_PREFIX,
    META_HLC,
    SEP,
    VERSION_PREFIX,
    Head,
    RotationCursor,
    rotation_cursor_key,
    version_key,
)
from storage.versions import VersionId

DEFAULT_BATCH_SIZE = 500  # version rows per synced batch (~1.5 KB each: under 1 MB)
TAIL_MARGIN_MS = 60_000
Progress = Callable[[int, int], None]
Trusted = Callable[[bytes], bool]  # is this signing key a trusted cluster node's?
Stop = Callable[[], bool]  # asked after each batch: stop here (e.g. a time budget is spent)?
_ROTATION_LOCK = threading.Lock()


@dataclass(frozen=True)
class RotationReport:
    """What one ``rotate_role`` call did (counts are this call's, not the rotation's).

    ``scanned``: version rows the main pass walked; ``rewritten``: rows re-encrypted;
    ``skipped``: rows the role reads that were left as they are (failing their integrity
    check, or opened by no identity held here); ``batches``: synced batches written;
    ``resumed``: a rotation of the role was already in progress; ``finished``: the old
    key version is retired.
    """

    role: str
    from_version: int
    to_version: int
    scanned: int
    rewritten: int
    skipped: int
    batches: int
    resumed: bool
    finished: bool

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return asdict(self)


@dataclass
class _Run:
    """The mutable state of one call."""

    store: ContextStore
    role: str
    to_version: int
    cursor: RotationCursor
    batch_size: int
    total: int
    scanned: int = 0
    rewritten: int = 0
    batches: int = 0
    skipped: set[bytes] = field(default_factory=set)  # keys, as the tail pass sees rows twice
    trusted: Trusted | None = None  # None: only rows signed by this node are re-signed
    stop: Stop | None = None

    @property
    def verified(self) -> VerifiedDigests:
        return self.store.reader.verified

    def stopping(self, stop_after: int | None) -> bool:
        """Whether to return after the batch just written (``finished``/``done`` False)."""
        if stop_after is not None and self.batches >= stop_after:
            return True
        return self.stop is not None and self.stop()


def rotate_role(
    store: ContextStore,
    role: str,
    *,
    progress: Progress | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop_after_batches: int | None = None,
) -> RotationReport:
    """Rotate the key of ``role``: begin (or resume), re-encrypt, retire the old version.

    Args:
        store: an open ContextStore (its keyring must hold the role's identity).
        role: the role to rotate.
        progress: called after each batch of the main pass, and once when it ends, with
            (rows scanned, rows in the store), counting over every run of this rotation.
        batch_size: version rows per synced batch.
        stop_after_batches: return early after this many batches (``finished=False``),
            as a crash would; for tests and bounded work.

    Returns:
        What this call did.

    Raises:
        UnknownRole: ``role`` is not a known role.
        KeyringError: the keyring does not hold the role's identity, or cannot write.
        ValueError: ``batch_size`` or ``stop_after_batches`` is below 1.
    """
    if batch_size < 1 or (stop_after_batches is not None and stop_after_batches < 1):
        raise ValueError("batch_size and stop_after_batches must be at least 1")
    keyring = store.keyring
    with _ROTATION_LOCK:
        keyring.role_set.get(role)
        since_ms = max(_last_write_ms(store) - TAIL_MARGIN_MS, 0)
        rotation = keyring.rotation_in_progress(role)
        resumed = rotation is not None
        if rotation is None:
            keyring.begin_rotation(role)
            rotation = keyring.rotation_in_progress(role)
            assert rotation is not None
        to_version = int(rotation["to_version"])
        cursor = _begun_cursor(store, role, to_version, since_ms)
        run = _Run(store, role, to_version, cursor, batch_size, cursor.total or 0)
        done = _main_pass(run, progress, stop_after_batches) and _tail_pass(run, stop_after_batches)
        if done:
            keyring.finish_rotation(role)
            store.kv.write([], [rotation_cursor_key(role)], sync=True)
            store.cache.clear()
        return RotationReport(
            role=role,
            from_version=int(rotation["from_version"]),
            to_version=to_version,
            scanned=run.scanned,
            rewritten=run.rewritten,
            skipped=len(run.skipped),
            batches=run.batches,
            resumed=resumed,
            finished=done,
        )


# -- cluster-wide rotation: the member's side (node/control/rotation.py drives it) ------


@dataclass(frozen=True)
class ResealReport:
    """One ``reseal_step``: ``done`` when every row after the cursor and the tail are
    checked; ``scanned`` / ``total`` count over the whole rotation (for progress)."""

    role: str
    to_version: int
    done: bool
    scanned: int
    total: int
    rewritten: int
    skipped: int

    def to_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return asdict(self)


def reseal_step(
    store: ContextStore,
    role: str,
    to_version: int,
    *,
    trusted: Trusted,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_batches: int = 50,
    stop: Stop | None = None,
) -> ResealReport:
    """Re-encrypt up to ``max_batches`` batches of this node's rows that ``role`` reads so
    that key version ``to_version`` (already installed and current) opens them.

    ``stop`` is asked after each synced batch (never before the first); True returns at
    once (``done`` False), as ``max_batches`` does: a member bounds a call by time with it.

    The same walk as ``rotate_role`` (main pass after the durable cursor, then the tail
    pass), but it neither begins nor finishes the keyring's rotation: the cluster leader
    installs the key and retires the old one. Rows signed by any key ``trusted`` accepts
    are re-sealed (they were verified when stored; the signature is checked again here).
    Asking again after ``done`` checks the tail again and is otherwise a no-op.

    Raises:
        UnknownRole: ``role`` is not a known role.
        KeyringError: no rotation of ``role`` to ``to_version`` is in progress here.
        ValueError: ``batch_size`` or ``max_batches`` is below 1.
    """
    if batch_size < 1 or max_batches < 1:
        raise ValueError("batch_size and max_batches must be at least 1")
    keyring = store.keyring
    with _ROTATION_LOCK:
        rotation = keyring.rotation_in_progress(role)
        if rotation is None or int(rotation["to_version"]) != to_version:
            raise KeyringError(f"no rotation of role {role!r} to key version {to_version} here")
        # a member that coordinated no write has no HLC of its own: its clock then bounds
        # the tail (without it every call would re-check every row)
        began = max(_last_write_ms(store), store.clock_ms())
        cursor = _begun_cursor(store, role, to_version, max(began - TAIL_MARGIN_MS, 0))
        run = _Run(store, role, to_version, cursor, batch_size, cursor.total or 0)
        run.trusted, run.stop = trusted, stop
        done = _main_pass(run, None, max_batches) and _tail_pass(run, max_batches)
        return ResealReport(
            role=role,
            to_version=to_version,
            done=done,
            scanned=run.cursor.scanned,
            total=max(run.total, run.cursor.scanned),
            rewritten=run.rewritten,
            skipped=len(run.skipped),
        )


def reseal_context(
    store: ContextStore, ctx: ContextName, role: str, to_version: int, *, trusted: Trusted
) -> tuple[int, int]:
    """Re-encrypt one context's rows that ``role`` reads for key version ``to_version``.

    Returns:
        (rows rewritten, rows skipped: failing their integrity check or opened by no held
        identity).

    Raises:
        UnknownRole: ``role`` is not a known role.
    """
    keyring = store.keyring
    keyring.role_set.get(role)
    with _ROTATION_LOCK:
        cursor = RotationCursor(to_version, b"", 0)
        run = _Run(store, role, to_version, cursor, DEFAULT_BATCH_SIZE, 0, trusted=trusted)
        prefix = version_key(ctx.key(), "")
        rows = list(store.kv.scan(prefix))
        count = _rewrite(run, [_rotated(run, key, data) for key, data in rows])
        return count, len(run.skipped)


def retire_old_version(store: ContextStore, role: str, version: int) -> bool:
    """Retire key version ``version`` of ``role`` here (its identity file is deleted) and
    drop the rotation cursor; False when it was already retired (idempotent).

    Raises:
        UnknownRole: ``role`` is not a known role.
        KeyringError: the rotation in progress here replaces another version.
    """
    keyring = store.keyring
    with _ROTATION_LOCK:
        rotation = keyring.rotation_in_progress(role)
        if rotation is None:
            return False
        if int(rotation["from_version"]) != version:
            raise KeyringError(
                f"the rotation of role {role!r} here replaces key version "
                f"{rotation['from_version']}, not {version}"
            )
        keyring.finish_rotation(role)
        store.kv.write([], [rotation_cursor_key(role)], sync=True)
        store.cache.clear()
        return True


# -- the passes -------------------------------------------------------------------------


def _main_pass(run: _Run, progress: Progress | None, stop_after: int | None) -> bool:
    """Walk the rows after the cursor; False when stopped early."""
    while True:
        rows = _take(run.store.kv.scan(VERSION_PREFIX, after=run.cursor.after), run.batch_size)
        if not rows:
            if progress is not None:
                progress(run.cursor.scanned, max(run.total, run.cursor.scanned))
            return True
        rewritten = [_rotated(run, key, data) for key, data in rows]
        run.cursor = replace(
            run.cursor,
            after=rows[-1][0],
            scanned=run.cursor.scanned + len(rows),
            rewritten=run.cursor.rewritten + sum(1 for env in rewritten if env),
        )
        cursor_row = (rotation_cursor_key(run.role), run.cursor.encode())
        run.rewritten += _rewrite(run, rewritten, meta=[cursor_row])
        run.scanned += len(rows)
        run.batches += 1
        if progress is not None:
            run.total = max(run.total, run.cursor.scanned)
            progress(run.cursor.scanned, run.total)
        if run.stopping(stop_after):
            return False


def _tail_pass(run: _Run, stop_after: int | None) -> bool:
    """Check again the rows written since the rotation began; False when stopped early."""
    recent = (
        (key, data)
        for key, data in run.store.kv.scan(VERSION_PREFIX)
        if _row_wall_ms(key) >= run.cursor.since_ms
    )
    while rows := _take(recent, run.batch_size):
        rewritten = [_rotated(run, key, data) for key, data in rows]
        if any(rewritten):
            run.rewritten += _rewrite(run, rewritten)
            run.batches += 1
            if run.stopping(stop_after):
                return False
    return True


def _rewrite(
    run: _Run, rotated: list[Envelope | None], meta: Sequence[tuple[bytes, bytes]] = ()
) -> int:
    """Write the re-sealed rows (and ``meta``) in one synced batch; drop their contexts
    from the decrypted-record cache. Returns the rows written."""
    envelopes = [env for env in rotated if env is not None]
    if not envelopes and not meta:
        return 0
    count = run.store.versions.rewrite(envelopes, meta=meta)
    for context in {env.context for env in envelopes}:
        run.store.cache.invalidate_context(ContextName.from_canonical(context).key())
    return count


def _rotated(run: _Run, key: bytes, data: bytes) -> Envelope | None:
    """The row re-encrypted and re-signed, or None when it is left as it is."""
    keyring = run.store.keyring
    try:
        env = Envelope.decode(data)
    except CorruptRecord:
        run.skipped.add(key)
        return None
    if env.tombstone or not (run.role == ADMIN_ROLE or run.role in env.readers):
        return None
    digest = envelope_digest(data)
    if not _sound(env, key, keyring, run.trusted, run.verified, digest):
        run.skipped.add(key)
        return None
    binding = env.binding()
    try:
        keyring.decrypt_version(env.ciphertext, run.role, run.to_version, associated=binding)
        return None  # written after the rotation began, or rewritten before a crash
    except DecryptionError:
        pass
    try:
        plain = keyring.decrypt(env.ciphertext, run.role, associated=binding)
    except DecryptionError:
        run.skipped.add(key)
        return None
    # a full re-seal: a new data key wrapped to the current recipients, a new box bound to
    # the new header (its seal epoch changes); docs/storage.md, "Key rotation"
    pending = keyring.seal(plain, env.readers)
    epoch = max(seal_epoch(keyring, env.readers), env.seal_epoch + 1)
    resealed = replace(env, ciphertext=pending, seal_epoch=epoch).sealed(keyring.signer)
    # verify once: these bytes are replaced, and the new ones are signed here
    run.verified.discard(digest)
    run.verified.add(envelope_digest(resealed.encode()))
    return resealed


def seal_epoch(keyring: Keyring, readers: Iterable[str]) -> int:
    """The seal epoch of a version encrypted now to ``readers`` plus admin: the sum of
    their current key versions (``storage.envelope``, "Seal epoch")."""
    current = {rk.role.name: rk.current for rk in keyring.role_keys()}
    return sum(current.get(name, 1) for name in dict.fromkeys([*readers, ADMIN_ROLE]))


def _sound(
    env: Envelope,
    key: bytes,
    keyring: Keyring,
    trusted: Trusted | None,
    verified: VerifiedDigests,
    digest: bytes,
) -> bool:
    """Signed by this node's key (or, in a cluster, by a key ``trusted`` accepts), stored
    under its own key, and the signature verifies (checked here unless the bytes of
    SHA-256 ``digest`` verified on this node before: ``verified``)."""
    if trusted is None:
        if env.signer != keyring.signer.public_key:
            return False
    elif env.signer != keyring.signer.public_key and not trusted(env.signer):
        return False
    try:
        ctx = ContextName.from_canonical(env.context).key()
        if version_key(ctx, env.version_id) != key:
            return False
        if not verified.seen(digest):
            env.check_signature()  # not remembered: these bytes are about to be replaced
    except StorageError:  # CorruptRecord, AddressError
        return False
    return True


# -- helpers ----------------------------------------------------------------------------


def _take(rows: Iterator[tuple[bytes, bytes]], count: int) -> list[tuple[bytes, bytes]]:
    out = []
    for row in rows:
        out.append(row)
        if len(out) == count:
            break
    return out


def _load_cursor(store: ContextStore, role: str, to_version: int) -> RotationCursor | None:
    """The cursor of this rotation; a damaged one or one of an earlier rotation is ignored."""
    data = store.kv.get(rotation_cursor_key(role))
    if data is None:
        return None
    try:
        cursor = RotationCursor.decode(data)
    except CorruptRecord:
        return None
    return cursor if cursor.to_version == to_version else None


def _begun_cursor(store: ContextStore, role: str, to_version: int, since_ms: int) -> RotationCursor:
    """The cursor of this rotation; a new one (durable at once) when there is none. The
    rows are counted when the cursor is made (and once more for a cursor written before it
    kept its count), never on every call."""
    cursor = _load_cursor(store, role, to_version)
    if cursor is not None and cursor.total is not None:
        return cursor
    if cursor is None:
        cursor = RotationCursor(to_version, b"", since_ms)
    cursor = replace(cursor, total=_count_versions(store))
    store.kv.write([(rotation_cursor_key(role), cursor.encode())], sync=True)
    return cursor


def _last_write_ms(store: ContextStore) -> int:
    """The wall time of the newest version id issued here (0 for an empty store)."""
    last = store.kv.get(META_HLC)
    return VersionId.parse(last.decode("ascii")).wall_ms if last else 0


def _row_wall_ms(key: bytes) -> int:
    try:
        return VersionId.parse(key.rpartition(SEP)[2].decode("ascii")).wall_ms
    except (UnicodeDecodeError, CorruptRecord):
        return 0  # a malformed key; the main pass has counted the row as skipped


def _count_versions(store: ContextStore) -> int:
    return sum(Head.decode(data).count for _, data in store.kv.scan(HEAD_PREFIX))
