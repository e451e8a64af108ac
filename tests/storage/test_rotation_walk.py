"""storage.rotation's walk at speed: what it may skip and what it must still do.

A crash in the middle of a batch loses that batch only, and the resumed walk re-seals
every row exactly once; a walk stopped after a batch (a member's time budget) resumes
where it stopped; rows the role does not read are never touched; the rows are counted
once per rotation (the count lives in the cursor); a signature is verified once per
stored bytes (``VerifiedDigests``), never skipped for bytes that did not verify here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import msgpack
import pyrage
import pytest
from pyrage import x25519

from crypto.keyring import read_identity_file
from crypto.roles import ADMIN_ROLE
from crypto.seal_format import age_file_of
from storage import rotation
from storage.cache import envelope_digest
from storage.context_store import ContextStore
from storage.envelope import Envelope
from storage.record import ContextRecord
from storage.rotation import reseal_step, rotate_role
from storage.schema import (
    ROTATION_CURSOR_SCHEMA,
    VERSION_PREFIX,
    RotationCursor,
    rotation_cursor_key,
)
from tests.storage.conftest import FakeClock

BE = "backend_developer"


def _fill(store: ContextStore, clock: FakeClock, count: int = 24) -> None:
    """``count`` contexts, two of every three readable by BE (the others by observer and
    admin alone); then a pause past the tail margin (the tail pass finds nothing new)."""
    for i in range(count):
        address = f"ucxl://a{i}:{BE}@p:t{i % 4}/*^/f{i:03d}.md"
        readers = None if i % 3 else ["observer"]
        store.store(address, ContextRecord.from_fields({"summary": f"s{i}"}), readers=readers)
        clock.advance(10)
    clock.advance(120_000)


def _epoch(store: ContextStore, readers: tuple[str, ...]) -> int:
    """A re-seal's seal epoch: the sum of its recipients' current key versions."""
    current = {rk.role.name: rk.current for rk in store.keyring.role_keys()}
    return sum(current[name] for name in {*readers, ADMIN_ROLE})


def _rows(store: ContextStore) -> dict[bytes, bytes]:
    return dict(store.kv.scan(VERSION_PREFIX))


def _reads(env: Envelope) -> bool:
    return not env.tombstone and BE in env.readers


@pytest.fixture
def reopened() -> Iterator[list[ContextStore]]:
    stores: list[ContextStore] = []
    yield stores
    for store in stores:
        store.close()


class Crash(Exception):
    """Stands in for the process dying."""


def test_a_walk_crashed_mid_batch_resumes_and_reseals_every_row_exactly_once(
    store: ContextStore,
    data_dir: Path,
    clock: FakeClock,
    reopened: list[ContextStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fill(store, clock)
    before = _rows(store)
    keys = sorted(before)
    must = {k for k, data in before.items() if _reads(Envelope.decode(data))}
    in_second = len(must & set(keys[6:12]))
    assert in_second >= 2
    first = rotate_role(store, BE, batch_size=6, stop_after_batches=1)
    after_first = _rows(store)
    done_first = {k for k in before if after_first[k] != before[k]}
    assert done_first == must & set(keys[:6])
    assert first.rewritten == len(done_first)
    # the second batch dies at its last row to re-seal, the others sealed in memory:
    # nothing of it is written
    real_seal = store.keyring.seal
    calls = [0]

    def dying_seal(plaintext: bytes, readers: object) -> object:
        calls[0] += 1
        if calls[0] == in_second:
            raise Crash
        return real_seal(plaintext, readers)  # type: ignore[arg-type]

    monkeypatch.setattr(store.keyring, "seal", dying_seal)
    with pytest.raises(Crash):
        rotate_role(store, BE, batch_size=6)
    assert _rows(store) == after_first  # the batch in progress is lost, and only it
    store.close()

    again = ContextStore.open(data_dir, clock_ms=clock)
    reopened.append(again)
    second = rotate_role(again, BE, batch_size=6)
    assert second.resumed
    assert second.finished
    final = _rows(again)
    identity = read_identity_file(data_dir / "keys" / f"{BE}.key")
    assert first.rewritten + second.rewritten == len(must)  # each row re-sealed once
    for key, data in final.items():
        env = Envelope.decode(data)
        if key in must:
            assert env.seal_epoch == _epoch(again, env.readers)  # once: never raised twice
            pyrage.decrypt(age_file_of(env.ciphertext), [identity])
        else:
            assert data == before[key]  # not readable by BE: untouched
    for key in done_first:
        assert final[key] == after_first[key]  # the first batch is not redone
    assert again.retrieve("ucxl://a1:backend_developer@p:t1/*^/f001.md", as_role=BE).summary == (
        "s1"
    )


def test_a_stopped_step_resumes_where_it_stopped_and_leaves_other_rows_alone(
    store: ContextStore, clock: FakeClock
) -> None:
    _fill(store, clock)
    before = _rows(store)
    identity = x25519.Identity.generate()
    store.keyring.install_rotation(BE, identity, 2)
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return True  # every call stops after its first batch

    steps = []
    while not (step := reseal_step(store, BE, 2, trusted=lambda key: False, batch_size=5,
                                   stop=stop)).done:  # fmt: skip
        steps.append(step)
        assert step.scanned == min(5 * len(steps), 24)
    assert len(steps) == 5  # 24 rows, 5 a batch; the sixth call finds the end
    assert len(asked) == 5  # asked once per batch written, never before the first
    after = _rows(store)
    rewritten = 0
    for key, data in after.items():
        env = Envelope.decode(data)
        if _reads(env):
            rewritten += 1
            assert env.seal_epoch == _epoch(store, env.readers)
            pyrage.decrypt(age_file_of(env.ciphertext), [identity])
        else:
            assert data == before[key]
    assert rewritten == 16


def test_the_rows_are_counted_once_per_rotation(
    store: ContextStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(store, clock)
    store.keyring.install_rotation(BE, x25519.Identity.generate(), 2)
    counted: list[int] = []
    real_count = rotation._count_versions

    def counting(s: ContextStore) -> int:
        counted.append(1)
        return real_count(s)

    monkeypatch.setattr(rotation, "_count_versions", counting)
    steps = 0
    while not (step := reseal_step(store, BE, 2, trusted=lambda k: False, batch_size=4,
                                   max_batches=1)).done:  # fmt: skip
        steps += 1
        assert step.total == 24
    assert steps == 6
    assert len(counted) == 1


def test_a_cursor_written_before_it_kept_its_count_still_resumes(
    store: ContextStore, clock: FakeClock
) -> None:
    _fill(store, clock)
    rotate_role(store, BE, batch_size=8, stop_after_batches=1)
    cursor = RotationCursor.decode(store.kv.get(rotation_cursor_key(BE)) or b"")
    assert (cursor.scanned, cursor.total) == (8, 24)
    old_form = {  # the cursor's fields before ``total``
        "v": ROTATION_CURSOR_SCHEMA,
        "to_version": cursor.to_version,
        "after": cursor.after,
        "since_ms": cursor.since_ms,
        "scanned": cursor.scanned,
        "rewritten": cursor.rewritten,
    }
    store.kv.write([(rotation_cursor_key(BE), msgpack.packb(old_form, use_bin_type=True))])
    assert RotationCursor.decode(store.kv.get(rotation_cursor_key(BE)) or b"").total is None
    seen: list[tuple[int, int]] = []
    report = rotate_role(store, BE, batch_size=8, progress=lambda d, t: seen.append((d, t)))
    assert report.resumed
    assert report.finished
    assert report.scanned == 16  # from the old cursor on, not from the start
    assert seen[-1] == (24, 24)


def test_a_signature_is_verified_once_per_stored_bytes(
    store: ContextStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(store, clock)
    rows = _rows(store)
    readable = sorted(k for k, d in rows.items() if _reads(Envelope.decode(d)))
    verified = store.reader.verified
    for key in readable[:10]:  # these bytes verified here before (on arrival, say)
        verified.add(envelope_digest(rows[key]))
    forged_key = readable[-1]  # bytes that never verified, whose signature is wrong
    good = Envelope.decode(rows[forged_key])
    forged = replace(good, created_by="mallory").encode()
    store.kv.write([(forged_key, forged)])
    checked: list[str] = []
    real_check = Envelope.check_signature

    def counting(env: Envelope) -> None:
        checked.append(env.version_id)
        real_check(env)

    monkeypatch.setattr(Envelope, "check_signature", counting)
    report = rotate_role(store, BE, batch_size=50)  # its tail pass sees every row again
    assert report.finished
    assert report.skipped == 1
    vid = {key: Envelope.decode(rows[key]).version_id for key in readable}
    expected = Counter(vid[key] for key in readable[10:-1])  # once, in the main pass
    expected[vid[forged_key]] = 2  # failing, it is checked again by the tail pass
    assert Counter(checked) == expected  # known bytes and the re-seals: never checked
    after = _rows(store)
    assert after[forged_key] == forged  # never re-signed
    for key in readable[:-1]:
        assert not verified.seen(envelope_digest(rows[key]))  # replaced: forgotten
        assert verified.seen(envelope_digest(after[key]))  # signed here: remembered
    assert not verified.seen(envelope_digest(forged))
    view = store.retrieve("ucxl://a2:backend_developer@p:t2/*^/f002.md", as_role=BE)
    assert view.summary == "s2"
