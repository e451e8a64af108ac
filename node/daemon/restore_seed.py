"""The founding keys of a cluster restored from a backup (``slurp cluster up --restore``).

Owns reading, from one full backup made ``--with-keys``, what a new local cluster must be
founded with so that the backup's versions are its own: the role identities (from the
backup's ``keys/secret/<role>.key``), the admin identity (from the backup's
``keys/secret/admin.key`` when it holds one, else from the ``--identity`` files: the one
whose recipient is the admin recipient of the backup's keyring), and the signing keys of
the backup's signers (``keys/signers.json`` of a cluster backup, plus the node key of its
keyring), which the new cluster records as trusted signers in its founding metadata
(``node.control.metadata``: never members).

Must not know: how the cluster directory is laid out or started (``node.daemon.
cluster_init``, ``node.daemon.ops``), how versions are merged (the leader's restore).

Invariants: the whole backup is decrypted and verified (every member's hash and every
signature, as ``storage.backup.read`` does) before anything is returned, and nothing is
written, so a refused backup leaves no trace; the identities returned are exactly the
current key version of every role, admin's included, each checked against the recipient
the backup's keyring records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyrage import x25519

from crypto.errors import CryptoError
from crypto.key_versions import parse_meta
from crypto.keyfiles import parse_identity
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES
from storage.backup import Backup, BackupInvalid, read, signers_of
from storage.backup_io import Opener
from storage.errors import InvalidPayload


@dataclass(frozen=True)
class FoundingKeys:
    """What a cluster restored from a backup is founded with.

    ``identities``: role -> its current identity (admin's included); ``trusted_signers``:
    the raw Ed25519 keys that signed the backup's versions; ``admin_from``: where the admin
    identity came from (``"backup"`` or ``"identity"``); ``backup``: the verified backup."""

    identities: Mapping[str, x25519.Identity]
    trusted_signers: tuple[bytes, ...]
    admin_from: str
    backup: Backup


def founding_keys(path: Path, identities: Sequence[x25519.Identity]) -> FoundingKeys:
    """Open and verify the full backup ``path`` and read its founding keys.

    Args:
        path: a full backup (a node's or a cluster's) made ``--with-keys``.
        identities: the ``--identity`` files' identities: one opens the file; the admin
            identity must be among them unless the backup holds it.

    Raises:
        BackupUnreadable: no identity opens the file, or it is damaged.
        BackupInvalid: a member is bad (named), or a key file does not parse.
        InvalidPayload: not a full backup, made without keys, a protected keyring, roles
            other than the default ones or a rotated role key, or no admin identity.
    """
    if not identities:
        raise InvalidPayload(
            "--restore needs --identity FILE: an age identity that opens the backup "
            "(the old admin identity, or a --recipient's)",
            field="identity",
        )
    # every member's hash and every signature (by the backup's own signers); not every
    # decrypt: a cluster backup's admin-only versions open only with the admin identity,
    # which it does not hold (the leader's restore does not decrypt either)
    backup = read(Opener(identities=tuple(identities)).decrypt(path))
    manifest = backup.manifest
    if manifest.kind != "full":
        raise InvalidPayload(
            f"{path} is an incremental backup: a cluster is restored from a full one "
            "(then merge its incrementals with `slurp --profile P restore`)",
            field="file",
        )
    if not manifest.with_keys:
        raise InvalidPayload(
            f"{path} was made without --with-keys: a new cluster needs the backup's role "
            "identities to read its versions (take the backup with `backup create "
            "--with-keys`, or merge it into a running cluster of the same keys)",
            field="file",
        )
    recipients = _recipients(backup)
    secret = backup.contents.secret_keys
    found: dict[str, x25519.Identity] = {}
    for role, recipient in recipients.items():
        data = secret.get(f"{role}.key")
        if data is not None:
            found[role] = _identity(data, role, recipient)
    admin_from = "backup"
    if ADMIN_ROLE not in found:
        admin_from = "identity"
        found[ADMIN_ROLE] = _admin_of(identities, recipients[ADMIN_ROLE])
    missing = sorted(set(recipients) - set(found))
    if missing:
        raise InvalidPayload(
            f"{path} holds no identity of role(s) {', '.join(missing)}", field="file"
        )
    return FoundingKeys(found, tuple(sorted(set(signers_of(backup)))), admin_from, backup)


def _recipients(backup: Backup) -> dict[str, str]:
    """role -> current recipient of the backup's keyring (the default roles, version 1)."""
    name = "keys/keyring.json"
    try:
        meta, roles = parse_meta(backup.contents.keyring_json)
    except CryptoError as exc:
        raise BackupInvalid(f"{name}: {exc}", field=name) from None
    if meta.get("protected"):
        raise InvalidPayload(
            "the backup's keyring is passphrase-protected: not supported by cluster up "
            "--restore yet (restore it with `slurp restore --data-dir`)",
            field="file",
        )
    expected = {role.name for role in DEFAULT_ROLES}
    if set(roles) != expected:
        raise InvalidPayload(
            f"the backup's roles {sorted(roles)} are not the default roles {sorted(expected)}",
            field="file",
        )
    rotated = sorted(name for name, keys in roles.items() if keys.current != 1)
    if rotated:
        raise InvalidPayload(
            f"role key(s) of {', '.join(rotated)} were rotated: cluster up --restore founds "
            "clusters of version-1 keys only (not supported yet)",
            field="file",
        )
    return {name: keys.recipient for name, keys in roles.items()}


def _identity(data: bytes, role: str, recipient: str) -> x25519.Identity:
    where = f"keys/secret/{role}.key"
    try:
        identity = parse_identity(data.decode("utf-8", errors="replace"), where)
    except CryptoError as exc:
        raise BackupInvalid(str(exc), field=where) from None
    if str(identity.to_public()) != recipient:
        raise BackupInvalid(
            f"{where} is not the identity of {role}'s recipient in keys/keyring.json",
            field=where,
        )
    return identity


def _admin_of(identities: Sequence[x25519.Identity], recipient: str) -> x25519.Identity:
    for identity in identities:
        if str(identity.to_public()) == recipient:
            return identity
    raise InvalidPayload(
        f"the backup holds no admin identity and no --identity is it (admin recipient "
        f"{recipient}): give the old cluster's admin identity with --identity",
        field="identity",
    )
