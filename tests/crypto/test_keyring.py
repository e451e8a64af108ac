"""crypto.keyring: key versions, rotation files and their crash repair, passphrase sealing.

The passphrase tests pay age's scrypt (about a second per sealed file, rage calibrates
the work factor), so they share one protected keyring template and each counts the
scrypt operations it does in its docstring; they are marked ``slow``.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pyrage
import pytest
from pyrage import x25519

from crypto.errors import DecryptionError, KeyringError
from crypto.key_versions import repair_plan, roles_of
from crypto.keyfiles import ARMOR_BEGIN, parse_identity
from crypto.keyring import Keyring, fingerprint, read_identity_file
from crypto.roles import ADMIN_ROLE, DEFAULT_ROLES, Authority, Role, UnknownRole
from crypto.signing import verify

BE = "backend_developer"
PASSPHRASE = "correct horse battery staple"
ADMIN_ONLY = (Role(ADMIN_ROLE, Authority.MASTER),)


def _keyring(tmp_path: Path, roles: tuple[Role, ...] = DEFAULT_ROLES) -> Keyring:
    return Keyring.create(tmp_path / "keys", roles)


def _meta(keys: Path) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((keys / "keyring.json").read_text())
    return loaded


# -- unprotected: versions, rotation, listing -------------------------------------------


def test_create_open_round_trip(tmp_path: Path) -> None:
    made = _keyring(tmp_path)
    opened = Keyring.open(made.keys_dir)
    ciphertext = made.encrypt(b"hello", [BE])
    assert opened.decrypt(ciphertext, BE) == b"hello"
    assert opened.decrypt(ciphertext, ADMIN_ROLE) == b"hello"
    assert opened.decrypt_any(ciphertext) == b"hello"
    with pytest.raises(DecryptionError):
        opened.decrypt(ciphertext, "observer")
    assert opened.node_id == made.node_id
    assert _meta(made.keys_dir)["format"] == 2


def test_an_absent_identity_is_not_statted_per_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A node without the admin identity answers ``has_identity`` from memory for
    ABSENT_RECHECK_S (one stat, not one per admin request); a file another process puts
    back is seen after that, and this keyring's own ``hold_in_memory`` at once."""
    import crypto.keyring as keyring_module

    made = _keyring(tmp_path)
    identity = made.current_identity(ADMIN_ROLE)
    saved = made.identity_path(ADMIN_ROLE).read_bytes()
    made.forget(ADMIN_ROLE)
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    stats: list[Path] = []
    real_exists = Path.exists

    def counting_exists(self: Path, **kwargs: bool) -> bool:
        stats.append(self)
        return real_exists(self, **kwargs)

    monkeypatch.setattr(Path, "exists", counting_exists)
    assert [made.has_identity(ADMIN_ROLE) for _ in range(50)] == [False] * 50
    assert len(stats) == 1
    made.identity_path(ADMIN_ROLE).write_bytes(saved)  # as another process would
    os.chmod(made.identity_path(ADMIN_ROLE), 0o600)
    assert made.has_identity(ADMIN_ROLE) is False  # still within the recheck window
    now[0] += keyring_module.ABSENT_RECHECK_S
    assert made.has_identity(ADMIN_ROLE) is True
    made.forget(ADMIN_ROLE)
    assert made.has_identity(ADMIN_ROLE) is False
    made.hold_in_memory(ADMIN_ROLE, identity)
    assert made.has_identity(ADMIN_ROLE) is True


