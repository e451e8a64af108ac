"""storage.rotation: re-encrypting a role's records, resuming after a crash, retiring keys."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from crypto.keyring import read_identity_file
from crypto.roles import ADMIN_ROLE, UnknownRole
from crypto.seal_format import age_file_of
from storage.address import parse
from storage.context_store import ContextStore
from storage.datadir import ConfigError, KeysConfig, load_keys_config
from storage.envelope import Envelope, compress_payload
from storage.errors import NotFound
from storage.key_age import rotation_warnings
from storage.record import ContextRecord
from storage.rotation import RotationReport, rotate_role
from storage.schema import VERSION_PREFIX, rotation_cursor_key
from storage.versions import VersionId
from tests.storage.conftest import FakeClock

BE = "backend_developer"
ROLES = (ADMIN_ROLE, "senior_software_architect", BE, "observer")


def _address(i: int, role: str, project: str = "chorus") -> str:
    return f"ucxl://agent{i}:{role}@{project}:task{i % 3}/*^/src/file{i}.py"


def _populate(store: ContextStore, clock: FakeClock) -> dict[str, str]:
    """32 contexts over the four roles, a second version of some, one deleted.

    Returns the live addresses and the summary each should read as.
    """
    expected = {}
    for i in range(8):
        for role in ROLES:
            address = _address(i, role)
            store.store(address, ContextRecord.from_fields({"summary": f"{role} {i}"}))
            expected[address] = f"{role} {i}"
            clock.advance(10)
    for i in (1, 2):
        address = _address(i, BE)
        store.store(address, ContextRecord.from_fields({"summary": f"second {i}"}))
        expected[address] = f"second {i}"
    store.delete(_address(7, "observer"))
    del expected[_address(7, "observer")]
    clock.advance(120_000)  # the rotation starts later than the writes (see TAIL_MARGIN_MS)
    return expected


def _rows(store: ContextStore) -> dict[bytes, bytes]:
    return dict(store.kv.scan(VERSION_PREFIX))


def _readable_by(env: Envelope, role: str) -> bool:
    return not env.tombstone and (role == ADMIN_ROLE or role in env.readers)


def _check_everything_readable(store: ContextStore, expected: dict[str, str]) -> None:
    roles = store.keyring.role_set
    for address, summary in expected.items():
        readers = store.retrieve(address).readers
        for role in ROLES:
            if roles.may_read(role, readers):
                assert store.retrieve(address, as_role=role).summary == summary, (address, role)


@pytest.fixture
def reopen() -> Iterator[list[ContextStore]]:
    """Stores opened by the test (closed at the end)."""
    opened: list[ContextStore] = []
    yield opened
    for store in opened:
        store.close()


def test_rotation_resumes_after_a_crash_and_retires_the_old_key(
    store: ContextStore, data_dir: Path, clock: FakeClock, reopen: list[ContextStore]
) -> None:
    expected = _populate(store, clock)
    keys = data_dir / "keys"
    old_identity = read_identity_file(keys / f"{BE}.key")
    before = _rows(store)

    first = rotate_role(store, BE, batch_size=5, stop_after_batches=3)
    assert (first.finished, first.resumed, first.batches, first.scanned) == (False, False, 3, 15)
    assert store.keyring.rotation_in_progress(BE) is not None
    assert (keys / f"{BE}.v1.key").exists()
    store.close()  # the "crash": nothing else of the rotation runs

    store = ContextStore.open(data_dir, clock_ms=clock)
    reopen.append(store)
    seen: list[tuple[int, int]] = []
    second = rotate_role(store, BE, batch_size=5, progress=lambda d, t: seen.append((d, t)))
    assert second.resumed
    assert second.finished
    assert second.scanned == len(before) - 15
    assert seen[-1] == (len(before), len(before))
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    new_identity = read_identity_file(keys / f"{BE}.key")
    assert str(new_identity.to_public()) == store.keyring.recipient(BE)
    after = _rows(store)
    assert after.keys() == before.keys()
    must_rotate = 0
    for key, data in after.items():
        env = Envelope.decode(data)
        env.check_signature()
        old_env = Envelope.decode(before[key])
        assert replace(env, seal_epoch=0).header() == old_env.header()
        if _readable_by(env, BE):
            must_rotate += 1
            assert env.seal_epoch > old_env.seal_epoch == 0
            assert pyrage.decrypt(age_file_of(env.ciphertext), [new_identity])
            with pytest.raises(pyrage.DecryptError):
                pyrage.decrypt(age_file_of(env.ciphertext), [old_identity])
        else:
            assert data == before[key]  # not rewritten
    assert first.rewritten + second.rewritten == must_rotate
    assert first.skipped + second.skipped == 0
    _check_everything_readable(store, expected)

    assert not (keys / f"{BE}.v1.key").exists()
    meta = json.loads((keys / "keyring.json").read_text())
    be = next(entry for entry in meta["roles"] if entry["name"] == BE)
    assert be["current"] == 2
    assert be["versions"][0]["retired_at"]
    assert "retired_at" not in be["versions"][1]
    assert meta["rotations"] == []
    assert store.kv.get(rotation_cursor_key(BE)) is None


def test_rotating_admin_touches_every_record(store: ContextStore, clock: FakeClock) -> None:
    expected = _populate(store, clock)
    keys = store.data_dir.keys
    old_admin = read_identity_file(keys / "admin.key")
    report = rotate_role(store, ADMIN_ROLE, batch_size=7)
    assert report == RotationReport(ADMIN_ROLE, 1, 2, 35, 34, 0, report.batches, False, True)
    new_admin = read_identity_file(keys / "admin.key")
    for data in _rows(store).values():
        env = Envelope.decode(data)
        if not env.tombstone:
            assert pyrage.decrypt(age_file_of(env.ciphertext), [new_admin])
            with pytest.raises(pyrage.DecryptError):
                pyrage.decrypt(age_file_of(env.ciphertext), [old_admin])
    _check_everything_readable(store, expected)


def test_writes_during_a_rotation_are_covered(store: ContextStore, clock: FakeClock) -> None:
    """A write after begin goes to the new key; one encrypted to the old key that commits
    behind the cursor (in flight when the rotation began) is caught by the tail pass."""
    _populate(store, clock)
    old_recipient = store.keyring.recipient(BE)
    rotate_role(store, BE, batch_size=5, stop_after_batches=2)
    late = store.store(_address(20, BE), ContextRecord.from_fields({"summary": "late"}))
    # an in-flight write: encrypted before the rotation began, committed now, sorting first
    payload, compression = compress_payload(
        ContextRecord.from_fields({"summary": "x"}).encode_secret()
    )
    stale_ct = pyrage.encrypt(
        payload,
        [
            x25519.Recipient.from_str(r)
            for r in (old_recipient, store.keyring.recipient(ADMIN_ROLE))
        ],
    )
    ctx = parse(_address(21, BE, project="aaa")).context()
    env = Envelope(
        context=ctx.canonical(),
        version_id=str(VersionId(clock.now_ms, 0, store.keyring.node_id)),
        parent=None,
        kind="put",
        created_at_ms=clock.now_ms,
        created_by="test",
        readers=(BE, ADMIN_ROLE),
        tags=(),
        technologies=(),
        influences=(),
        influenced_by=(),
        expires_at_ms=None,
        compression=compression,
        ciphertext=bytes(stale_ct),
    ).sealed(store.keyring.signer)
    assert store.versions.append([env]) == [True]
    assert store.kv.get(rotation_cursor_key(BE)) is not None

    report = rotate_role(store, BE, batch_size=5)
    assert report.finished
    new_identity = read_identity_file(store.data_dir.keys / f"{BE}.key")
    _, late_ct = store.retrieve_encrypted(late.address)
    _, stale_now = store.retrieve_encrypted(ctx.canonical())
    for ciphertext in (late_ct, stale_now):
        assert pyrage.decrypt(ciphertext, [new_identity])
    assert store.retrieve(ctx.canonical(), as_role=BE).summary == "x"


def test_a_context_purged_mid_rotation_stays_purged(store: ContextStore, clock: FakeClock) -> None:
    _populate(store, clock)
    rotate_role(store, BE, batch_size=5, stop_after_batches=1)
    victim = _address(6, BE)
    store.purge(victim)
    rotate_role(store, BE, batch_size=5)
    with pytest.raises(NotFound):
        store.retrieve(victim)
    assert not any(b"file6.py" in key and b"backend_developer" in key for key in _rows(store))


def test_tampered_rows_are_skipped_never_resigned(store: ContextStore, clock: FakeClock) -> None:
    _populate(store, clock)
    key, data = next(
        (k, d) for k, d in _rows(store).items() if _readable_by(Envelope.decode(d), BE)
    )
    env = Envelope.decode(data)
    forged = replace(env, tags=("forged",))
    store.kv.write([(key, forged.encode())])
    report = rotate_role(store, BE)
    assert report.skipped == 1
    assert report.finished
    assert store.kv.get(key) == forged.encode()


def test_rotation_validates_its_arguments(store: ContextStore) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        rotate_role(store, BE, batch_size=0)
    with pytest.raises(UnknownRole):
        rotate_role(store, "nobody")


def test_rotating_an_empty_store_just_replaces_the_key(store: ContextStore) -> None:
    report = rotate_role(store, "observer")
    assert (report.scanned, report.rewritten, report.finished) == (0, 0, True)
    assert store.keyring.listing()["roles"][3]["current"] == 2


# -- rotation due ------------------------------------------------------------------------


def test_rotation_warnings(store: ContextStore) -> None:
    keyring = store.keyring
    now = datetime.now(UTC)
    assert rotation_warnings(keyring, 90, now) == []
    later = now + timedelta(days=91)
    warnings = rotation_warnings(keyring, 90, later)
    assert len(warnings) == 4
    assert all("91 days old" in w and "max_key_age_days = 90" in w for w in warnings)
    assert f"slurp keys rotate {BE}" in warnings[2]
    assert rotation_warnings(keyring, 0, later) == []
    rotate_role(store, BE)
    assert (
        "role 'backend_developer' (version 2) is 91 days old"
        in rotation_warnings(keyring, 90, later)[2]
    )
    keyring.begin_rotation("observer")
    unfinished = rotation_warnings(keyring, 90, now)
    assert unfinished == [
        "the key rotation of role 'observer' (version 1 -> 2) is unfinished: "
        "run `slurp keys rotate observer`"
    ]


def test_keys_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    assert load_keys_config(path) == KeysConfig(max_key_age_days=90)
    path.write_text("[keys]\nmax_key_age_days = 30\n")
    assert load_keys_config(path).max_key_age_days == 30
    for bad in ("-1", "true", '"90"', "1.5"):
        path.write_text(f"[keys]\nmax_key_age_days = {bad}\n")
        with pytest.raises(ConfigError, match=r"keys\.max_key_age_days") as caught:
            load_keys_config(path)
        assert caught.value.field == "keys.max_key_age_days"
    path.write_text("[keys]\nmax_age = 3\n")
    with pytest.raises(ConfigError, match=r"keys\.max_age"):
        load_keys_config(path)


def test_data_key_policy_comes_from_the_keys_table(data_dir: Path) -> None:
    """ContextStore.open seals under the [keys] data-key policy of config.toml; a bad value
    is refused naming its key, and leaves the data directory free to open again."""
    config = data_dir / "config.toml"
    text = config.read_text()
    config.write_text(text.replace("data_key_max_records = 4096", "data_key_max_records = 0"))
    with pytest.raises(ConfigError) as caught:
        ContextStore.open(data_dir)
    assert caught.value.field == "keys.data_key_max_records"
    config.write_text(text.replace("data_key_max_records = 4096", "data_key_max_records = 2"))
    with ContextStore.open(data_dir) as store:
        for i in range(5):
            store.store(f"ucxl://a:backend_developer@p:t/*^/f{i}.py", ContextRecord(summary=str(i)))
        stats = store.keyring.sealing_stats()
    assert (stats["data_keys_issued"], stats["records_sealed"]) == (3, 5)


def test_the_default_config_has_a_keys_table(data_dir: Path) -> None:
    assert load_keys_config(data_dir / "config.toml") == KeysConfig(max_key_age_days=90)
    assert "[keys]" in (data_dir / "config.toml").read_text()


# -- interop -----------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("age") is None, reason="needs the age CLI")
def test_age_cli_decrypts_a_rewritten_record(
    store: ContextStore, clock: FakeClock, tmp_path: Path
) -> None:
    expected = _populate(store, clock)
    rotate_role(store, BE, batch_size=8)
    address = _address(3, BE)
    _, ciphertext = store.retrieve_encrypted(address)
    (tmp_path / "record.age").write_bytes(ciphertext)
    plain = subprocess.run(
        ["age", "-d", "-i", str(store.data_dir.keys / f"{BE}.key"), str(tmp_path / "record.age")],
        check=True,
        capture_output=True,
    ).stdout
    assert expected[address].encode() in plain
