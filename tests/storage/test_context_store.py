"""The ContextStore end to end on real LevelDB, age and tantivy (one node, embedded)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crypto.signing import Signer
from storage.address import ContextName, parse
from storage.context_store import ContextStore, WriteRequest
from storage.envelope import Envelope
from storage.errors import (
    CorruptRecord,
    Forbidden,
    InvalidAddress,
    InvalidPayload,
    NotFound,
    TemporalOutOfRange,
)
from storage.record import ContextRecord
from tests.storage.conftest import FakeClock

JWT = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"
JWT_CTX = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"


def rec(summary: str, **fields: object) -> ContextRecord:
    return ContextRecord.from_fields({"summary": summary, **fields})


def at(address: str, temporal: str) -> str:
    return address.replace("/*^/", f"/{temporal}/", 1)


def test_versions_and_temporal_navigation(store: ContextStore, clock: FakeClock) -> None:
    refs = []
    for i in range(1, 5):
        refs.append(store.store(JWT, rec(f"v{i}")))
        clock.advance(60_000)
    assert [r.version for r in refs] == [1, 2, 3, 4]
    assert refs[2].address == at(JWT, "*~3")
    cases = {"*^": "v4", "*~": "v1", "*~2": "v2", "~~1": "v3", "~~": "v3", "~~0": "v4", "^^": "v2"}
    for temporal, summary in cases.items():
        view = store.retrieve(at(JWT, temporal))
        assert view.summary == summary, temporal
    start_ms = clock.now_ms - 4 * 60_000  # v1 was written here, v2 a minute later
    instant = datetime.fromtimestamp((start_ms + 30_000) / 1000, tz=UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert store.retrieve(at(JWT, instant)).summary == "v1"
    exact = datetime.fromtimestamp((start_ms + 60_000) / 1000, tz=UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert store.retrieve(at(JWT, exact)).summary == "v2"  # at or before
    for temporal in ("*~5", "~~4", "^^4", "2000-01-01T00:00:00Z"):
        with pytest.raises(TemporalOutOfRange):
            store.retrieve(at(JWT, temporal))


def test_record_fields_survive_the_round_trip(store: ContextStore) -> None:
    record = rec(
        "jwt",
        purpose="auth",
        content="body " * 400,
        insights=["a", "b"],
        tags=["auth", "security"],
        technologies=["python"],
        metadata={"lines": 42},
        confidence=0.9,
    )
    store.store(JWT, record)
    view = store.retrieve(JWT)
    assert view.fields["content"] == "body " * 400
    assert view.fields["metadata"] == {"lines": 42}
    assert view.tags == ("auth", "security")
    assert view.to_json()["address"] == at(JWT, "*~1")
    assert view.to_json()["version"] == 1


def test_writes_must_be_concrete_and_latest(store: ContextStore) -> None:
    with pytest.raises(InvalidAddress) as wild:
        store.store("ucxl://any:backend_developer@chorus:auth/*^/x", rec("s"))
    assert wild.value.field == "address"
    with pytest.raises(InvalidAddress) as temporal:
        store.store(at(JWT, "*~1"), rec("s"))
    assert temporal.value.field == "temporal"


def test_a_parsed_address_is_written_as_its_string_is(store: ContextStore) -> None:
    """An ``Address`` parsed at the edge and its string write the same way (parse once)."""
    first = store.store(parse(JWT), rec("typed"))
    second = store.store_batch([WriteRequest(JWT, rec("text")), WriteRequest(parse(JWT), rec("t"))])
    assert [first.version, *[ref.version for ref in second]] == [1, 2, 3]
    assert store.retrieve(JWT).summary == "t"
    with pytest.raises(InvalidAddress) as wild:
        store.store(parse("ucxl://any:backend_developer@chorus:auth/*^/x"), rec("s"))
    assert wild.value.field == "address"
    with pytest.raises(InvalidAddress) as temporal:
        store.store(parse(at(JWT, "*~1")), rec("s"))
    assert temporal.value.field == "temporal"


def test_default_readers_and_forbidden(store: ContextStore) -> None:
    store.store(JWT, rec("dev note"))
    view = store.retrieve(JWT)
    assert view.readers == ("admin", "senior_software_architect", "backend_developer")
    assert view.read_as == "backend_developer"
    assert store.retrieve(JWT, as_role="senior_software_architect").summary == "dev note"
    assert store.retrieve(JWT, as_role="admin").summary == "dev note"
    with pytest.raises(Forbidden):
        store.retrieve(JWT, as_role="observer")


def test_explicit_readers_and_unknown_roles(store: ContextStore) -> None:
    store.store(JWT, rec("for observers"), readers=["observer"])
    assert store.retrieve(JWT, as_role="observer").summary == "for observers"
    with pytest.raises(Forbidden):
        store.retrieve(JWT, as_role="backend_developer")
    with pytest.raises(InvalidPayload, match="--role") as unknown:
        store.store("ucxl://claude:architect@chorus:auth/*^/x", rec("s"))
    assert unknown.value.field == "roles"
    with pytest.raises(InvalidPayload):
        store.store(JWT, rec("s"), readers=["nobody"])
    with pytest.raises(Forbidden):
        store.retrieve(JWT, as_role="nobody")


def test_wildcard_reads_take_the_latest_updated_match(
    store: ContextStore, clock: FakeClock
) -> None:
    a = "ucxl://claude:backend_developer@chorus:auth/*^/a.py"
    b = "ucxl://gpt:backend_developer@chorus:auth/*^/a.py"
    store.store(a, rec("A"))
    clock.advance(1000)
    store.store(b, rec("B"))
    assert store.retrieve("ucxl://any:any@chorus:auth/*^/a.py").summary == "B"
    clock.advance(1000)
    store.store(a, rec("A2"))
    assert store.retrieve("ucxl://any:backend_developer@chorus:any/*^/a.py").summary == "A2"
    with pytest.raises(NotFound):
        store.retrieve("ucxl://any:any@other:any/*^/a.py")


def test_list_with_wildcards_and_path_prefix(store: ContextStore) -> None:
    for path in ("src/a.py", "src/b.py", "docs/x.md"):
        store.store(f"ucxl://claude:backend_developer@chorus:auth/*^/{path}", rec(path))
    store.store("ucxl://claude:backend_developer@bzzz:auth/*^/src/a.py", rec("other"))
    found = [c.context for c in store.list_contexts("ucxl://any:any@chorus:any/*^/src")]
    assert found == [
        "ucxl://claude:backend_developer@chorus:auth/*^/src/a.py",
        "ucxl://claude:backend_developer@chorus:auth/*^/src/b.py",
    ]
    assert len(store.list_contexts("ucxl://any:any@any:any/*^")) == 4


def test_delete_is_a_tombstone(store: ContextStore) -> None:
    store.store(JWT, rec("v1"))
    ref = store.delete(JWT)
    assert ref.version == 2
    with pytest.raises(NotFound):
        store.retrieve(JWT)
    with pytest.raises(NotFound):
        store.retrieve(at(JWT, "*~2"))
    assert store.retrieve(at(JWT, "*~1")).summary == "v1"
    assert [h.kind for h in store.history(JWT)] == ["put", "tombstone"]
    with pytest.raises(NotFound):
        store.delete(JWT)
    assert store.list_contexts("ucxl://any:any@any:any/*^") == []
    assert len(store.list_contexts("ucxl://any:any@any:any/*^", include_deleted=True)) == 1
    store.store(JWT, rec("v3"))
    assert store.retrieve(JWT).version == 3


def test_purge_removes_everything_and_refuses_resurrection(store: ContextStore) -> None:
    store.store(JWT, rec("secret"))
    old = store.versions.versions(_ctx(JWT))
    assert store.purge(JWT) == 1
    with pytest.raises(NotFound):
        store.history(JWT)
    # a replica or repair offering the purged version again is refused
    assert store.versions.append([Envelope.decode(old[0].data)]) == [False]
    with pytest.raises(NotFound):
        store.retrieve(JWT)
    assert store.stats()["purged_contexts"] == 1
    store.store(JWT, rec("new life"))
    assert store.retrieve(JWT).summary == "new life"


def test_purge_needs_the_admin_identity(store: ContextStore) -> None:
    store.store(JWT, rec("s"))
    (store.keyring.keys_dir / "admin.key").unlink()
    with pytest.raises(Forbidden, match="admin"):
        store.purge(JWT)


def _ctx(address: str) -> ContextName:
    return parse(address).context()


def test_concurrent_versions_are_siblings_and_both_kept(store: ContextStore) -> None:
    base = store.store(JWT, rec("base"))
    ctx = _ctx(JWT)
    siblings = []
    for node, summary in (("aaaa", "left"), ("bbbb", "right")):
        template = Envelope.decode(store.versions.version(ctx, base.version_id) or b"")
        vid = f"{int(base.version_id[:12], 16) + 5:012x}-000000-{node}"
        payload = rec(summary).encode_secret()
        env = Envelope(
            context=template.context,
            version_id=vid,
            parent=base.version_id,
            kind="put",
            created_at_ms=template.created_at_ms + 5,
            created_by=f"x@{node}",
            readers=template.readers,
            tags=(),
            technologies=(),
            influences=(),
            influenced_by=(),
            expires_at_ms=None,
            compression="none",
            ciphertext=store.keyring.encrypt(payload, template.readers),
        ).sealed(store.keyring.signer)
        siblings.append(env)
    assert store.versions.append(siblings) == [True, True]
    assert store.versions.append(siblings) == [False, False]  # merge by union: idempotent
    history = store.history(JWT)
    assert [h.siblings for h in history] == [0, 2, 2]
    assert {store.retrieve(at(JWT, "*~2")).summary, store.retrieve(at(JWT, "*~3")).summary} == {
        "left",
        "right",
    }


def test_untrusted_signer_is_refused(store: ContextStore) -> None:
    ref = store.store(JWT, rec("s"))
    ctx = _ctx(JWT)
    env = Envelope.decode(store.versions.version(ctx, ref.version_id) or b"")
    forged = Envelope(
        **{**env.__dict__, "version_id": f"{int(ref.version_id[:12], 16) + 1:012x}-000000-evil"}
    )
    store.versions.append([forged.sealed(Signer.generate())])
    with pytest.raises(CorruptRecord, match="untrusted"):
        store.retrieve(JWT)


def test_search_filters_roles_and_deletes(store: ContextStore) -> None:
    store.store(JWT, rec("token signing with ed25519", tags=["auth"]))
    store.store(
        "ucxl://claude:backend_developer@chorus:billing/*^/src/pay.py",
        rec("payment token flow", tags=["billing"]),
    )
    store.store(
        "ucxl://claude:observer@bzzz:auth/*^/readme.md",
        rec("public token notes"),
        readers=["observer"],
    )
    store.index.commit()
    assert {h.context for h in store.search("token")} == {
        JWT_CTX,
        "ucxl://claude:backend_developer@chorus:billing/*^/src/pay.py",
        "ucxl://claude:observer@bzzz:auth/*^/readme.md",
    }
    assert [h.address for h in store.search("token", project="chorus", task="auth")] == [
        at(JWT, "*~1")
    ]
    assert [h.context for h in store.search("token", tags=["billing"])] == [
        "ucxl://claude:backend_developer@chorus:billing/*^/src/pay.py"
    ]
    assert [h.context for h in store.search("token", as_role="observer")] == [
        "ucxl://claude:observer@bzzz:auth/*^/readme.md"
    ]
    store.delete(JWT)
    store.index.commit()
    assert JWT_CTX not in {h.context for h in store.search("token")}
    with pytest.raises(InvalidPayload):
        store.search("token", limit=0)


def test_search_sees_the_newest_version_only(store: ContextStore) -> None:
    store.store(JWT, rec("alpha"))
    store.store(JWT, rec("beta"))
    store.index.commit()
    assert store.search("alpha") == []
    assert [h.version for h in store.search("beta")] == [2]


def test_ttl_expiry_hides_then_sweeps(store: ContextStore, clock: FakeClock) -> None:
    store.store(JWT, rec("durable"))
    clock.advance(1000)
    store.store(JWT, rec("short-lived", ttl=10))
    assert store.retrieve(JWT).summary == "short-lived"
    clock.advance(11_000)
    assert store.retrieve(JWT).summary == "durable"
    assert len(store.history(JWT)) == 1
    assert store.sweep_expired() == 1
    assert store.versions.head(_ctx(JWT)) is not None
    assert [h.kind for h in store.history(JWT)] == ["put"]


def test_batch_store_is_one_synced_write(store: ContextStore) -> None:
    before = store.group_stats.syncs
    refs = store.store_batch(
        [WriteRequest(f"ucxl://a:backend_developer@p:t/*^/f{i}", rec(f"r{i}")) for i in range(20)]
        + [WriteRequest("ucxl://a:backend_developer@p:t/*^/f0", rec("again"))]
    )
    assert store.group_stats.syncs == before + 1
    assert [r.version for r in refs[:2]] == [1, 1]
    assert refs[-1].version == 2
    assert store.retrieve("ucxl://a:backend_developer@p:t/*~1/f0").summary == "r0"
    results = store.retrieve_batch(
        ["ucxl://a:backend_developer@p:t/*^/f1", "ucxl://a:b@p:t/*^/nope"]
    )
    assert not isinstance(results[0], Exception)
    assert isinstance(results[1], NotFound)


def test_batch_with_one_bad_request_writes_nothing(store: ContextStore) -> None:
    with pytest.raises(InvalidAddress):
        store.store_batch(
            [
                WriteRequest("ucxl://a:backend_developer@p:t/*^/ok", rec("ok")),
                WriteRequest("ucxl://any:backend_developer@p:t/*^/bad", rec("bad")),
            ]
        )
    assert store.list_contexts("ucxl://any:any@any:any/*^") == []


def test_cache_hits_and_invalidation(store: ContextStore) -> None:
    store.store(JWT, rec("v1"))
    store.retrieve(JWT, as_role="backend_developer")
    store.retrieve(JWT, as_role="backend_developer")
    stats = store.cache.stats()
    assert stats.hits >= 1
    store.store(JWT, rec("v2"))
    assert store.retrieve(JWT, as_role="backend_developer").summary == "v2"
    assert store.cache.stats().invalidations >= 1


def test_reopen_keeps_everything_and_the_clock_moves_on(data_dir: Path, clock: FakeClock) -> None:
    with ContextStore.open(data_dir, clock_ms=clock) as first:
        ref = first.store(JWT, rec("v1"))
    clock.now_ms -= 60_000  # the wall clock went backwards across the restart
    with ContextStore.open(data_dir, clock_ms=clock) as second:
        ref2 = second.store(JWT, rec("v2"))
        assert ref2.version_id > ref.version_id
        assert second.retrieve(JWT).summary == "v2"
        second.index.commit()
        assert [h.version for h in second.search("v2")] == [2]


def test_missing_index_is_rebuilt_on_open(data_dir: Path, clock: FakeClock) -> None:
    with ContextStore.open(data_dir, clock_ms=clock) as first:
        first.store(JWT, rec("rebuild me please"))
    shutil.rmtree(data_dir / "index")
    with ContextStore.open(data_dir, clock_ms=clock) as second:
        assert [h.context for h in second.search("rebuild")] == [JWT_CTX]


def test_corrupt_index_is_rebuilt_on_open(data_dir: Path, clock: FakeClock) -> None:
    with ContextStore.open(data_dir, clock_ms=clock) as first:
        first.store(JWT, rec("rebuild me please"))
    (data_dir / "index" / "FORMAT").write_text("garbage")
    with ContextStore.open(data_dir, clock_ms=clock) as second:
        assert [h.context for h in second.search("rebuild")] == [JWT_CTX]


def test_unclean_watermark_catches_up(data_dir: Path, clock: FakeClock) -> None:
    with ContextStore.open(data_dir, clock_ms=clock) as first:
        first.store(JWT, rec("first words"))
    watermark = data_dir / "index" / "WATERMARK"
    with ContextStore.open(data_dir, clock_ms=clock) as second:
        second.store("ucxl://b:backend_developer@p:t/*^/x", rec("second words"))
        second.index._index.clear()  # as if a crash lost the uncommitted index batch
        second.index._index.commit()
    watermark.write_text('{"indexed_through_ms": 0, "clean": false}')
    with ContextStore.open(data_dir, clock_ms=clock) as third:
        assert len(third.search("words")) == 2


def test_rebuild_index_reports_progress(store: ContextStore) -> None:
    for i in range(5):
        store.store(f"ucxl://a:backend_developer@p:t/*^/f{i}", rec(f"doc {i}"))
    seen: list[tuple[int, int]] = []
    assert store.rebuild_index(lambda done, total: seen.append((done, total))) == 5
    assert seen[-1] == (5, 5)
    assert len(store.search("doc")) == 5


def test_stats(store: ContextStore) -> None:
    store.store(JWT, rec("v1"))
    store.store(JWT, rec("v2"))
    stats = store.stats()
    assert stats["contexts"] == 1
    assert stats["versions"] == 2
    assert stats["index"]["backend"] == "tantivy"
    assert {r["name"] for r in stats["roles"]} >= {"admin", "observer"}


def test_open_without_init_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="slurp init"):
        ContextStore.open(tmp_path / "nothing")
