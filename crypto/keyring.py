"""The node's keyring: age X25519 identities per role and key version, the node's keys.

Owns the ``keys/`` directory of a data dir:

- ``keys/<role>.key``: the role's *current* age identity file, in the format
  ``age-keygen`` writes, so ``age -d -i keys/<role>.key`` decrypts what slurp encrypts now;
- ``keys/<role>.v<N>.key``: an older, not yet retired key version N of the role (kept
  while a rotation re-encrypts the records that still need it; deleted on retirement);
- ``keys/node.key``: this node's own age identity (wraps what is sent to the node);
- ``keys/node.ed25519``: the node's Ed25519 signing key (PKCS#8 PEM);
- ``keys/keyring.json``: roles, authorities, every key version's public recipient with its
  creation and retirement times, which version is current, rotations in progress, whether
  the keyring is passphrase-protected, and the node's public signing key (format
  ``KEYRING_FORMAT``; format 1, without the last four, is still read). No secrets.

Passphrase protection: every secret file above (not keyring.json) is then *sealed*, the
armored age scrypt encryption of its plain form (``crypto.keyfiles``), so the ``age`` CLI
opens it with the passphrase. The signing key is sealed the same way rather than with
PKCS#8 ``BestAvailableEncryption`` (PBKDF2, 2048 rounds), which would make it the cheapest
file to guess the passphrase against. Files are unsealed lazily: opening costs no scrypt,
the first use of a role's identity or of the signer costs one (about a second) each.

Rotation (``begin_rotation`` / ``finish_rotation``) touches files in an order that
survives a crash at any point; ``Keyring.open`` repairs what an interrupted one left:

1. write the new identity as ``<role>.v<N+1>.key`` (tmp + fsync + rename);
2. hard-link the current ``<role>.key`` as ``<role>.v<N>.key``;
3. write keyring.json (tmp + fsync + rename): version N+1 current, rotation recorded.
   This is the commit point;
4. rename ``<role>.v<N+1>.key`` onto ``<role>.key``.

Repair at open, by file names alone (no secret is read): ``<role>.v<C>.key`` where C is
the current version is renamed onto ``<role>.key`` (after step 3 it is the new identity;
after step 2 it is a second name of the same old one); ``<role>.v<K>.key`` of a version K
keyring.json does not list (crash before step 3) or lists as retired (crash inside
``finish_rotation``, which writes keyring.json first and deletes the file second) is
deleted, and so are stray ``*.tmp`` files. Every identity read is checked against the
recipient keyring.json records for its version.

Encryption (``seal`` / ``decrypt*`` / ``export_age``): records are sealed under data keys
that are age-wrapped to the readers' current recipients plus admin (``crypto.sealing``);
plain age files (``encrypt``: records from before sealing, ``get --encrypted`` exports)
still open. Unwrapped data keys are cached per role scope and dropped whenever a held
identity changes (rotation, ``hold_in_memory``, ``release``).

Must not know about records or storage. Invariants: every secret file is 0600 and is
checked before it is read; a role's recipient is known even when its identity is not held
here (e.g. admin after its identity was Shamir-split and forgotten).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Hashable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyrage
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyrage import x25519

from crypto.errors import DecryptionError, KeyringError
from crypto.key_versions import (
    KEYRING_FORMAT,
    KeyVersion,
    Meta,
    RoleKeys,
    dump_meta,
    fingerprint,
    new_meta,
    parse_meta,
    repair_plan,
    role_listing,
    roles_of,
    rotation_of,
    with_rotation_begun,
    with_rotation_finished,
)
from crypto.keyfiles import (
    TMP_SUFFIX,
    Passphrase,
    PassphraseSource,
    SecretFiles,
    check_secret_mode,
    identity_file_text,
    parse_identity,
    replace_secret_file,
)
from crypto.roles import ADMIN_ROLE, Role, RoleSet
from crypto.seal_format import SealedRecord, is_age, open_box
from crypto.sealing import (
    Clock,
    DataKeyCache,
    DataKeyIssuer,
    PendingSeal,
    SealPolicy,
    unwrap_key,
    wrap_key,
)
from crypto.signing import Signer, private_key_from_pem

NODE_IDENTITY = "node"
KEYRING_FILE = "keyring.json"
NODE_KEY_FILE = "node.key"
SIGNING_KEY_FILE = "node.ed25519"
ReaderSet = tuple[tuple[str, int, str], ...]  # (role, key version, recipient), sorted
MAX_READER_SETS = 1024  # memoised reader lists (``seal``); the memo is cleared when full
ABSENT_RECHECK_S = 1.0  # how stale a cached "identity file absent" answer may be

__all__ = [
    "KEYRING_FORMAT",
    "KeyVersion",
    "Keyring",
    "RoleKeys",
    "check_secret_mode",
    "fingerprint",
    "identity_file_text",
    "read_identity_file",
]


def read_identity_file(path: Path) -> x25519.Identity:
    """Load the age identity in a plain identity file (comments allowed).

    Raises:
        KeyringError: missing, loosely permitted, sealed, or not an identity file.
    """
    check_secret_mode(path)
    return parse_identity(path.read_text(encoding="utf-8", errors="replace"), str(path))


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Keyring:
    """Role identities, recipients and the node's keys, backed by a ``keys/`` directory.

    Thread-safe: identities are loaded (and unsealed) once, under a lock.
    """

    def __init__(self, keys_dir: Path, meta: Meta, files: SecretFiles) -> None:
        self.keys_dir = keys_dir
        self._files = files
        self._lock = threading.RLock()
        self._identities: dict[tuple[str, int], x25519.Identity] = {}
        # role -> monotonic time its identity file was last found absent: an admin request
        # to a node without the admin identity asks ``has_identity`` each time, and a stat
        # per request showed in the profile. A file another process adds is seen within
        # ABSENT_RECHECK_S; this keyring's own writes clear the entry at once.
        self._absent: dict[str, float] = {}
        self._recipients: dict[str, x25519.Recipient] = {}
        self.configure_sealing(SealPolicy())
        self._set_meta(meta)
        self.role_set = RoleSet(rk.role for rk in self._roles.values())
        self.node_recipient: str = str(meta["node_recipient"])
        self.signer = self._make_signer()
        self.node_id: str = self.signer.key_id

    # -- creation and opening -------------------------------------------------------

    @classmethod
    def create(
        cls,
        keys_dir: Path,
        roles: Sequence[Role],
        *,
        passphrase: str | None = None,
        role_identities: Mapping[str, x25519.Identity] | None = None,
    ) -> Keyring:
        """Create a keyring with a fresh identity per role, a node identity and signing key.

        Args:
            keys_dir: the directory (created 0700 if missing).
            roles: the role set (must contain admin).
            passphrase: seal every secret file with it (one scrypt per file, ~1 s each).
            role_identities: identities to use instead of fresh ones (the nodes of one
                cluster share role keys; each node's own identity and signing key stay
                its own). A role missing here gets a fresh identity.

        Raises:
            KeyringError: ``keys_dir`` already holds a keyring, or the role set is invalid.
        """
        role_set = RoleSet(roles)
        if (keys_dir / KEYRING_FILE).exists():
            raise KeyringError(f"{keys_dir} already holds a keyring")
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        files = SecretFiles(keys_dir, None if passphrase is None else Passphrase(passphrase))
        sealed = passphrase is not None
        created = _now_iso()
        recipients = []
        given = role_identities or {}
        for role in role_set.roles:
            identity = given.get(role.name) or x25519.Identity.generate()
            text = identity_file_text(identity, created).encode()
            files.write(f"{role.name}.key", text, sealed=sealed, exclusive=True)
            recipients.append((role, str(identity.to_public())))
        node_identity = x25519.Identity.generate()
        node_text = identity_file_text(node_identity, created).encode()
        files.write(NODE_KEY_FILE, node_text, sealed=sealed, exclusive=True)
        signer = Signer.generate()
        files.write(SIGNING_KEY_FILE, signer.to_pem(), sealed=sealed, exclusive=True)
        meta = new_meta(
            recipients,
            created_at=created,
            node_recipient=str(node_identity.to_public()),
            node_signing_key=signer.public_key,
            protected=sealed,
        )
        files.write(KEYRING_FILE, dump_meta(meta), sealed=False, exclusive=True)
        return cls(keys_dir, meta, files)

    @classmethod
    def open(cls, keys_dir: Path, passphrase: PassphraseSource | None = None) -> Keyring:
        """Open an existing keyring, checking the permissions of every secret file.

        Repairs what an interrupted rotation left (module docstring). Reads no secret:
        sealed files are unsealed when first used, and a callable ``passphrase`` is only
        called then (so a wrong passphrase shows at first use, not here).

        Raises:
            KeyringError: missing, malformed, of an unknown format, too loosely permitted,
                or passphrase-protected and no passphrase was given.
        """
        path = keys_dir / KEYRING_FILE
        if not path.exists():
            raise KeyringError(f"no keyring in {keys_dir} (run `slurp init` first)")
        check_secret_mode(path)
        try:
            meta, _ = parse_meta(path.read_bytes())
        except OSError:
            raise KeyringError(f"{path} is not a readable keyring file") from None
        if meta.get("protected") and passphrase is None:
            raise KeyringError(
                f"the keyring in {keys_dir} is passphrase-protected: set SLURP_PASSPHRASE "
                "or pass --passphrase"
            )
        for secret in keys_dir.glob("*.key"):
            check_secret_mode(secret)
        check_secret_mode(keys_dir / SIGNING_KEY_FILE)
        files = SecretFiles(keys_dir, None if passphrase is None else Passphrase(passphrase))
        keyring = cls(keys_dir, meta, files)
        keyring._repair_files()
        return keyring

    def _set_meta(self, meta: Meta) -> None:
        roles = roles_of(meta)
        self._roles = roles
        self._meta = meta
        # one atomic snapshot for ``seal``: a reader set computed from these roles can
        # only ever be memoised beside them, never beside a later key version's
        self._seal_view: tuple[dict[str, RoleKeys], dict[tuple[str, ...], ReaderSet]] = (
            roles,
            {},
        )
        self.protected: bool = bool(meta.get("protected", False))

    def _save(self, meta: Meta) -> None:
        """Write keyring.json atomically (tmp, fsync, rename), then adopt ``meta``."""
        roles_of(meta)  # never write what could not be read back
        meta.setdefault("rotations", [])
        meta.setdefault("node_signing_key", self.signer.public_key.hex())
        replace_secret_file(self.keys_dir / KEYRING_FILE, dump_meta(meta))
        self._set_meta(meta)

    def _make_signer(self) -> Signer:
        public = self._meta.get("node_signing_key")
        if public is None:  # format 1: the key is plain, load it now
            return Signer(self._load_signing_key())
        try:
            return Signer.deferred(bytes.fromhex(str(public)), self._load_signing_key)
        except ValueError:
            raise KeyringError("keyring.json is malformed (node_signing_key)") from None

    def _load_signing_key(self) -> Ed25519PrivateKey:
        data = self._files.read(SIGNING_KEY_FILE)
        return private_key_from_pem(data, str(self._files.path(SIGNING_KEY_FILE)))

    def _repair_files(self) -> None:
        """Finish or undo the file moves of an interrupted rotation (module docstring)."""
        with self._lock:
            for stray in self.keys_dir.glob("*" + TMP_SUFFIX):
                self._files.remove(stray.name)
            names = [p.name for p in self.keys_dir.glob("*.v*.key")]
            for action, name in repair_plan(self._roles, names):
                if action == "rename":
                    self._files.rename(name, name.split(".", 1)[0] + ".key")
                else:
                    self._files.remove(name)

    def unlock(self, roles: Iterable[str] | None = None) -> None:
        """Unseal now the signing key and the identities of ``roles`` (default: all held).

        For a daemon that should fail at start on a wrong passphrase rather than at its
        first request, and not pay scrypt (about a second per file) while serving.

        Raises:
            UnknownRole: a role is not known.
            KeyringError: the passphrase does not open a file.
        """
        self.signer.sign(b"slurp/unlock")
        for role in self.held_roles() if roles is None else tuple(roles):
            self.role_set.get(role)
            self._role_identities(role)

    # -- queries ---------------------------------------------------------------------

    def role_keys(self) -> tuple[RoleKeys, ...]:
        """Every role with its key versions."""
        return tuple(self._roles.values())

    def identity_path(self, role: str) -> Path:
        """Where the current identity file of ``role`` lives (it may be absent)."""
        self.role_set.get(role)
        return self.keys_dir / f"{role}.key"

    def has_identity(self, role: str) -> bool:
        """Whether this keyring holds the current identity of ``role``."""
        rk = self._roles.get(role)
        if rk is not None and (role, rk.current) in self._identities:
            return True
        now = time.monotonic()
        checked = self._absent.get(role)
        if checked is not None and now - checked < ABSENT_RECHECK_S:
            return False
        if self.identity_path(role).exists():
            self._absent.pop(role, None)
            return True
        self._absent[role] = now
        return False

    def held_roles(self) -> tuple[str, ...]:
        """The roles whose identities this keyring holds, in role-set order."""
        return tuple(name for name in self.role_set.names if self.has_identity(name))

    def recipient(self, role: str) -> str:
        """The current recipient (``age1...``) of ``role``."""
        self.role_set.get(role)
        return self._roles[role].recipient

    def rotation_in_progress(self, role: str) -> dict[str, Any] | None:
        """``{role, from_version, to_version, started_at}`` of an unfinished rotation, or None."""
        self.role_set.get(role)
        return rotation_of(self._meta, role)

    def listing(self) -> dict[str, Any]:
        """What ``slurp keys list`` shows, JSON-ready.

        ``{"protected", "node_id", "node_recipient", "roles": [{"name", "authority",
        "current", "held", "rotation", "versions": [{"version", "recipient",
        "fingerprint", "created_at", "retired_at", "current", "held"}]}]}``; ``current`` is
        the version that encrypts new writes; ``held`` says whether its identity file is here.
        """
        return {
            "protected": self.protected,
            "node_id": self.node_id,
            "node_recipient": self.node_recipient,
            "roles": role_listing(self._meta, self._roles, self._holds),
        }

    # -- encryption -------------------------------------------------------------------
    #
    # Two formats (docs/storage.md, "Record encryption"): a record sealed under an
    # age-wrapped data key (``seal``, ``crypto.sealing``), and a plain age file per record
    # (``encrypt``: records written before sealing, and what ``get --encrypted`` exports).
    # ``decrypt*`` open both; ``associated`` is the sealed record's binding to its place
    # (``storage.envelope.Envelope.binding``) and is ignored for a plain age file.

    def configure_sealing(self, policy: SealPolicy, clock: Clock | None = None) -> None:
        """Use ``policy`` for data keys from now on (forgets every data key held).

        ``clock`` (monotonic seconds) replaces ``time.monotonic`` for the age limit.
        """
        self.seal_policy = policy
        self._issuer = DataKeyIssuer(policy) if clock is None else DataKeyIssuer(policy, clock)
        self._open_keys = DataKeyCache(policy.open_keys)

    def sealing_stats(self) -> dict[str, int]:
        """``{data_keys_issued, records_sealed, open_keys, open_key_hits, open_key_misses}``:
        counters since the last ``configure_sealing`` (the node configures once, at start)."""
        cache = self._open_keys
        return {
            "data_keys_issued": self._issuer.issued,
            "records_sealed": self._issuer.sealed,
            "open_keys": len(cache),
            "open_key_hits": cache.hits,
            "open_key_misses": cache.misses,
        }

    def seal(self, plaintext: bytes, readers: Iterable[str]) -> PendingSeal:
        """Encrypt ``plaintext`` under the current data key of ``readers`` plus admin.

        The result is finished (bound to its version) by ``PendingSeal.finish``, which
        ``storage.envelope.Envelope.sealed`` calls before signing.

        Raises:
            UnknownRole: a reader is not a known role.
        """
        asked = tuple(readers)
        roles, memo = self._seal_view
        reader_set = memo.get(asked)
        if reader_set is None:
            reader_set = self._reader_set(asked, roles)
            if len(memo) >= MAX_READER_SETS:
                memo.clear()
            memo[asked] = reader_set

        def wrap(key: bytes) -> bytes:
            return wrap_key(key, [self._recipient_obj(r) for _, _, r in reader_set])

        data_key, fresh = self._issuer.take(reader_set, wrap)
        if fresh:  # the writer's own roles read it back without an unwrap
            for name, _, _ in reader_set:
                self._open_keys.store(("role", name), data_key.digest, data_key.key)
        return PendingSeal(data_key, plaintext)

    def _reader_set(self, readers: tuple[str, ...], roles: dict[str, RoleKeys]) -> ReaderSet:
        """The sorted (role, current key version, recipient) of ``readers`` plus admin in
        ``roles``: what a data key is drawn for (a changed version or recipient is a new
        set).

        Raises:
            UnknownRole: a reader is not a known role.
        """
        names = tuple(dict.fromkeys([*readers, ADMIN_ROLE]))
        for name in names:
            self.role_set.get(name)
        return tuple(sorted((name, roles[name].current, roles[name].recipient) for name in names))

    def encrypt(self, plaintext: bytes, readers: Iterable[str]) -> bytes:
        """A standalone age file of ``plaintext`` to the current recipients of ``readers``
        plus admin (``age -d`` opens it with any of their identities).

        Raises:
            UnknownRole: a reader is not a known role.
        """
        names = dict.fromkeys([*readers, ADMIN_ROLE])
        recipients = [self._recipient_obj(self.recipient(name)) for name in names]
        return bytes(pyrage.encrypt(plaintext, recipients))

    def export_age(self, ciphertext: bytes, readers: Iterable[str], associated: bytes) -> bytes:
        """A fresh standalone age file (``encrypt``) of what ``ciphertext`` holds, opened
        with any identity held here; a plain age file is returned as it is.

        Raises:
            UnknownRole: a reader is not a known role.
            KeyringError: no role identity is held here, or one cannot be unsealed.
            DecryptionError: no held identity opens it, or it is damaged.
        """
        if is_age(ciphertext):
            return ciphertext
        return self.encrypt(self.decrypt_any(ciphertext, associated=associated), readers)

    def decrypt(self, ciphertext: bytes, role: str, *, associated: bytes = b"") -> bytes:
        """Decrypt with the identities of ``role``: its current and unretired older versions.

        Raises:
            UnknownRole: ``role`` is not a known role.
            KeyringError: no identity of ``role`` is held here, or one cannot be unsealed.
            DecryptionError: the ciphertext is not for this role, or it is damaged.
        """
        self.role_set.get(role)
        identities = self._role_identities(role)
        if not identities:
            raise KeyringError(f"this keyring does not hold the identity of role {role!r}")
        return self._open(ciphertext, ("role", role), identities, associated)

    def decrypt_version(
        self, ciphertext: bytes, role: str, version: int, *, associated: bytes = b""
    ) -> bytes:
        """Decrypt with key version ``version`` of ``role`` alone.

        Raises:
            UnknownRole: ``role`` is not a known role.
            KeyringError: no such version, it is retired, or its identity is not held here.
            DecryptionError: the ciphertext is not for that version, or it is damaged.
        """
        self.role_set.get(role)
        if self._roles[role].version(version).retired_at is not None:
            raise KeyringError(f"key version {version} of role {role!r} is retired")
        if not self._holds(role, version):
            raise KeyringError(f"this keyring does not hold key version {version} of {role!r}")
        identities = [self._identity(role, version)]
        return self._open(ciphertext, ("version", role, version), identities, associated)

    def decrypt_any(self, ciphertext: bytes, *, associated: bytes = b"") -> bytes:
        """Decrypt with every identity held here (all roles, all unretired versions).

        On a protected keyring this unseals every identity file on first use.

        Raises:
            KeyringError: no role identity is held here, or one cannot be unsealed.
            DecryptionError: no held identity opens the ciphertext, or it is damaged.
        """
        identities = [i for name in self.role_set.names for i in self._role_identities(name)]
        if not identities:
            raise KeyringError("this keyring holds no role identity")
        return self._open(ciphertext, ("any",), identities, associated)

    def _open(
        self,
        ciphertext: bytes,
        scope: tuple[str | int, ...],
        identities: Sequence[x25519.Identity],
        associated: bytes,
    ) -> bytes:
        if is_age(ciphertext):
            return _decrypt(ciphertext, identities)
        record = SealedRecord.parse(ciphertext)
        digest = record.digest
        known, key = self._open_keys.lookup(scope, digest)
        if not known:
            key = unwrap_key(record.wrapped_key, identities)
            self._open_keys.store(scope, digest, key)
        if key is None:
            raise DecryptionError("cannot decrypt")
        return open_box(record, key, associated)

    def _forget_unwraps_of(self, role: str) -> None:
        """``role`` gained or lost an identity held in memory (custody holds and wipes the
        admin identity as leadership comes and goes): drop what its scopes and the
        any-identity scope unwrapped or failed to, and nothing else. Other roles' unwraps
        do not depend on it, and the writer's data keys depend on recipients only
        (``hold_in_memory`` takes only the current key), so a leader's lease flapping under
        load no longer costs every data key of the node (a new age wrap for each reader
        set, and an age unwrap on every node that reads them)."""

        def touched(scope: Hashable) -> bool:  # ("role", r), ("version", r, v) or ("any",)
            return isinstance(scope, tuple) and (scope == ("any",) or scope[1:2] == (role,))

        self._open_keys.drop(touched)

    def _forget_data_keys(self) -> None:
        """Drop every data key: identities changed, so cached unwraps may be wrong."""
        self._issuer.clear()
        self._open_keys.clear()

    def _recipient_obj(self, text: str) -> x25519.Recipient:
        found = self._recipients.get(text)
        if found is None:
            found = x25519.Recipient.from_str(text)
            self._recipients[text] = found
        return found

    def _file_name(self, role: str, version: int) -> str:
        return self._roles[role].file_name(version)

    def _holds(self, role: str, version: int) -> bool:
        return (role, version) in self._identities or self._files.exists(
            self._file_name(role, version)
        )

    def _role_identities(self, role: str) -> list[x25519.Identity]:
        """The held identities of ``role``'s unretired versions, current first."""
        rk = self._roles[role]
        order = sorted(rk.versions, key=lambda v: (v.version != rk.current, -v.version))
        return [
            self._identity(role, v.version)
            for v in order
            if v.retired_at is None and self._holds(role, v.version)
        ]

    def _identity(self, role: str, version: int) -> x25519.Identity:
        with self._lock:
            found = self._identities.get((role, version))
            if found is not None:
                return found
            name = self._file_name(role, version)
            where = str(self._files.path(name))
            identity = parse_identity(self._files.read(name).decode("utf-8", "replace"), where)
            if str(identity.to_public()) != self._roles[role].version(version).recipient:
                raise KeyringError(f"{where} does not hold key version {version} of role {role!r}")
            self._identities[(role, version)] = identity
            return identity

    # -- the admin identity's life around a Shamir split -------------------------------

    def current_identity(self, role: str) -> x25519.Identity:
        """The current identity of ``role``.

        Raises:
            KeyringError: it is not held here (or cannot be unsealed).
        """
        rk = self._roles[self.role_set.get(role).name]
        if not self._holds(role, rk.current):
            raise KeyringError(f"this keyring does not hold the identity of role {role!r}")
        return self._identity(role, rk.current)

    def node_identity(self) -> x25519.Identity:
        """This node's own age identity (it unwraps shares and keys sent to the node)."""
        with self._lock:
            found = self._identities.get((NODE_IDENTITY, 0))
            if found is None:
                where = str(self._files.path("node.key"))
                text = self._files.read("node.key").decode("utf-8", "replace")
                found = parse_identity(text, where)
                self._identities[(NODE_IDENTITY, 0)] = found
            return found

    def hold_in_memory(self, role: str, identity: x25519.Identity) -> None:
        """Use ``identity`` as the current identity of ``role`` until ``release``.

        Nothing is written to disk (a rebuilt admin identity lives in memory only).

        Raises:
            KeyringError: ``identity`` is not the role's current key.
        """
        rk = self._roles[self.role_set.get(role).name]
        if str(identity.to_public()) != rk.recipient:
            raise KeyringError(f"that identity is not the current key of role {role!r}")
        with self._lock:
            self._identities[(role, rk.current)] = identity
            self._absent.pop(role, None)
            self._forget_unwraps_of(role)

    def release(self, role: str) -> None:
        """Drop every cached identity of ``role`` (files on disk are untouched)."""
        with self._lock:
            for key in [k for k in self._identities if k[0] == role]:
                del self._identities[key]
            self._absent.pop(role, None)
            self._forget_unwraps_of(role)

    def forget(self, role: str) -> None:
        """Delete the current identity file of ``role`` (overwritten first) and its cache.

        Used after the admin identity was Shamir-split: from then on admin-only
        operations need it rebuilt from shares.
        """
        path = self.identity_path(role)
        self.release(role)
        if path.exists():
            size = path.stat().st_size
            with path.open("r+b") as handle:
                handle.write(b"\0" * size)
                handle.flush()
                os.fsync(handle.fileno())
            path.unlink()

    # -- rotation ---------------------------------------------------------------------

    def begin_rotation(self, role: str) -> KeyVersion:
        """Make a new key version of ``role`` current; the old one stays until finished.

        New writes are encrypted to the new version at once; both versions decrypt until
        ``finish_rotation``. File order and crash repair: module docstring.

        Returns:
            The new key version.

        Raises:
            UnknownRole: ``role`` is not a known role.
            KeyringError: a rotation of ``role`` is already in progress, or this keyring
                does not hold the role's current identity.
        """
        return self._begin(role, x25519.Identity.generate(), None)

    def install_rotation(self, role: str, identity: x25519.Identity, version: int) -> KeyVersion:
        """Make ``identity`` (generated elsewhere: the cluster leader) key version
        ``version`` of ``role`` and current, as ``begin_rotation`` does with a fresh one.

        Idempotent: when the role already has a version with this identity's recipient,
        that version is returned and nothing is written (a retried install is acknowledged
        again). Same file order and crash repair as ``begin_rotation``.

        Returns:
            The installed (or already installed) key version.

        Raises:
            UnknownRole: ``role`` is not a known role.
            KeyringError: another rotation of ``role`` is in progress, this keyring does not
                hold the role's current identity, or its next version is not ``version``.
        """
        recipient = str(identity.to_public())
        with self._lock:
            rk = self._roles[self.role_set.get(role).name]
            for known in rk.versions:
                if known.recipient == recipient:
                    if known.version != version:
                        raise KeyringError(
                            f"that identity is key version {known.version} of role {role!r} "
                            f"here, not {version}"
                        )
                    return known
        return self._begin(role, identity, version)

    def _begin(self, role: str, identity: x25519.Identity, expect: int | None) -> KeyVersion:
        with self._lock:
            self.role_set.get(role)
            if not self.has_identity(role):
                raise KeyringError(f"this keyring does not hold the identity of role {role!r}")
            now = _now_iso()
            meta, old, new = with_rotation_begun(self._meta, role, str(identity.to_public()), now)
            if expect is not None and new != expect:
                raise KeyringError(
                    f"role {role!r} would get key version {new} here, not {expect}: this "
                    "node's key history differs from the cluster's"
                )
            self._identity(role, old)  # the file to keep must be sound (and unsealed once)
            text = identity_file_text(identity, now).encode()
            self._files.write(f"{role}.v{new}.key", text, sealed=self.protected)  # 1
            self._files.link(f"{role}.key", f"{role}.v{old}.key")  # 2
            self._save(meta)  # 3: the commit point
            self._files.rename(f"{role}.v{new}.key", f"{role}.key")  # 4
            self._identities[(role, new)] = identity
            self._absent.pop(role, None)
            self._forget_data_keys()
            return self._roles[role].version(new)

    def finish_rotation(self, role: str) -> KeyVersion:
        """Retire the version a rotation replaced and delete its identity file.

        Call it only once nothing is encrypted to the old version any more (the storage
        layer's re-encryption decides that). keyring.json is written first, the file
        deleted second; ``open`` deletes a retired version's file that a crash left.

        Returns:
            The retired key version.

        Raises:
            UnknownRole: ``role`` is not a known role.
            KeyringError: no rotation of ``role`` is in progress.
        """
        with self._lock:
            self.role_set.get(role)
            meta, old = with_rotation_finished(self._meta, role, _now_iso())
            self._save(meta)
            self._files.remove(f"{role}.v{old}.key")
            self._identities.pop((role, old), None)
            self._forget_data_keys()
            return self._roles[role].version(old)

    # -- passphrase protection ---------------------------------------------------------

    def protect(self, passphrase: str) -> None:
        """Seal every secret file with ``passphrase`` (one scrypt per file; resumable).

        Each file is replaced atomically; keyring.json says ``protected`` once all are.

        Raises:
            KeyringError: already protected, an empty passphrase, or a file an earlier,
                interrupted run sealed with another passphrase.
        """
        with self._lock:
            if self.protected:
                raise KeyringError("the keyring is already passphrase-protected")
            self._files.passphrase = Passphrase(passphrase)
            for name in self._secret_file_names():
                self._files.reseal(name, sealed=True)
            self._save({**self._meta, "protected": True})

    def unprotect(self) -> None:
        """Rewrite every secret file plain (unsealing the ones not yet used; resumable).

        Raises:
            KeyringError: not protected, or the passphrase does not open a file.
        """
        with self._lock:
            if not self.protected:
                raise KeyringError("the keyring is not passphrase-protected")
            for name in self._secret_file_names():
                self._files.reseal(name, sealed=False)
            self._save({**self._meta, "protected": False})

    def _secret_file_names(self) -> list[str]:
        names = sorted(p.name for p in self.keys_dir.glob("*.key"))
        return [*names, SIGNING_KEY_FILE]


def _decrypt(ciphertext: bytes, identities: Sequence[x25519.Identity]) -> bytes:
    try:
        return bytes(pyrage.decrypt(ciphertext, list(identities)))
    except pyrage.DecryptError:
        raise DecryptionError("cannot decrypt") from None
