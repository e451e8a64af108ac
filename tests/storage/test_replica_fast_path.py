"""The replica's fast path (issue 10): acknowledge after the durable store and index later
in batches (one decrypt, no second signature check), catch up after a crash from the
durable stale rows, verify once per envelope digest, and cache decrypted views by
(version, role, envelope digest) behind the role checks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from crypto.roles import DEFAULT_ROLES
from storage.address import LATEST, ContextName, parse
from storage.cache import envelope_digest
from storage.context_store import ContextStore, WriteRequest
from storage.envelope import Envelope, compress_payload
from storage.errors import CorruptRecord, Forbidden
from storage.index_queue import IndexQueue
from storage.index_sync import DRAIN_BATCH
from storage.record import ContextRecord
from storage.replica import Replica
from storage.schema import INDEX_DIRTY_PREFIX, PurgeMarker
from tests.storage.conftest import FakeClock

BE = "backend_developer"


def _address(i: int) -> str:
    return f"ucxl://agent{i}:{BE}@chorus:fast/*^/src/file{i}.py"


def _ctx(i: int) -> ContextName:
    return parse(_address(i)).context()


def _open_pair(root: Path, clock: FakeClock) -> tuple[ContextStore, ContextStore]:
    """A replica ``a`` and a writer ``b`` that share role identities; ``a`` trusts ``b``."""
    if not (root / "a").exists():
        ContextStore.init(root / "a", DEFAULT_ROLES)
    a = ContextStore.open(root / "a", clock_ms=clock)
    if not (root / "b").exists():
        identities = {r.name: a.keyring.current_identity(r.name) for r in DEFAULT_ROLES}
        ContextStore.init(root / "b", DEFAULT_ROLES, role_identities=identities)
    b = ContextStore.open(root / "b", clock_ms=clock)
    a.trust_signer(b.keyring.signer.public_key)
    return a, b


@pytest.fixture
def pair(tmp_path: Path, clock: FakeClock) -> Iterator[tuple[ContextStore, ContextStore]]:
    a, b = _open_pair(tmp_path, clock)
    yield a, b
    a.close()
    b.close()


def _write(b: ContextStore, i: int, summary: str) -> bytes:
    """A new version of context ``i`` written on ``b``: its envelope bytes."""
    ref = b.store(_address(i), ContextRecord.from_fields({"summary": summary}))
    data = b.versions.version(_ctx(i), ref.version_id)
    assert data is not None
    return data


def _stale_rows(store: ContextStore) -> list[bytes]:
    return [key for key, _ in store.kv.scan(INDEX_DIRTY_PREFIX)]


def _found(store: ContextStore, text: str) -> list[str]:
    return [hit.context for hit in store.search(text)]


class Counted:
    """Counts the calls of a function it wraps."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.fn(*args, **kwargs)


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> Counted:
    counted = Counted(Envelope.check_signature)

    def check_signature(self: Envelope) -> None:
        counted(self)

    monkeypatch.setattr(Envelope, "check_signature", check_signature)
    return counted


def _decrypts(store: ContextStore, monkeypatch: pytest.MonkeyPatch) -> Counted:
    counted = Counted(store.keyring.decrypt)
    monkeypatch.setattr(store.keyring, "decrypt", counted)
    return counted


# -- index off the acknowledgement path ----------------------------------------------------


def test_apply_acknowledges_before_indexing_and_the_drain_catches_up(
    pair: tuple[ContextStore, ContextStore], clock: FakeClock
) -> None:
    a, b = pair
    stored, heads = Replica(a).apply([_write(b, 1, "quokka one"), _write(b, 2, "quokka two")])
    assert stored == [True, True]
    assert heads == {_ctx(1).canonical(): 1, _ctx(2).canonical(): 1}
    assert len(_stale_rows(a)) == 2  # durable, in the versions' own batch
    assert a.index.lag() == {"pending": 2, "lag_s": 0.0}
    clock.advance(250)
    assert a.index.lag() == {"pending": 2, "lag_s": 0.25}
    assert _found(a, "quokka") == []  # within the freshness bound, not yet indexed
    assert a.index.drain() == 2
    assert sorted(_found(a, "quokka")) == sorted([_ctx(1).canonical(), _ctx(2).canonical()])
    assert a.index.lag() == {"pending": 0, "lag_s": 0.0}
    assert _stale_rows(a) == []