def test_rotation_keeps_both_versions_until_finished(tmp_path: Path) -> None:
    keyring = _keyring(tmp_path)
    keys = keyring.keys_dir
    old_ct = keyring.encrypt(b"old", [BE])
    old_identity = read_identity_file(keys / f"{BE}.key")
    new = keyring.begin_rotation(BE)
    assert new.version == 2
    assert keyring.recipient(BE) == new.recipient
    assert str(read_identity_file(keys / f"{BE}.key").to_public()) == new.recipient
    assert (keys / f"{BE}.v1.key").stat().st_mode & 0o777 == 0o600
    assert keyring.rotation_in_progress(BE) == {
        "role": BE,
        "from_version": 1,
        "to_version": 2,
        "started_at": new.created_at,
    }
    new_ct = keyring.encrypt(b"new", [BE])
    with pytest.raises(pyrage.DecryptError):
        pyrage.decrypt(new_ct, [old_identity])
    reopened = Keyring.open(keys)
    for ring in (keyring, reopened):
        assert ring.decrypt(old_ct, BE) == b"old"
        assert ring.decrypt(new_ct, BE) == b"new"
        assert ring.decrypt_version(new_ct, BE, 2) == b"new"
        with pytest.raises(DecryptionError):
            ring.decrypt_version(old_ct, BE, 2)
    with pytest.raises(KeyringError, match="in progress"):
        keyring.begin_rotation(BE)

    retired = keyring.finish_rotation(BE)
    assert retired.version == 1
    assert retired.retired_at is not None
    assert not (keys / f"{BE}.v1.key").exists()
    with pytest.raises(DecryptionError):
        keyring.decrypt(old_ct, BE)
    with pytest.raises(KeyringError, match="retired"):
        keyring.decrypt_version(old_ct, BE, 1)
    with pytest.raises(KeyringError, match="no rotation"):
        keyring.finish_rotation(BE)
    assert keyring.rotation_in_progress(BE) is None
    assert Keyring.open(keys).decrypt(new_ct, BE) == b"new"
    assert keyring.begin_rotation(BE).version == 3


def test_rotation_needs_a_known_held_role(tmp_path: Path) -> None:
    keyring = _keyring(tmp_path)
    with pytest.raises(UnknownRole):
        keyring.begin_rotation("nobody")
    (keyring.keys_dir / "observer.key").unlink()
    with pytest.raises(KeyringError, match="does not hold"):
        keyring.begin_rotation("observer")


def test_listing_shows_versions_fingerprints_and_the_current_one(tmp_path: Path) -> None:
    keyring = _keyring(tmp_path)
    keyring.begin_rotation(BE)
    listing = keyring.listing()
    assert listing["protected"] is False
    assert listing["node_id"] == keyring.node_id
    roles = {entry["name"]: entry for entry in listing["roles"]}
    assert list(roles) == [r.name for r in DEFAULT_ROLES]
    be = roles[BE]
    assert be["current"] == 2
    assert be["rotation"]["to_version"] == 2
    assert [v["version"] for v in be["versions"]] == [1, 2]
    assert [v["current"] for v in be["versions"]] == [False, True]
    assert [v["held"] for v in be["versions"]] == [True, True]
    for version in be["versions"]:
        assert version["fingerprint"] == fingerprint(version["recipient"])
        assert len(version["fingerprint"]) == 16
    keyring.finish_rotation(BE)
    be = {e["name"]: e for e in keyring.listing()["roles"]}[BE]
    assert be["versions"][0]["retired_at"] is not None
    assert be["versions"][0]["held"] is False
    assert be["rotation"] is None
    json.dumps(keyring.listing())


def test_fingerprint_is_sha256_of_the_recipient_text() -> None:
    recipient = str(x25519.Identity.generate().to_public())
    assert fingerprint(recipient) == hashlib.sha256(recipient.encode()).hexdigest()[:16]


def test_format_1_keyrings_still_open(tmp_path: Path) -> None:
    keyring = _keyring(tmp_path)
    ciphertext = keyring.encrypt(b"x", [BE])
    path = keyring.keys_dir / "keyring.json"
    meta = json.loads(path.read_text())
    for key in ("protected", "node_signing_key", "rotations"):
        del meta[key]
    meta["format"] = 1
    path.write_text(json.dumps(meta))
    opened = Keyring.open(keyring.keys_dir)
    assert opened.node_id == keyring.node_id
    assert opened.decrypt(ciphertext, BE) == b"x"
    opened.begin_rotation(BE)
    assert _meta(keyring.keys_dir)["format"] == 2


