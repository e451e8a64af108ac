"""The node's keyring: one age X25519 identity per role, the node identity, the signing key.

Owns the ``keys/`` directory of a data dir:

- ``keys/<role>.key``: the role's current age identity file, in the format ``age-keygen``
  writes, so ``age -d -i keys/<role>.key`` decrypts what slurp encrypted;
- ``keys/node.key``: this node's own age identity (wraps what is sent to the node);
- ``keys/node.ed25519``: the node's Ed25519 signing key (PKCS#8 PEM);
- ``keys/keyring.json``: roles, authorities and the public recipient of every key
  version (format versioned by ``KEYRING_FORMAT``).

Must not know about records or storage. Invariants: every secret file is mode 0600 and
is checked at open; a role's recipient is known even when its identity is not held here
(e.g. admin after its identity was Shamir-split and forgotten).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyrage
from pyrage import x25519

from crypto.errors import DecryptionError, KeyringError
from crypto.roles import ADMIN_ROLE, Authority, Role, RoleSet
from crypto.signing import Signer

KEYRING_FORMAT = 1
NODE_IDENTITY = "node"
_SECRET_MODE = 0o600


@dataclass(frozen=True)
class KeyVersion:
    """One key version of a role."""

    version: int
    recipient: str
    created_at: str
    retired_at: str | None = None


@dataclass(frozen=True)
class RoleKeys:
    """A role, its key versions, and which version encrypts new writes."""

    role: Role
    current: int
    versions: tuple[KeyVersion, ...]

    @property
    def recipient(self) -> str:
        """The recipient of the current key version."""
        return next(v.recipient for v in self.versions if v.version == self.current)


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def identity_file_text(identity: x25519.Identity, created_at: str) -> str:
    """An identity file in ``age-keygen``'s format."""
    return f"# created: {created_at}\n# public key: {identity.to_public()}\n{identity}\n"