def test_a_search_past_the_freshness_bound_drains_first(
    pair: tuple[ContextStore, ContextStore], clock: FakeClock
) -> None:
    a, b = pair
    Replica(a).apply([_write(b, 1, "wombat")])
    clock.advance(int(a.config.index.refresh_interval_s * 1000))
    assert _found(a, "wombat") == [_ctx(1).canonical()]
    assert a.index.lag()["pending"] == 0


def test_a_held_version_arriving_again_queues_nothing(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    a, b = pair
    replica = Replica(a)
    data = _write(b, 1, "echidna")
    replica.apply([data])
    a.index.drain()
    assert replica.apply([data])[0] == [False]  # merge by union: already held
    assert a.index.lag()["pending"] == 0
    assert _stale_rows(a) == []


def test_the_drain_decrypts_once_and_never_checks_a_signature_again(
    pair: tuple[ContextStore, ContextStore],
    signature_checks: Counted,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a, b = pair
    blobs = [_write(b, i, f"platypus {i}") for i in range(3)]
    decrypts = _decrypts(a, monkeypatch)
    signature_checks.calls = 0
    Replica(a).apply(blobs)
    assert (signature_checks.calls, decrypts.calls) == (3, 0)  # verified where it entered
    a.index.drain()
    assert (signature_checks.calls, decrypts.calls) == (3, 3)  # one decrypt per version
    view = a.retrieve(_address(1), as_role=BE)
    assert view.summary == "platypus 1"
    assert (signature_checks.calls, decrypts.calls) == (3, 3)  # the drain's view is cached


def test_a_cluster_get_after_the_drain_does_not_decrypt_again(
    pair: tuple[ContextStore, ContextStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The drain caches its view under the digest of the stored bytes, the key a
    coordinator's ``Replica.view`` of a merged set looks up."""
    a, b = pair
    replica = Replica(a)
    older = _write(b, 1, "echidna zero")  # a version only b holds
    data = _write(b, 1, "echidna")
    replica.apply([data])
    decrypts = _decrypts(a, monkeypatch)
    a.index.drain()
    assert decrypts.calls == 1
    rows = [(row.version_id, row.data) for row in a.versions.versions(_ctx(1))]
    view = replica.view(_ctx(1), rows, LATEST, as_role=BE, allowed_roles=None, where="t")
    assert view.summary == "echidna"
    assert decrypts.calls == 1
    merged = sorted([*rows, (Envelope.decode(older).version_id, older)])
    view = replica.view(_ctx(1), merged, LATEST, as_role=BE, allowed_roles=None, where="t")
    assert (view.summary, view.version, decrypts.calls) == ("echidna", 2, 1)
    assert a.retrieve(_address(1), as_role=BE).version == 1  # the local set's rank


def test_a_restart_indexes_what_a_crash_left_queued(tmp_path: Path, clock: FakeClock) -> None:
    a, b = _open_pair(tmp_path, clock)
    Replica(a).apply([_write(b, 1, "bilby")])
    a.index._queue = IndexQueue()  # as if the process died: the memory queue is lost
    a.close()  # the watermark is even clean: only the durable stale row remembers
    b.close()
    clock.advance(400)
    a, b = _open_pair(tmp_path, clock)  # trusts b's key after open, as a node does
    try:
        assert a.index.lag() == {"pending": 1, "lag_s": 0.4}  # queued again, with its age
        clock.advance(600)  # the freshness bound has passed: a search drains first
        assert _found(a, "bilby") == [_ctx(1).canonical()]
        assert _stale_rows(a) == []
        assert a.index.lag() == {"pending": 0, "lag_s": 0.0}
    finally:
        a.close()
        b.close()


def test_a_context_purged_while_queued_is_not_indexed(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    a, b = pair
    replica = Replica(a)
    data = _write(b, 1, "numbat")
    replica.apply([data])
    head = replica.head(_ctx(1))
    assert head is not None
    replica.apply_purge(_ctx(1), replica.purge_marker_for(head.latest, "admin@test"))
    a.index.drain()
    assert _found(a, "numbat") == []
    assert a.index.lag()["pending"] == 0


def test_a_replicated_write_does_not_wait_for_an_index_commit(
    pair: tuple[ContextStore, ContextStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write is stored and queued while a drain's index commit is still running (the
    queue has its own lock); the next drain indexes it."""
    a, b = pair
    replica = Replica(a)
    replica.apply([_write(b, 1, "wombat one")])
    first, second = _write(b, 2, "wombat two"), _write(b, 3, "wombat three")
    index = a.index._index  # the backend under IndexSync
    entered, release = threading.Event(), threading.Event()
    commit = index.commit

    def blocked_commit() -> None:
        entered.set()
        release.wait()
        commit()

    monkeypatch.setattr(index, "commit", blocked_commit)
    drain = threading.Thread(target=a.index.drain)
    drain.start()
    stored: list[list[bool | None]] = []
    try:
        assert entered.wait(timeout=60)  # a guard against a hang, not a timing
        writer = threading.Thread(target=lambda: stored.append(replica.apply([first])[0]))
        writer.start()
        writer.join(timeout=60)  # with one lock for queue and index, it would wait here
        done_while_committing = not writer.is_alive()
    finally:
        release.set()
        drain.join()
    assert done_while_committing
    stored.append(replica.apply([second])[0])
    assert stored == [[True], [True]]
    monkeypatch.setattr(index, "commit", commit)
    assert a.index.lag()["pending"] == 2
    a.index.drain()
    assert sorted(_found(a, "wombat")) == sorted(_ctx(i).canonical() for i in (1, 2, 3))
    assert _stale_rows(a) == []


def test_commit_and_close_drain_everything(tmp_path: Path, clock: FakeClock) -> None:
    a, b = _open_pair(tmp_path, clock)
    Replica(a).apply([_write(b, i, f"dingo {i}") for i in range(3)])
    a.index.commit()
    assert len(_found(a, "dingo")) == 3
    Replica(a).apply([_write(b, 7, "dingo 7")])
    a.close()
    b.close()
    a, b = _open_pair(tmp_path, clock)
    try:
        assert len(_found(a, "dingo")) == 4
    finally:
        a.close()
        b.close()


# -- verify once ---------------------------------------------------------------------------


def _forged(data: bytes) -> bytes:
    env = Envelope.decode(data)
    return replace(env, ciphertext=env.ciphertext[:-1] + bytes([env.ciphertext[-1] ^ 1])).encode()


def test_a_forged_copy_is_refused_after_a_good_copy_of_the_version_verified(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    a, b = pair
    replica = Replica(a)
    good = _write(b, 1, "good")
    forged = _forged(good)
    assert replica.apply([good])[0] == [True]
    assert replica.apply([forged])[0] == [None]  # same version id, other bytes: checked
    assert replica.refused == 1
    vid = Envelope.decode(good).version_id
    kwargs: dict[str, Any] = {"as_role": BE, "allowed_roles": None, "where": "t"}
    assert replica.view(_ctx(1), [(vid, good)], LATEST, **kwargs).summary == "good"
    with pytest.raises(CorruptRecord):
        replica.view(_ctx(1), [(vid, forged)], LATEST, **kwargs)


def test_a_merged_row_is_verified_once_then_remembered(
    pair: tuple[ContextStore, ContextStore], signature_checks: Counted
) -> None:
    a, b = pair
    data = _write(b, 1, "from another replica")  # never applied on a
    vid = Envelope.decode(data).version_id
    replica = Replica(a)
    signature_checks.calls = 0
    for _ in range(3):
        view = replica.view(_ctx(1), [(vid, data)], LATEST, as_role=BE, allowed_roles=None,
                            where="t")  # fmt: skip
        assert view.summary == "from another replica"
    assert signature_checks.calls == 1
    assert a.reader.verified.seen(envelope_digest(data))


def test_a_remembered_digest_does_not_lift_the_trust_check(
    tmp_path: Path, clock: FakeClock
) -> None:
    a, b = _open_pair(tmp_path, clock)
    try:
        data = _write(b, 1, "untrusted")
        a._trusted_keys.clear()  # b's key is no longer trusted here
        a.reader.verified.add(envelope_digest(data))  # its signature did verify before
        vid = Envelope.decode(data).version_id
        with pytest.raises(CorruptRecord, match="untrusted"):
            Replica(a).view(_ctx(1), [(vid, data)], LATEST, as_role=BE, allowed_roles=None,
                            where="t")  # fmt: skip
        assert Replica(a).apply([data])[0] == [None]
    finally:
        a.close()
        b.close()


def test_a_row_under_the_wrong_version_id_is_refused(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    a, b = pair
    first, second = _write(b, 1, "one"), _write(b, 1, "two")
    vid1 = Envelope.decode(first).version_id
    vid2 = Envelope.decode(second).version_id
    with pytest.raises(CorruptRecord, match="wrong key"):
        Replica(a).view(_ctx(1), [(vid1, first), (vid2, first)], LATEST, as_role=BE,
                        allowed_roles=None, where="t")  # fmt: skip


# -- the view cache ------------------------------------------------------------------------


def _view(
    replica: Replica, rows: list[tuple[str, bytes]], *, allowed: tuple[str, ...] | None = None
) -> Any:
    return replica.view(_ctx(1), rows, LATEST, as_role=None, allowed_roles=allowed, where="t")


def test_a_cached_view_still_needs_the_role(
    pair: tuple[ContextStore, ContextStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    data = _write(b, 1, "secret")
    rows = [(Envelope.decode(data).version_id, data)]
    replica = Replica(a)
    decrypts = _decrypts(a, monkeypatch)
    assert _view(replica, rows, allowed=(BE,)).summary == "secret"
    assert _view(replica, rows, allowed=(BE,)).summary == "secret"
    assert decrypts.calls == 1  # the second read is served from the cache
    with pytest.raises(Forbidden):
        _view(replica, rows, allowed=("observer",))  # read_only may not read it
    with pytest.raises(Forbidden):
        replica.view(_ctx(1), rows, LATEST, as_role="observer", allowed_roles=None, where="t")


def test_a_resealed_copy_gets_its_own_view(pair: tuple[ContextStore, ContextStore]) -> None:
    a, b = pair
    data = _write(b, 1, "sealed first")
    env = Envelope.decode(data)
    payload, compression = compress_payload(
        ContextRecord.from_fields({"summary": "sealed again"}).encode_secret()
    )
    resealed = replace(
        env, ciphertext=b.keyring.encrypt(payload, env.readers), compression=compression,
        seal_epoch=2,
    ).sealed(b.keyring.signer)  # fmt: skip
    replica = Replica(a)
    assert _view(replica, [(env.version_id, data)]).summary == "sealed first"
    assert _view(replica, [(env.version_id, resealed.encode())]).summary == "sealed again"
    assert _view(replica, [(env.version_id, data)]).summary == "sealed first"


def test_purge_empties_the_view_cache(pair: tuple[ContextStore, ContextStore]) -> None:
    a, b = pair
    data = _write(b, 1, "to be purged")
    replica = Replica(a)
    replica.apply([data])
    vid = Envelope.decode(data).version_id
    _view(replica, [(vid, data)])
    assert a.cache.stats().entries >= 1
    replica.apply_purge(_ctx(1), replica.purge_marker_for(vid, "admin@test"))
    assert a.cache.stats().entries == 0


def test_a_cached_view_shows_the_rank_of_the_set_it_was_read_from(
    pair: tuple[ContextStore, ContextStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    first, second = _write(b, 1, "v1"), _write(b, 1, "v2")
    row1 = (Envelope.decode(first).version_id, first)
    row2 = (Envelope.decode(second).version_id, second)
    replica = Replica(a)
    decrypts = _decrypts(a, monkeypatch)
    alone = _view(replica, [row2])
    merged = _view(replica, [row1, row2])
    assert (alone.version, merged.version) == (1, 2)
    assert merged.address.endswith("*~2/src/file1.py")
    assert merged.summary == "v2"
    assert decrypts.calls == 1


def test_bytes_sealed_here_are_not_checked_again(
    pair: tuple[ContextStore, ContextStore], signature_checks: Counted
) -> None:
    a, b = pair
    data = _write(b, 1, "sealed by the coordinator itself")
    replica = Replica(a)
    signature_checks.calls = 0
    replica.sealed_here(data)
    assert replica.apply([data])[0] == [True]
    assert replica.apply([_forged(data)])[0] == [None]  # other bytes are still checked
    assert signature_checks.calls == 1


def _write_many(b: ContextStore, count: int, word: str) -> list[bytes]:
    refs = b.store_batch(
        [WriteRequest(_address(i), ContextRecord.from_fields({"summary": f"{word} {i}"}))
         for i in range(count)]
    )  # fmt: skip
    found = [b.versions.version(_ctx(i), ref.version_id) for i, ref in enumerate(refs)]
    return [data for data in found if data is not None]


def test_a_drain_goes_in_batches(pair: tuple[ContextStore, ContextStore]) -> None:
    a, b = pair
    Replica(a).apply(_write_many(b, DRAIN_BATCH + 3, "kiwi"))
    assert a.index.drain(max_batches=1) == DRAIN_BATCH
    assert a.index.lag()["pending"] == 3
    assert len(_stale_rows(a)) == 3
    assert a.index.drain() == 3
    assert len(a.search("kiwi", limit=1000)) == DRAIN_BATCH + 3


def test_an_overflowed_queue_is_refilled_from_the_durable_rows(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    a, b = pair
    a.index._queue = IndexQueue(max_contexts=2)
    Replica(a).apply(_write_many(b, 5, "takahe"))
    assert a.index.lag()["pending"] == 2  # a lower bound: the rest lives in the rows
    assert len(_stale_rows(a)) == 5
    a.index.drain()
    assert len(_found(a, "takahe")) == 5
    assert _stale_rows(a) == []


def test_a_version_whose_signer_is_not_trusted_yet_waits_for_the_trust(
    tmp_path: Path, clock: FakeClock
) -> None:
    a, b = _open_pair(tmp_path, clock)
    Replica(a).apply([_write(b, 1, "kakapo")])
    a.index._queue = IndexQueue()  # as if the process died
    a.close()
    b.close()
    a = ContextStore.open(tmp_path / "a", clock_ms=clock)  # b's key is not trusted yet
    try:
        assert a.index.drain() == 1  # taken, but its signer is not trusted here yet
        assert _found(a, "kakapo") == []
        assert len(_stale_rows(a)) == 1  # kept for later
        assert a.index.lag()["pending"] == 0
        b = ContextStore.open(tmp_path / "b", clock_ms=clock)
        a.trust_signer(b.keyring.signer.public_key)  # the node learns its peers' keys
        b.close()
        assert a.index.lag()["pending"] == 1
        a.index.drain()
        assert _found(a, "kakapo") == [_ctx(1).canonical()]
        assert _stale_rows(a) == []
    finally:
        a.close()


def test_a_purge_keeps_versions_newer_than_its_marker(
    pair: tuple[ContextStore, ContextStore],
) -> None:
    """A restored backup's marker may be older than versions the replica holds: those stay,
    with the head and the index recomputed (VersionStore.purge)."""
    a, b = pair
    old, kept = _write(b, 1, "old words"), _write(b, 1, "newer words")
    replica = Replica(a)
    replica.apply([old, kept])
    old_id, kept_id = Envelope.decode(old).version_id, Envelope.decode(kept).version_id
    a.index.drain()
    marker = PurgeMarker(old_id, 0, "admin@test")
    assert replica.apply_purge(_ctx(1), marker) == 1
    assert [row.version_id for row in a.versions.versions(_ctx(1))] == [kept_id]
    head = a.versions.head(_ctx(1))
    assert head is not None
    assert (head.latest, head.count) == (kept_id, 1)
    assert a.versions.purge_marker(_ctx(1)) == marker
    a.index.commit()
    assert _found(a, "newer") == [_ctx(1).canonical()]
    assert replica.apply([old]) == ([None], {_ctx(1).canonical(): 1})  # covered: refused