@pytest.mark.parametrize("name", [f"{BE}.key", f"{BE}.v1.key", "node.ed25519", "keyring.json"])
def test_a_loosely_permitted_file_is_refused_by_name(tmp_path: Path, name: str) -> None:
    keyring = _keyring(tmp_path)
    keyring.begin_rotation(BE)  # so that a version file exists
    path = keyring.keys_dir / name
    path.chmod(0o644)
    with pytest.raises(KeyringError, match="0600") as caught:
        Keyring.open(keyring.keys_dir)
    assert str(path) in str(caught.value)
    assert "0644" in str(caught.value)


def test_an_identity_file_must_match_its_recorded_recipient(tmp_path: Path) -> None:
    keyring = _keyring(tmp_path)
    keys = keyring.keys_dir
    os.replace(keys / "observer.key", keys / f"{BE}.key")
    with pytest.raises(KeyringError, match="does not hold key version 1"):
        Keyring.open(keys).decrypt(b"irrelevant", BE)


# -- crash repair of rotation files ------------------------------------------------------


def _rotated(tmp_path: Path) -> tuple[Keyring, bytes, bytes]:
    """A keyring whose BE rotation got past its commit point, and a ciphertext per key."""
    keyring = _keyring(tmp_path)
    old_ct = keyring.encrypt(b"old", [BE])
    keyring.begin_rotation(BE)
    return keyring, old_ct, keyring.encrypt(b"new", [BE])


def test_repair_after_a_crash_between_commit_and_rename(tmp_path: Path) -> None:
    """Step 3 done, step 4 not: <role>.key is still the old identity."""
    keyring, old_ct, new_ct = _rotated(tmp_path)
    keys = keyring.keys_dir
    os.replace(keys / f"{BE}.key", keys / f"{BE}.v2.key")
    os.link(keys / f"{BE}.v1.key", keys / f"{BE}.key")
    opened = Keyring.open(keys)
    assert not (keys / f"{BE}.v2.key").exists()
    assert str(read_identity_file(keys / f"{BE}.key").to_public()) == opened.recipient(BE)
    assert opened.decrypt(old_ct, BE) == b"old"
    assert opened.decrypt(new_ct, BE) == b"new"


def test_repair_after_a_crash_before_the_commit(tmp_path: Path) -> None:
    """Steps 1-2 done, keyring.json not written: the staged files go, version 1 stays."""
    keyring = _keyring(tmp_path)
    keys = keyring.keys_dir
    ciphertext = keyring.encrypt(b"x", [BE])
    staged = x25519.Identity.generate()
    (keys / f"{BE}.v2.key").write_text(f"{staged}\n")
    (keys / f"{BE}.v2.key").chmod(0o600)
    os.link(keys / f"{BE}.key", keys / f"{BE}.v1.key")
    (keys / "keyring.json.tmp").write_text("{")
    (keys / "keyring.json.tmp").chmod(0o600)
    opened = Keyring.open(keys)
    assert sorted(p.name for p in keys.iterdir() if p.name.startswith(BE)) == [f"{BE}.key"]
    assert not (keys / "keyring.json.tmp").exists()
    assert opened.decrypt(ciphertext, BE) == b"x"
    assert opened.begin_rotation(BE).version == 2


def test_repair_after_a_crash_inside_finish(tmp_path: Path) -> None:
    """keyring.json says retired but the old file is still there: it is deleted."""
    keyring, _, new_ct = _rotated(tmp_path)
    keys = keyring.keys_dir
    shutil.copy2(keys / f"{BE}.v1.key", tmp_path / "old.key")
    keyring.finish_rotation(BE)
    shutil.copy2(tmp_path / "old.key", keys / f"{BE}.v1.key")
    opened = Keyring.open(keys)
    assert not (keys / f"{BE}.v1.key").exists()
    assert opened.decrypt(new_ct, BE) == b"new"


