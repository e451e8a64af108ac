"""Validated reading of the msgpack maps the metadata log and its snapshots are made of.

A pure helper of ``node.control.metadata`` (no I/O, no clock, no randomness): one reader
for commands from the log and for the snapshot codec, so both refuse the same things.

Must not know what the fields mean. Invariant: every reader returns a value of the asked
type within the asked bounds, or raises ``MalformedRaftData`` naming the field by its
dotted path (``member.name``, ``ring.weights``); it never raises anything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from node.control.raft_types import MalformedRaftData

MAX_INT = 2**63 - 1  # every integer in the metadata is a non-negative int64


def join(path: str, name: str) -> str:
    """The dotted path of ``name`` under ``path``."""
    return f"{path}.{name}" if path else name


class Fields:
    """A msgpack map read field by field; each getter raises ``MalformedRaftData``."""

    def __init__(self, raw: Any, path: str = "") -> None:
        if not isinstance(raw, Mapping):
            raise MalformedRaftData(f"{path or 'value'}: expected a map")
        self.raw: Mapping[Any, Any] = raw
        self.path = path

    def _get(self, name: str) -> Any:
        if name not in self.raw:
            raise MalformedRaftData(f"{join(self.path, name)}: missing")
        return self.raw[name]

    def has(self, name: str) -> bool:
        """Whether the field is present."""
        return name in self.raw

    def int_(self, name: str, lo: int = 0, hi: int = MAX_INT) -> int:
        """An integer in [lo, hi] (a boolean is not an integer)."""
        return check_int(self._get(name), join(self.path, name), lo, hi)

    def str_(self, name: str, max_len: int, *, empty: bool = False) -> str:
        """A string of at most ``max_len`` characters (non-empty unless ``empty``)."""
        return check_str(self._get(name), join(self.path, name), max_len, empty=empty)

    def bytes_(self, name: str, max_len: int) -> bytes:
        """A byte string of at most ``max_len`` bytes."""
        value = self._get(name)
        if not isinstance(value, bytes):
            raise MalformedRaftData(f"{join(self.path, name)}: expected bytes")
        if len(value) > max_len:
            raise MalformedRaftData(f"{join(self.path, name)}: longer than {max_len} bytes")
        return value

    def bool_(self, name: str) -> bool:
        """A boolean."""
        value = self._get(name)
        if not isinstance(value, bool):
            raise MalformedRaftData(f"{join(self.path, name)}: expected a boolean")
        return value

    def sub(self, name: str) -> Fields:
        """A nested map."""
        return Fields(self._get(name), join(self.path, name))

    def list_(self, name: str, max_len: int) -> list[Any]:
        """A list of at most ``max_len`` items (unchecked)."""
        value = self._get(name)
        if not isinstance(value, list):
            raise MalformedRaftData(f"{join(self.path, name)}: expected a list")
        if len(value) > max_len:
            raise MalformedRaftData(f"{join(self.path, name)}: more than {max_len} items")
        return value

    def int_map(
        self, name: str, key_max_len: int, lo: int, hi: int, max_items: int
    ) -> dict[str, int]:
        """A map of non-empty string keys to integers in [lo, hi]."""
        path = join(self.path, name)
        raw = Fields(self._get(name), path).raw
        if len(raw) > max_items:
            raise MalformedRaftData(f"{path}: more than {max_items} items")
        out: dict[str, int] = {}
        for key, value in raw.items():
            out[check_str(key, f"{path} key", key_max_len)] = check_int(
                value, f"{path}[{key}]", lo, hi
            )
        return out


def check_int(value: Any, path: str, lo: int = 0, hi: int = MAX_INT) -> int:
    """``value`` if it is an integer in [lo, hi]; else ``MalformedRaftData`` naming ``path``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedRaftData(f"{path}: expected an integer")
    if not lo <= value <= hi:
        raise MalformedRaftData(f"{path}: out of range [{lo}, {hi}]")
    return value


def check_str(value: Any, path: str, max_len: int, *, empty: bool = False) -> str:
    """``value`` if it is a string of the right length; else ``MalformedRaftData``."""
    if not isinstance(value, str):
        raise MalformedRaftData(f"{path}: expected a string")
    if len(value) > max_len or (not empty and not value):
        raise MalformedRaftData(f"{path}: expected {0 if empty else 1} to {max_len} characters")
    return value
