"""crypto.audit on a real LevelDB: appending, reopening, and every kind of tampering."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import plyvel
import pytest

from crypto.audit import GENESIS_PREV, AuditEntry, AuditLog, entry_hash
from crypto.errors import AuditChainBroken, AuditError

ENTRIES = 6
LAST = ENTRIES - 1


class FakeClock:
    """Milliseconds that advance by one per reading."""

    def __init__(self) -> None:
        self.now_ms = 1_700_000_000_000

    def __call__(self) -> int:
        self.now_ms += 1
        return self.now_ms


@pytest.fixture
def raw_db(tmp_path: Path) -> Iterator[Any]:
    db = plyvel.DB(str(tmp_path / "db"), create_if_missing=True)
    yield db
    db.close()


@pytest.fixture
def db(raw_db: Any) -> Any:
    """The audit key range, as the storage layer would hand it over."""
    return raw_db.prefixed_db(b"audit/")


@pytest.fixture
def log(db: Any) -> AuditLog:
    """A log with ENTRIES entries."""
    audit = AuditLog(db, clock_ms=FakeClock())
    for i in range(ENTRIES):
        audit.append(f"agent/role@node-{i}", "store", f"ucxl://a/{i}", "ok")
    return audit


def _key(seq: int) -> bytes:
    return b"%016x" % seq


def _row(db: Any, seq: int) -> dict[str, Any]:
    value = db.get(_key(seq))
    assert value is not None
    row: dict[str, Any] = msgpack.unpackb(value, raw=False)
    return row


def _pack(entry: AuditEntry) -> bytes:
    """An entry in the documented row format, built independently of crypto.audit."""
    return bytes(msgpack.packb({"v": 1, **entry.__dict__}, use_bin_type=True))


def _forge(seq: int, prev: bytes, actor: str = "mallory") -> AuditEntry:
    """A self-consistent entry, as an attacker who knows the format would write it."""
    entry = AuditEntry(seq, 1, actor, "delete", None, "ok", prev, b"")
    return AuditEntry(**{**entry.__dict__, "hash": entry_hash(entry)})


def _broken(db: Any) -> tuple[int, str]:
    with pytest.raises(AuditChainBroken) as caught:
        AuditLog(db, clock_ms=FakeClock()).verify()
    return caught.value.seq, caught.value.reason


# --- the happy path -----------------------------------------------------------------------


def test_empty_log_verifies(db: Any) -> None:
    """A fresh log has no entries and verifies as 0."""
    audit = AuditLog(db, clock_ms=FakeClock())
    assert (audit.verify(), audit.tail()) == (0, [])


def test_tail_of_a_single_entry(db: Any) -> None:
    """One entry is found (plyvel's reverse iterator misses a first row equal to start)."""
    audit = AuditLog(db, clock_ms=FakeClock())
    entry = audit.append("agent/role@node", "store", None, "ok")
    assert audit.tail() == [entry]


def test_append_tail_and_reopen_continue_the_chain(db: Any, log: AuditLog) -> None:
    """Entries chain from 32 zero bytes; a reopened log continues where it stopped."""
    first, *_, last = log.tail(100)
    assert (first.seq, first.prev) == (0, GENESIS_PREV)
    assert [e.seq for e in log.tail(2)] == [LAST - 1, LAST]
    reopened = AuditLog(db, clock_ms=FakeClock())
    entry = reopened.append("client:alice", "retrieve", None, "not-found")
    assert (entry.seq, entry.prev) == (ENTRIES, last.hash)
    assert reopened.verify() == ENTRIES + 1
    assert entry.to_json()["prev"] == last.hash.hex()


def test_rows_have_the_documented_format(db: Any, log: AuditLog) -> None:
    """A row is the v1 msgpack map whose hash covers every other field."""
    row = _row(db, 2)
    assert set(row) == {"v", "seq", "ts_ms", "actor", "op", "address", "outcome", "prev", "hash"}
    assert row["address"] == "ucxl://a/2"
    entry = AuditEntry(**{k: v for k, v in row.items() if k != "v"})
    assert entry_hash(entry) == row["hash"]
    assert msgpack.unpackb(_pack(entry), raw=False) == row
    assert msgpack.unpackb(db.get(b"head")) == {"v": 1, "seq": LAST, "hash": log.tail(1)[0].hash}


def test_append_into_caller_batch_commits_with_the_data(raw_db: Any) -> None:
    """With a batch, the audit rows land only when the caller writes the batch."""
    audit = AuditLog(raw_db, clock_ms=FakeClock(), prefix=b"audit/")
    batch = raw_db.write_batch()
    batch.put(b"data/record-1", b"ciphertext")
    entry = audit.append("agent/role@node", "store", "ucxl://r/1", "ok", batch=batch)
    assert raw_db.get(b"audit/" + _key(0)) is None
    batch.write()
    assert raw_db.get(b"data/record-1") == b"ciphertext"
    assert audit.tail() == [entry]
    assert AuditLog(raw_db, clock_ms=FakeClock(), prefix=b"audit/").verify() == 1


def test_append_many_chains_like_single_appends(db: Any) -> None:
    """``append_many`` writes its entries in one batch, chained exactly as one ``append``
    each would; an invalid entry among them appends nothing."""
    audit = AuditLog(db, clock_ms=FakeClock())
    audit.append("client:alice", "retrieve", None, "ok")
    entries = audit.append_many(
        [("a@n", "store", f"ucxl://r/{i}", "ok") for i in range(5)] + [("b@n", "store", None, "x")]
    )
    assert [e.seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert [e.prev for e in entries[1:]] == [e.hash for e in entries[:-1]]
    assert audit.tail(6) == entries
    assert audit.verify() == 7
    with pytest.raises(AuditError):
        audit.append_many([("a@n", "store", None, "ok"), ("", "store", None, "ok")])
    assert audit.verify() == 7
    assert audit.append_many([]) == []
    after = audit.append("client:alice", "retrieve", None, "ok")
    assert (after.seq, after.prev) == (7, entries[-1].hash)
    assert AuditLog(db, clock_ms=FakeClock()).verify() == 8


def test_concurrent_appends_keep_one_chain(db: Any) -> None:
    """Appends from 8 threads get distinct seqs and form one valid chain."""
    audit = AuditLog(db, clock_ms=FakeClock())

    def work(worker: int) -> None:
        for i in range(25):
            audit.append(f"worker-{worker}", "store", f"ucxl://{worker}/{i}", "ok")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert audit.verify() == 200


def test_append_refuses_empty_fields(db: Any) -> None:
    """An entry without actor, op or outcome is refused."""
    with pytest.raises(AuditError):
        AuditLog(db, clock_ms=FakeClock()).append("", "store", None, "ok")


# --- tampering ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3, LAST])
def test_edited_field_is_detected(db: Any, log: AuditLog, k: int) -> None:
    """Changing a field of entry k in place (hash left as it was) -> "edited" at k."""
    row = _row(db, k)
    row["outcome"] = "denied"
    db.put(_key(k), msgpack.packb(row, use_bin_type=True))
    assert _broken(db) == (k, "edited")


@pytest.mark.parametrize("k", [0, 3, LAST - 1, LAST])
def test_entry_replaced_by_a_consistent_forgery_is_detected(db: Any, log: AuditLog, k: int) -> None:
    """Replacing entry k with a self-hashed forgery linked to k-1 -> "edited" at k."""
    db.put(_key(k), _pack(_forge(k, _row(db, k)["prev"])))
    assert _broken(db) == (k, "edited")


def test_garbage_row_is_edited(db: Any, log: AuditLog) -> None:
    """A row that is not msgpack at all -> "edited" at its seq."""
    db.put(_key(2), b"\xc1 not msgpack")
    assert _broken(db) == (2, "edited")


@pytest.mark.parametrize("k", [0, 1, 3])
def test_deleted_middle_entry_is_detected(db: Any, log: AuditLog, k: int) -> None:
    """Deleting entry k -> "deleted" at k."""
    db.delete(_key(k))
    assert _broken(db) == (k, "deleted")


def test_deleted_last_entry_is_detected_through_the_head(db: Any, log: AuditLog) -> None:
    """Deleting the last entry -> "deleted" at its seq (the head still names it)."""
    db.delete(_key(LAST))
    assert _broken(db) == (LAST, "deleted")


def test_deleted_head_is_detected(db: Any, log: AuditLog) -> None:
    """Deleting the head row too: opening refuses, and the break is reported."""
    db.delete(b"head")
    assert _broken(db)[1] == "deleted"


def test_deleted_tail_entries_and_head_rolled_back_is_not_detectable(
    db: Any, log: AuditLog
) -> None:
    """The documented limit: a consistent rewrite of the suffix and head goes unseen."""
    db.delete(_key(LAST))
    previous = _row(db, LAST - 1)
    head = {"v": 1, "seq": LAST - 1, "hash": previous["hash"]}
    db.put(b"head", msgpack.packb(head, use_bin_type=True))
    assert AuditLog(db, clock_ms=FakeClock()).verify() == LAST


@pytest.mark.parametrize("k", [0, 2, LAST])
def test_inserted_entry_shifting_the_rest_is_detected(db: Any, log: AuditLog, k: int) -> None:
    """A forged entry at k, with k.. moved up one (head updated) -> "inserted" at k."""
    for seq in range(LAST, k - 1, -1):
        db.put(_key(seq + 1), db.get(_key(seq)))
    db.put(_key(k), _pack(_forge(k, _row(db, k + 1)["prev"])))
    head = msgpack.unpackb(db.get(b"head"))
    db.put(b"head", msgpack.packb({**head, "seq": LAST + 1}, use_bin_type=True))
    assert _broken(db) == (k, "inserted")


def test_inserted_entry_with_bad_link_is_detected(db: Any, log: AuditLog) -> None:
    """The same insertion with a made-up prev -> still "inserted" at k."""
    for seq in range(LAST, 1, -1):
        db.put(_key(seq + 1), db.get(_key(seq)))
    db.put(_key(2), _pack(_forge(2, b"\x01" * 32)))
    assert _broken(db) == (2, "inserted")


def test_forged_entry_after_the_head_is_detected(db: Any, log: AuditLog) -> None:
    """A well-linked forged entry appended past the head -> "inserted" at its seq."""
    last = log.tail(1)[0]
    db.put(_key(ENTRIES), _pack(_forge(ENTRIES, last.hash)))
    assert _broken(db) == (ENTRIES, "inserted")


def test_row_that_is_not_an_entry_key_is_inserted(db: Any, log: AuditLog) -> None:
    """A row with a non-entry key inside the entry range -> "inserted"."""
    db.put(_key(2) + b"x", _pack(_forge(2, GENESIS_PREV)))
    assert _broken(db) == (3, "inserted")


@pytest.mark.parametrize("k", [0, 2, LAST - 1])
def test_swapped_entries_are_detected(db: Any, log: AuditLog, k: int) -> None:
    """Swapping the rows of entries k and k+1 -> "reordered" at k."""
    a, b = db.get(_key(k)), db.get(_key(k + 1))
    db.put(_key(k), b)
    db.put(_key(k + 1), a)
    assert _broken(db) == (k, "reordered")


def test_entry_moved_to_another_key_is_reordered(db: Any, log: AuditLog) -> None:
    """Moving entry 1's row to key 4 (dropping 4) -> "reordered" at 1."""
    db.put(_key(4), db.get(_key(1)))
    db.delete(_key(1))
    assert _broken(db) == (1, "reordered")


def test_tail_refuses_an_unreadable_row(db: Any, log: AuditLog) -> None:
    """tail does not silently skip a damaged entry."""
    db.put(_key(LAST), b"garbage")
    with pytest.raises(AuditError):
        log.tail(3)
