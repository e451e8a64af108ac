"""The keyring.json model: roles, key versions, rotations in progress (no I/O).

Owns the format of ``keys/keyring.json`` (``KEYRING_FORMAT``) and every change made to
it, as pure functions from one metadata map to the next, plus the repair plan that
``crypto.keyring`` carries out when it opens a ``keys/`` directory an interrupted rotation
left behind. Must not touch files, secrets or the clock (times come in as text).

Format 2 (format 1 is read too: it lacks the last four keys)::

    {"format": 2, "node_recipient": "age1...",
     "roles": [{"name", "authority", "current",
                "versions": [{"version", "recipient", "created_at", "retired_at"?}]}],
     "protected": false, "node_signing_key": "<hex of the Ed25519 public key>",
     "rotations": [{"role", "from_version", "to_version", "started_at"}]}

Invariants: a role's ``current`` names one of its versions; at most one rotation per role
is in progress, and while it is, ``current == to_version`` and ``from_version`` is not
retired; a retired version is never current.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from crypto.errors import KeyringError
from crypto.roles import Authority, Role

KEYRING_FORMAT = 2
READABLE_FORMATS = (1, 2)
FINGERPRINT_HEX_CHARS = 16
VERSION_FILE = re.compile(r"^(?P<role>[A-Za-z0-9_-]{1,64})\.v(?P<version>[0-9]{1,9})\.key$")
Meta = dict[str, Any]
RepairStep = tuple[Literal["rename", "remove"], str]


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
        return self.version(self.current).recipient

    def version(self, number: int) -> KeyVersion:
        """Key version ``number``.

        Raises:
            KeyringError: the role has no such version.
        """
        for found in self.versions:
            if found.version == number:
                return found
        raise KeyringError(f"role {self.role.name!r} has no key version {number}")

    def file_name(self, number: int) -> str:
        """``<role>.key`` for the current version, ``<role>.v<N>.key`` for an older one."""
        name = self.role.name
        return f"{name}.key" if number == self.current else f"{name}.v{number}.key"


def fingerprint(recipient: str) -> str:
    """A short id of a recipient: the first 16 hex digits of SHA-256 of its ``age1...`` text."""
    return hashlib.sha256(recipient.encode("ascii")).hexdigest()[:FINGERPRINT_HEX_CHARS]


def new_meta(
    roles: Iterable[tuple[Role, str]],
    *,
    created_at: str,
    node_recipient: str,
    node_signing_key: bytes,
    protected: bool,
) -> Meta:
    """The metadata of a fresh keyring: each role with key version 1 (role, recipient)."""
    entries = [
        {
            "name": role.name,
            "authority": role.authority.label,
            "current": 1,
            "versions": [{"version": 1, "recipient": recipient, "created_at": created_at}],
        }
        for role, recipient in roles
    ]
    return {
        "format": KEYRING_FORMAT,
        "protected": protected,
        "node_recipient": node_recipient,
        "node_signing_key": node_signing_key.hex(),
        "roles": entries,
        "rotations": [],
    }


def parse_meta(data: bytes) -> tuple[Meta, dict[str, RoleKeys]]:
    """Parse keyring.json.

    Raises:
        KeyringError: not JSON, an unknown format, or malformed.
    """
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise KeyringError("keyring.json is not a readable keyring file") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        raise KeyringError("keyring.json has an unknown keyring format")
    return meta, roles_of(meta)


def roles_of(meta: Meta) -> dict[str, RoleKeys]:
    """The roles of a metadata map, checked against the invariants.

    Raises:
        KeyringError: the map is malformed.
    """
    try:
        out = {}
        for entry in meta["roles"]:
            role = Role(str(entry["name"]), Authority.parse(str(entry["authority"])))
            versions = tuple(
                KeyVersion(
                    int(v["version"]),
                    str(v["recipient"]),
                    str(v["created_at"]),
                    None if v.get("retired_at") is None else str(v["retired_at"]),
                )
                for v in entry["versions"]
            )
            out[role.name] = RoleKeys(role, int(entry["current"]), versions)
            if out[role.name].version(out[role.name].current).retired_at is not None:
                raise ValueError("the current version is retired")
        str(meta["node_recipient"])
        for rotation in meta.get("rotations", []):
            rk = out[str(rotation["role"])]
            if rk.current != int(rotation["to_version"]):
                raise ValueError("a rotation's target is not current")
            rk.version(int(rotation["from_version"]))
        return out
    except (KeyError, TypeError, ValueError, AttributeError):
        raise KeyringError("keyring.json is malformed") from None


def dump_meta(meta: Meta) -> bytes:
    """The stored form (always written as the current format)."""
    return (json.dumps({**meta, "format": KEYRING_FORMAT}, indent=2) + "\n").encode("utf-8")


def rotation_of(meta: Meta, role: str) -> dict[str, Any] | None:
    """The rotation of ``role`` in progress, or None."""
    for entry in meta.get("rotations", []):
        if entry.get("role") == role:
            return dict(entry)
    return None


def with_rotation_begun(meta: Meta, role: str, recipient: str, now: str) -> tuple[Meta, int, int]:
    """``meta`` with a new current version of ``role`` and its rotation recorded.

    Returns:
        The new map, the old version and the new one.

    Raises:
        KeyringError: a rotation of ``role`` is already in progress.
    """
    if rotation_of(meta, role) is not None:
        raise KeyringError(f"a rotation of role {role!r} is in progress; finish it first")
    out = copy.deepcopy(meta)
    entry = _role_entry(out, role)
    old = int(entry["current"])
    new = max(int(v["version"]) for v in entry["versions"]) + 1
    entry["versions"].append({"version": new, "recipient": recipient, "created_at": now})
    entry["current"] = new
    out.setdefault("rotations", []).append(
        {"role": role, "from_version": old, "to_version": new, "started_at": now}
    )
    return out, old, new


def with_rotation_finished(meta: Meta, role: str, now: str) -> tuple[Meta, int]:
    """``meta`` with the replaced version of ``role`` retired and its rotation cleared.

    Returns:
        The new map and the retired version.

    Raises:
        KeyringError: no rotation of ``role`` is in progress.
    """
    rotation = rotation_of(meta, role)
    if rotation is None:
        raise KeyringError(f"no rotation of role {role!r} is in progress")
    old = int(rotation["from_version"])
    out = copy.deepcopy(meta)
    for version in _role_entry(out, role)["versions"]:
        if int(version["version"]) == old:
            version["retired_at"] = now
    out["rotations"] = [r for r in out["rotations"] if r.get("role") != role]
    return out, old


def role_listing(
    meta: Meta, roles: dict[str, RoleKeys], held: Callable[[str, int], bool]
) -> list[dict[str, Any]]:
    """Every role with its versions, JSON-ready (``Keyring.listing`` documents the shape).

    ``held(role, version)`` says whether that identity file is on this node.
    """
    out = []
    for rk in roles.values():
        name = rk.role.name
        versions = [
            {
                "version": v.version,
                "recipient": v.recipient,
                "fingerprint": fingerprint(v.recipient),
                "created_at": v.created_at,
                "retired_at": v.retired_at,
                "current": v.version == rk.current,
                "held": v.retired_at is None and held(name, v.version),
            }
            for v in rk.versions
        ]
        out.append(
            {
                "name": name,
                "authority": rk.role.authority.label,
                "current": rk.current,
                "held": held(name, rk.current),
                "rotation": rotation_of(meta, name),
                "versions": versions,
            }
        )
    return out


def repair_plan(roles: dict[str, RoleKeys], file_names: Iterable[str]) -> list[RepairStep]:
    """What to do with the ``<role>.v<N>.key`` files an interrupted rotation left.

    ``<role>.v<current>.key`` is renamed onto ``<role>.key`` (a staged new identity after
    the commit point, or a second name of the same old one before it); a version file that
    keyring.json does not list, or lists as retired, is removed. Files of unknown roles and
    every other file are left alone.
    """
    steps: list[RepairStep] = []
    for name in sorted(file_names):
        match = VERSION_FILE.match(name)
        rk = roles.get(match["role"]) if match else None
        if match is None or rk is None:
            continue
        number = int(match["version"])
        known = {v.version: v for v in rk.versions}
        if number == rk.current:
            steps.append(("rename", name))
        elif number not in known or known[number].retired_at is not None:
            steps.append(("remove", name))
    return steps


def _role_entry(meta: Meta, role: str) -> dict[str, Any]:
    for entry in meta["roles"]:
        if entry["name"] == role:
            found: dict[str, Any] = entry
            return found
    raise KeyringError(f"keyring.json has no role {role!r}")