def test_repair_plan_rules(tmp_path: Path) -> None:
    keyring, _, _ = _rotated(tmp_path)
    roles = roles_of(_meta(keyring.keys_dir))
    names = [f"{BE}.v1.key", f"{BE}.v2.key", f"{BE}.v3.key", "ghost.v1.key", "observer.key"]
    assert repair_plan(roles, names) == [("rename", f"{BE}.v2.key"), ("remove", f"{BE}.v3.key")]


# -- passphrase protection (scrypt: slow) ------------------------------------------------


@pytest.fixture(scope="module")
def protected_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, str]:
    """A protected admin-only keyring (3 scrypt: admin.key, node.key, node.ed25519)."""
    keys = tmp_path_factory.mktemp("protected") / "keys"
    keyring = Keyring.create(keys, ADMIN_ONLY, passphrase=PASSPHRASE)
    return keys, keyring.encrypt(b"secret context", []), keyring.recipient(ADMIN_ROLE)


@pytest.fixture
def protected(tmp_path: Path, protected_template: tuple[Path, bytes, str]) -> Path:
    keys = tmp_path / "keys"
    shutil.copytree(protected_template[0], keys)
    return keys


def _counting(passphrase: str) -> tuple[Callable[[], str], list[int]]:
    calls: list[int] = []

    def ask() -> str:
        calls.append(1)
        return passphrase

    return ask, calls


@pytest.mark.slow
def test_protected_files_are_sealed(protected: Path) -> None:
    """No scrypt: every secret file is an armored age file, keyring.json says so."""
    meta = _meta(protected)
    assert meta["protected"] is True
    assert isinstance(meta["node_signing_key"], str)
    for name in ("admin.key", "node.key", "node.ed25519"):
        data = (protected / name).read_bytes()
        assert data.startswith(ARMOR_BEGIN)
        assert b"AGE-SECRET-KEY" not in data
        assert b"PRIVATE KEY" not in data
        assert (protected / name).stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_a_protected_keyring_needs_its_passphrase(protected: Path) -> None:
    """No scrypt: refused at open without a passphrase."""
    with pytest.raises(KeyringError, match="passphrase-protected: set SLURP_PASSPHRASE"):
        Keyring.open(protected)


@pytest.mark.slow
def test_a_wrong_passphrase_is_one_opaque_error(
    protected: Path, protected_template: tuple[Path, bytes, str]
) -> None:
    """One scrypt: opening is lazy; the first identity use fails without details."""
    keyring = Keyring.open(protected, passphrase="wrong horse")
    with pytest.raises(KeyringError) as caught:
        keyring.decrypt(protected_template[1], ADMIN_ROLE)
    message = str(caught.value)
    assert "wrong passphrase" in message
    assert "wrong horse" not in message
    assert "Decryption failed" not in message


@pytest.mark.slow
def test_protected_keyring_unseals_lazily_signs_and_rotates(
    protected: Path, protected_template: tuple[Path, bytes, str]
) -> None:
    """Three scrypt: admin.key on first decrypt, node.ed25519 on first sign, the new
    version's file sealed by the rotation. Prints the measured cost of one unseal."""
    ask, calls = _counting(PASSPHRASE)
    keyring = Keyring.open(protected, passphrase=ask)
    assert calls == []  # opening reads no secret
    assert keyring.node_id  # known from keyring.json, no unseal
    started = time.perf_counter()
    assert keyring.decrypt(protected_template[1], ADMIN_ROLE) == b"secret context"
    print(f"one scrypt unseal: {time.perf_counter() - started:.2f} s")
    assert calls == [1]
    assert keyring.decrypt(protected_template[1], ADMIN_ROLE) == b"secret context"  # cached
    signature = keyring.signer.sign(b"message")
    verify(keyring.signer.public_key, signature, b"message")
    assert calls == [1]

    new = keyring.begin_rotation(ADMIN_ROLE)
    assert (protected / "admin.key").read_bytes().startswith(ARMOR_BEGIN)
    assert (protected / "admin.v1.key").read_bytes().startswith(ARMOR_BEGIN)
    new_ct = keyring.encrypt(b"after", [])
    assert keyring.decrypt(new_ct, ADMIN_ROLE) == b"after"
    assert keyring.decrypt(protected_template[1], ADMIN_ROLE) == b"secret context"
    assert keyring.recipient(ADMIN_ROLE) == new.recipient
    keyring.finish_rotation(ADMIN_ROLE)
    assert not (protected / "admin.v1.key").exists()


