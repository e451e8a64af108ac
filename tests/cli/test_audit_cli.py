"""``slurp audit``: every operation is logged with its actor and outcome, the hash chain
verifies, and tampering with the LevelDB rows is detected and located by entry (seq).

The tamper tests edit ``DATA_DIR/db`` with plyvel while no command holds it open; the row
format is ``crypto.audit``'s: key ``a/`` + ``%016x`` seq, value a msgpack map whose
``hash`` covers every other field; ``a/head`` holds the last seq and hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgpack
import plyvel
import pytest

from storage.context_store import ContextStore
from storage.errors import Forbidden
from storage.record import ContextRecord
from storage.schema import AUDIT_PREFIX
from tests.cli.conftest import DEV, Slurp

AUDIT_BROKEN = "UCXL-500-AUDIT_BROKEN"
FORBIDDEN = "UCXL-403-FORBIDDEN"
NOT_FOUND = "UCXL-404-NOT_FOUND"
MISSING = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/missing.py"
HEAD = AUDIT_PREFIX + b"head"
GENESIS = "00" * 32


def entry_key(seq: int) -> bytes:
    """The row key of audit entry ``seq``."""
    return AUDIT_PREFIX + b"%016x" % seq


@contextmanager
def raw_db(data_dir: Path) -> Iterator[Any]:
    """The node's LevelDB, opened directly (no command may hold it meanwhile)."""
    db = plyvel.DB(str(data_dir / "db"))
    try:
        yield db
    finally:
        db.close()


def read_entry(db: Any, seq: int) -> dict[str, Any]:
    """The msgpack map of entry ``seq``."""
    value = db.get(entry_key(seq))
    assert value is not None
    entry = msgpack.unpackb(value, raw=False)
    assert isinstance(entry, dict)
    return entry


def write_entry(db: Any, entry: dict[str, Any]) -> None:
    db.put(entry_key(entry["seq"]), msgpack.packb(entry, use_bin_type=True))


