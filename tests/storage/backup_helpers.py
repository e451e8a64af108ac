"""Shared helpers of the backup tests: a populated store, its rows, and tar surgery."""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import pyrage
from pyrage import x25519

from crypto.keyring import read_identity_file
from crypto.roles import ADMIN_ROLE
from storage.context_store import ContextStore, WriteRequest
from storage.record import ContextRecord
from storage.schema import PURGE_PREFIX, VERSION_PREFIX


def address(i: int) -> str:
    """A concrete address of the default role backend_developer."""
    return f"ucxl://claude:backend_developer@chorus:auth/*^/src/mod{i:05d}.py"


def populate(store: ContextStore, count: int, *, seed: int = 7) -> dict[str, int]:
    """``count`` contexts; a third get a second version, every 7th is deleted, and
    context 3 is purged. Returns what was done."""
    rng = random.Random(seed)
    first = [
        WriteRequest(address(i), ContextRecord.from_fields({"summary": f"s{i}", "tags": ["t"]}))
        for i in range(count)
    ]
    store.store_batch(first)
    again = [
        WriteRequest(address(i), ContextRecord.from_fields({"summary": f"v2 {rng.random()}"}))
        for i in range(0, count, 3)
    ]
    store.store_batch(again)
    deleted = 0
    for i in range(1, count, 7):
        store.delete(address(i))
        deleted += 1
    store.purge(address(3))
    return {"contexts": count, "second": len(again), "deleted": deleted}


def rows(store: ContextStore) -> dict[bytes, bytes]:
    """Every version row and purge marker, raw (same ids, same signatures)."""
    found = dict(store.kv.scan(VERSION_PREFIX))
    found.update(store.kv.scan(PURGE_PREFIX))
    return found


def admin_identity(data_dir: Path) -> x25519.Identity:
    """The admin identity of a node."""
    return read_identity_file(data_dir / "keys" / f"{ADMIN_ROLE}.key")


def tar_members(archive: bytes) -> dict[str, bytes]:
    """The members of a tar, in order."""
    out = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as tar:
        for info in tar:
            handle = tar.extractfile(info)
            assert handle is not None
            out[info.name] = handle.read()
    return out


def tar_of(members: dict[str, bytes]) -> bytes:
    """A tar of ``members``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def reseal(path: Path, identity: x25519.Identity, edit: dict[str, bytes | None]) -> None:
    """Rewrite the backup at ``path`` with members replaced (None: removed), encrypted
    again to the same admin recipient (what anyone holding the recipient can do)."""
    members = tar_members(bytes(pyrage.decrypt(path.read_bytes(), [identity])))
    for name, data in edit.items():
        if data is None:
            del members[name]
        else:
            members[name] = data
    path.write_bytes(bytes(pyrage.encrypt(tar_of(members), [identity.to_public()])))