def write_secret_file(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 and write ``text`` (refuses to overwrite)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _SECRET_MODE)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def check_secret_mode(path: Path) -> None:
    """Refuse a secret file that group or others may read or write.

    Raises:
        KeyringError: the file is missing or its permissions are looser than 0600.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        raise KeyringError(f"missing key file {path}") from None
    if mode & 0o077:
        raise KeyringError(
            f"key file {path} has permissions {mode:04o}; it must be 0600 (chmod 600 {path})"
        )


def read_identity_file(path: Path) -> x25519.Identity:
    """Load the age identity in an identity file (comments allowed).

    Raises:
        KeyringError: missing, loosely permitted, or not an age X25519 identity file.
    """
    check_secret_mode(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    secrets = [line.strip() for line in lines if line.strip().startswith("AGE-SECRET-KEY-")]
    if len(secrets) != 1:
        raise KeyringError(f"{path} does not hold exactly one age X25519 identity")
    try:
        return x25519.Identity.from_str(secrets[0])
    except pyrage.IdentityError:
        raise KeyringError(f"{path} holds a malformed age identity") from None


class Keyring:
    """Role identities, recipients and the node's keys, backed by a ``keys/`` directory."""

    def __init__(self, keys_dir: Path, meta: dict[str, Any]) -> None:
        self.keys_dir = keys_dir
        self._meta = meta
        self._roles = self._parse_roles(meta)
        self.role_set = RoleSet(rk.role for rk in self._roles.values())
        self.signer = Signer.load(keys_dir / "node.ed25519")
        self.node_id: str = self.signer.key_id
        self.node_recipient: str = meta["node_recipient"]
        self._identities: dict[str, x25519.Identity] = {}
        self._recipients: dict[str, x25519.Recipient] = {}

    # -- creation and opening -------------------------------------------------------

    @classmethod
    def create(cls, keys_dir: Path, roles: Sequence[Role]) -> Keyring:
        """Create a keyring with a fresh identity per role, a node identity and signing key.

        Raises:
            KeyringError: ``keys_dir`` already holds a keyring, or the role set is invalid.
        """
        role_set = RoleSet(roles)
        if (keys_dir / "keyring.json").exists():
            raise KeyringError(f"{keys_dir} already holds a keyring")
        keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        created = _now_iso()
        entries = []
        for role in role_set.roles:
            identity = x25519.Identity.generate()
            write_secret_file(keys_dir / f"{role.name}.key", identity_file_text(identity, created))
            entries.append(
                {
                    "name": role.name,
                    "authority": role.authority.label,
                    "current": 1,
                    "versions": [
                        {
                            "version": 1,
                            "recipient": str(identity.to_public()),
                            "created_at": created,
                        }
                    ],
                }
            )
        node_identity = x25519.Identity.generate()
        write_secret_file(keys_dir / "node.key", identity_file_text(node_identity, created))
        Signer.generate().save(keys_dir / "node.ed25519")
        meta = {
            "format": KEYRING_FORMAT,
            "node_recipient": str(node_identity.to_public()),
            "roles": entries,
        }
        write_secret_file(keys_dir / "keyring.json", json.dumps(meta, indent=2) + "\n")
        return cls(keys_dir, meta)

    @classmethod
    def open(cls, keys_dir: Path) -> Keyring:
        """Open an existing keyring, checking the permissions of every secret file.

        Raises:
            KeyringError: missing, malformed, of an unknown format, or too loosely permitted.
        """
        path = keys_dir / "keyring.json"
        if not path.exists():
            raise KeyringError(f"no keyring in {keys_dir} (run `slurp init` first)")
        check_secret_mode(path)
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise KeyringError(f"{path} is not a readable keyring file") from None
        if not isinstance(meta, dict) or meta.get("format") != KEYRING_FORMAT:
            raise KeyringError(f"{path} has an unknown keyring format")
        for secret in keys_dir.glob("*.key"):
            check_secret_mode(secret)
        check_secret_mode(keys_dir / "node.ed25519")
        return cls(keys_dir, meta)

    @staticmethod
    def _parse_roles(meta: dict[str, Any]) -> dict[str, RoleKeys]:
        try:
            out = {}
            for entry in meta["roles"]:
                role = Role(str(entry["name"]), Authority.parse(str(entry["authority"])))
                versions = tuple(
                    KeyVersion(
                        int(v["version"]),
                        str(v["recipient"]),
                        str(v["created_at"]),
                        v.get("retired_at"),
                    )
                    for v in entry["versions"]
                )
                out[role.name] = RoleKeys(role, int(entry["current"]), versions)
            return out
        except (KeyError, TypeError, ValueError):
            raise KeyringError("keyring.json is malformed") from None

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
        return role in self._identities or self.identity_path(role).exists()

    def held_roles(self) -> tuple[str, ...]:
        """The roles whose identities this keyring holds, in role-set order."""
        return tuple(name for name in self.role_set.names if self.has_identity(name))

    def recipient(self, role: str) -> str:
        """The current recipient (``age1...``) of ``role``."""
        self.role_set.get(role)
        return self._roles[role].recipient

    # -- encryption -------------------------------------------------------------------

    def _recipient_obj(self, text: str) -> x25519.Recipient:
        found = self._recipients.get(text)
        if found is None:
            found = x25519.Recipient.from_str(text)
            self._recipients[text] = found
        return found

    def _identity(self, role: str) -> x25519.Identity:
        found = self._identities.get(role)
        if found is None:
            path = self.identity_path(role)
            if not path.exists():
                raise KeyringError(f"this keyring does not hold the identity of role {role!r}")
            found = read_identity_file(path)
            self._identities[role] = found
        return found

    def encrypt(self, plaintext: bytes, readers: Iterable[str]) -> bytes:
        """Encrypt once to the current recipients of ``readers`` plus admin.

        Raises:
            UnknownRole: a reader is not a known role.
        """
        names = dict.fromkeys([*readers, ADMIN_ROLE])
        recipients = [self._recipient_obj(self.recipient(name)) for name in names]
        return bytes(pyrage.encrypt(plaintext, recipients))

    def decrypt(self, ciphertext: bytes, role: str) -> bytes:
        """Decrypt with the identity of ``role``.

        Raises:
            KeyringError: the identity of ``role`` is not held here.
            DecryptionError: the ciphertext is not for this role, or it is damaged.
        """
        identity = self._identity(role)
        try:
            return bytes(pyrage.decrypt(ciphertext, [identity]))
        except pyrage.DecryptError:
            raise DecryptionError("cannot decrypt") from None