def rehash(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with a hash recomputed over its fields (what a careful forger does)."""
    fields = {k: entry[k] for k in sorted(entry) if k != "hash"}
    digest = hashlib.sha256(msgpack.packb(fields, use_bin_type=True)).digest()
    return {**entry, "hash": digest}


def ops_of(entries: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["op"], e["outcome"]) for e in entries]


@pytest.fixture
def logged(slurp: Slurp) -> Slurp:
    """A node whose log holds put, get, a forbidden get, delete, purge (seq 0..4).

    Made through the ContextStore API in one open (the CLI test above covers the commands).
    """
    with ContextStore.open(slurp.data_dir) as store:
        store.store(DEV, ContextRecord.from_fields({"summary": "audited"}))
        store.retrieve(DEV)
        with pytest.raises(Forbidden):
            store.retrieve(DEV, as_role="observer")
        store.delete(DEV)
        store.purge(DEV)
    return slurp


# -- tail and verify -----------------------------------------------------------------------


def test_every_operation_is_logged_in_order_with_actor_and_outcome(slurp: Slurp) -> None:
    node = slurp.json("stats")["node_id"]
    assert slurp.json("audit", "tail") == []
    assert slurp.json("audit", "verify") == {"verified": 0, "ok": True}

    first = slurp.json("put", DEV, "--summary", "audited")["address"]
    slurp.json("get", DEV)
    slurp.error("get", DEV, "--as", "observer", code=FORBIDDEN, exit_code=2)
    slurp.error("get", MISSING, code=NOT_FOUND, exit_code=2)
    slurp.json("delete", DEV)
    slurp.error("delete", MISSING, code=NOT_FOUND, exit_code=2)
    slurp.json("purge", DEV, "--yes")
    slurp.error("purge", DEV, "--yes", code=NOT_FOUND, exit_code=2)
    slurp.json("ls", "ucxl://any:any@chorus:auth/*^")  # not an audited operation
    slurp.json("stats")

    entries = slurp.json("audit", "tail", "-n", "100")
    writer = f"claude/backend_developer@{node}"
    expected = [
        (writer, "store", first, "ok"),
        (f"backend_developer@{node}", "retrieve", first, "ok"),
        (f"observer@{node}", "retrieve", DEV, FORBIDDEN),
        (f"-@{node}", "retrieve", MISSING, NOT_FOUND),
        (writer, "delete", DEV, "ok"),
        (writer, "delete", MISSING, NOT_FOUND),
        (f"admin@{node}", "purge", DEV, "ok"),
        (f"admin@{node}", "purge", DEV, NOT_FOUND),
    ]
    assert [(e["actor"], e["op"], e["address"], e["outcome"]) for e in entries] == expected
    assert [e["seq"] for e in entries] == list(range(len(expected)))
    for entry in entries:
        assert set(entry) == {"seq", "ts_ms", "actor", "op", "address", "outcome", "prev", "hash"}
    assert entries[0]["prev"] == GENESIS
    for before, after in pairwise(entries):
        assert after["prev"] == before["hash"]
        assert after["ts_ms"] >= before["ts_ms"]

    newest = slurp.json("audit", "tail", "-n", "2")
    assert newest == entries[-2:]
    assert slurp.json("audit", "verify") == {"verified": len(expected), "ok": True}


def test_key_operations_are_logged(slurp: Slurp) -> None:
    slurp.seed([(DEV, {"summary": "s"})])
    split = slurp.json("keys", "split")
    slurp.json("keys", "combine", input="\n".join(split["shares"][:3]))
    slurp.error(
        "keys", "combine", input=split["shares"][0], code="UCXL-400-SHARES_INVALID", exit_code=2
    )
    slurp.ok("keys", "rotate", "observer", "--json")
    assert ops_of(slurp.json("audit", "tail"))[1:] == [
        ("keys.split", "ok"),
        ("keys.combine", "ok"),
        ("keys.combine", "failed"),
        ("keys.rotate", "ok"),
    ]
    assert slurp.json("audit", "verify")["verified"] == 5


def test_tail_and_verify_text_output(logged: Slurp) -> None:
    out = logged.ok("audit", "tail", "-n", "3").stdout
    for header in ("seq", "time", "actor", "op", "address", "outcome"):
        assert header in out
    assert FORBIDDEN in out
    assert "delete" in out
    assert "purge" in out
    assert "store" not in out  # older than the last three
    assert logged.ok("audit", "verify").stdout == "audit log intact: 5 entries verified\n"


# -- tampering -----------------------------------------------------------------------------


def _hide_the_failure(db: Any) -> None:
    entry = read_entry(db, 2)
    assert entry["outcome"] == FORBIDDEN
    write_entry(db, {**entry, "outcome": "ok"})


def _change_the_actor_and_rehash(db: Any) -> None:
    write_entry(db, rehash({**read_entry(db, 2), "actor": "admin@elsewhere"}))


def _delete_a_middle_entry(db: Any) -> None:
    db.delete(entry_key(2))


def _delete_the_last_entry(db: Any) -> None:
    db.delete(entry_key(4))


def _swap_two_entries(db: Any) -> None:
    one, two = db.get(entry_key(1)), db.get(entry_key(2))
    db.put(entry_key(1), two)
    db.put(entry_key(2), one)


@pytest.mark.parametrize(
    ("tamper", "seq", "reason"),
    [
        (_hide_the_failure, 2, "edited"),
        (_change_the_actor_and_rehash, 2, "edited"),
        (_delete_a_middle_entry, 2, "deleted"),
        (_delete_the_last_entry, 4, "deleted"),
        (_swap_two_entries, 1, "reordered"),
    ],
    ids=["edit-outcome", "edit-and-rehash", "delete-middle", "delete-last", "swap"],
)
def test_verify_detects_and_locates_tampering(
    logged: Slurp, tamper: Callable[[Any], None], seq: int, reason: str
) -> None:
    assert logged.json("audit", "verify") == {"verified": 5, "ok": True}
    with raw_db(logged.data_dir) as db:
        tamper(db)

    error = logged.error("audit", "verify", code=AUDIT_BROKEN, exit_code=1)
    assert f"at entry {seq} ({reason})" in error["message"]
    assert error["field"] == "audit"
    result = logged.run("audit", "verify")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith(f"{AUDIT_BROKEN}: the audit log is broken at entry {seq} ")

    # the node keeps working, still logging, and verify keeps pointing at the same entry
    again = logged.json("put", DEV, "--summary", "after the tampering")
    assert logged.json("get", DEV)["summary"] == "after the tampering"
    assert logged.json("stats")["audit"] == "ok"  # the head row is intact: appends go on
    assert logged.json("audit", "tail", "-n", "2")[-1]["address"] == again["address"]
    error = logged.error("audit", "verify", code=AUDIT_BROKEN, exit_code=1)
    assert f"at entry {seq} ({reason})" in error["message"]


def test_a_deleted_head_row_is_reported_and_the_node_keeps_working(logged: Slurp) -> None:
    with raw_db(logged.data_dir) as db:
        db.delete(HEAD)

    assert logged.json("stats")["audit"].startswith("broken: ")
    error = logged.error("audit", "verify", code=AUDIT_BROKEN, exit_code=1)
    assert "at entry 5 (deleted)" in error["message"]
    assert "head row missing" in error["message"]
    logged.error("audit", "tail", code=AUDIT_BROKEN, exit_code=1)
    logged.json("put", DEV, "--summary", "still serving")
    assert logged.json("get", DEV)["summary"] == "still serving"


def test_the_log_is_one_row_per_entry_plus_a_head(logged: Slurp) -> None:
    """The layout the tamper tests rely on: ``a/<seq as %016x>`` rows and ``a/head``."""
    with raw_db(logged.data_dir) as db:
        rows = [key for key, _ in db.iterator(prefix=AUDIT_PREFIX)]
    assert rows == [*(entry_key(seq) for seq in range(5)), HEAD]
    assert logged.json("audit", "verify") == {"verified": 5, "ok": True}