@pytest.mark.slow
def test_protect_and_unprotect_in_place(tmp_path: Path) -> None:
    """Three scrypt (sealing three files); unprotecting the same object reuses them."""
    keyring = _keyring(tmp_path, ADMIN_ONLY)
    keys = keyring.keys_dir
    ciphertext = keyring.encrypt(b"kept", [])
    plain_before = {n: (keys / n).read_bytes() for n in ("admin.key", "node.key", "node.ed25519")}
    keyring.protect(PASSPHRASE)
    assert _meta(keys)["protected"] is True
    for name in plain_before:
        assert (keys / name).read_bytes().startswith(ARMOR_BEGIN)
        assert (keys / name).stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeyringError, match="passphrase-protected"):
        Keyring.open(keys)
    with pytest.raises(KeyringError, match="already"):
        keyring.protect(PASSPHRASE)
    keyring.unlock()  # everything is still in memory: no scrypt
    with pytest.raises(UnknownRole):
        keyring.unlock(["nobody"])

    keyring.unprotect()
    assert _meta(keys)["protected"] is False
    for name, before in plain_before.items():
        assert (keys / name).read_bytes() == before
    reopened = Keyring.open(keys)
    assert reopened.decrypt(ciphertext, ADMIN_ROLE) == b"kept"
    assert reopened.node_id == keyring.node_id
    with pytest.raises(KeyringError, match="not passphrase-protected"):
        reopened.unprotect()


# -- interop with the age CLI ------------------------------------------------------------


def _run_on_tty(argv: list[str], answer: str, timeout_s: float = 60.0) -> tuple[int, bytes]:
    """Run ``argv`` with a pseudo-terminal as stdin/stderr (age reads passphrases only
    from a terminal), type ``answer`` at its passphrase prompt; (exit code, stdout).

    The child gets a new session, so it has no controlling terminal and age falls back to
    the terminal on its stdin instead of the developer's /dev/tty.
    """
    master, slave = os.openpty()
    try:
        proc = subprocess.Popen(
            argv, stdin=slave, stdout=subprocess.PIPE, stderr=slave, start_new_session=True
        )
    finally:
        os.close(slave)
    transcript, answered = b"", False
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    chunk = b""
                transcript += chunk
                if not answered and b"passphrase" in transcript.lower():
                    os.write(master, answer.encode() + b"\n")
                    answered = True
                if not chunk and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{argv[0]} did not finish: {transcript!r}")
    finally:
        os.close(master)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    return proc.wait(), out


@pytest.mark.slow
@pytest.mark.interop
@pytest.mark.skipif(shutil.which("age") is None, reason="needs the age CLI")
def test_age_cli_opens_a_sealed_identity_file(
    protected: Path, protected_template: tuple[Path, bytes, str], tmp_path: Path
) -> None:
    """One scrypt (in age): `age -d keys/admin.key` with the passphrase prints the
    identity file, which then decrypts a slurp-written record with `age -d -i`."""
    code, out = _run_on_tty(["age", "-d", str(protected / "admin.key")], PASSPHRASE)
    assert code == 0
    text = out.decode()
    assert "AGE-SECRET-KEY-1" in text
    assert str(parse_identity(text, "age output").to_public()) == protected_template[2]
    plain_key = tmp_path / "admin.plain.key"
    plain_key.write_text(text)
    record = tmp_path / "record.age"
    record.write_bytes(protected_template[1])
    decrypted = subprocess.run(
        ["age", "-d", "-i", str(plain_key), str(record)], check=True, capture_output=True
    ).stdout
    assert decrypted == b"secret context"
