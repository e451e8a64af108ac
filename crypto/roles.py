"""Roles and authority levels (ARCHITECTURE.md §5).

Owns: the role model, the default role set, and the two rules built on it: who reads a
record by default, and whether a role may read a record. Knows nothing about keys.
Invariants: there is always exactly one ``admin`` role, of ``master`` authority; role
names use ``A-Z a-z 0-9 _ -`` only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from crypto.errors import KeyringError

ADMIN_ROLE = "admin"
_ROLE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Authority(IntEnum):
    """Authority levels, higher value = more authority."""

    READ_ONLY = 1
    SUGGESTION = 2
    COORDINATION = 3
    DECISION = 4
    MASTER = 5

    @classmethod
    def parse(cls, text: str) -> Authority:
        """The level named ``text`` (``master``, ``decision``, ...).

        Raises:
            KeyringError: the name is not a level.
        """
        try:
            return cls[text.strip().upper()]
        except KeyError:
            levels = ", ".join(level.name.lower() for level in cls)
            raise KeyringError(f"unknown authority level {text!r} (one of {levels})") from None

    @property
    def label(self) -> str:
        """The lower-case name used in files and output."""
        return self.name.lower()


class UnknownRole(KeyringError):
    """A role that the keyring does not know."""

    def __init__(self, role: str) -> None:
        super().__init__(f"unknown role {role!r}")
        self.role = role


@dataclass(frozen=True)
class Role:
    """A role name and its authority."""

    name: str
    authority: Authority


DEFAULT_ROLES: tuple[Role, ...] = (
    Role(ADMIN_ROLE, Authority.MASTER),
    Role("senior_software_architect", Authority.DECISION),
    Role("backend_developer", Authority.SUGGESTION),
    Role("observer", Authority.READ_ONLY),
)


def validate_role_name(name: str) -> str:
    """Return ``name`` if it is a valid role name.

    Raises:
        KeyringError: it is not.
    """
    if not _ROLE_NAME.match(name):
        raise KeyringError(f"invalid role name {name!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return name


def parse_role_spec(spec: str) -> tuple[Role, ...]:
    """Parse ``--roles`` text: comma-separated ``name[:authority]`` (default ``suggestion``).

    The admin role is always added (as master) when the spec does not name it.

    Raises:
        KeyringError: a name or level is invalid, or a name repeats.
    """
    roles: list[Role] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, _, level = item.partition(":")
        authority = Authority.parse(level) if level else Authority.SUGGESTION
        roles.append(Role(validate_role_name(name.strip()), authority))
    if not any(role.name == ADMIN_ROLE for role in roles):
        roles.insert(0, Role(ADMIN_ROLE, Authority.MASTER))
    return RoleSet(roles).roles


class RoleSet:
    """An ordered, validated set of roles."""

    def __init__(self, roles: Iterable[Role]) -> None:
        self._by_name: dict[str, Role] = {}
        for role in roles:
            validate_role_name(role.name)
            if role.name in self._by_name:
                raise KeyringError(f"role {role.name!r} is listed twice")
            self._by_name[role.name] = role
        admin = self._by_name.get(ADMIN_ROLE)
        if admin is None or admin.authority is not Authority.MASTER:
            raise KeyringError("the role set needs an 'admin' role of master authority")

    @property
    def roles(self) -> tuple[Role, ...]:
        """The roles, in the order given."""
        return tuple(self._by_name.values())

    @property
    def names(self) -> tuple[str, ...]:
        """The role names, in the order given."""
        return tuple(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def get(self, name: str) -> Role:
        """The role called ``name``.

        Raises:
            UnknownRole: there is none.
        """
        role = self._by_name.get(name)
        if role is None:
            raise UnknownRole(name)
        return role

    def default_readers(self, role: str) -> tuple[str, ...]:
        """Who reads a record addressed to ``role`` when the writer names no readers.

        The role itself, every role of strictly higher authority, and admin; in role-set
        order.

        Raises:
            UnknownRole: ``role`` is not in the set.
        """
        own = self.get(role)
        return tuple(
            r.name
            for r in self._by_name.values()
            if r.name == own.name or r.authority > own.authority or r.name == ADMIN_ROLE
        )

    def readers(self, named: Sequence[str]) -> tuple[str, ...]:
        """Validate explicit readers and add admin (admin reads everything).

        Raises:
            UnknownRole: a named role is not in the set.
        """
        for name in named:
            self.get(name)
        ordered = dict.fromkeys([*named, ADMIN_ROLE])
        return tuple(ordered)

    def may_read(self, role: str, readers: Iterable[str]) -> bool:
        """Whether ``role`` may read a record whose reader list is ``readers``."""
        found = self._by_name.get(role)
        if found is None:
            return False
        return found.authority is Authority.MASTER or role in set(readers)
