"""Interoperability with the reference ``age`` tools (Debian's ``age`` and ``age-keygen``).

What slurp encrypts, ``age -d -i DATA_DIR/keys/<role>.key`` decrypts to the record's secret
payload (msgpack, zstd-compressed first when the envelope says so); what ``age`` encrypts
to a role's recipient, the keyring decrypts; ``age-keygen -y`` accepts slurp's identity
files. Also: a role key file readable by others stops the store from opening.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard
from typer.testing import CliRunner, Result

from cli.main import app
from crypto.errors import DecryptionError
from crypto.keyring import Keyring
from crypto.roles import DEFAULT_ROLES
from storage.address import parse
from storage.context_store import ContextStore
from storage.envelope import COMPRESS_THRESHOLD_BYTES, Envelope
from storage.errors import StorageError
from storage.record import ContextRecord

pytestmark = pytest.mark.interop

ADDRESS = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"
DEFAULT_READERS = ("backend_developer", "senior_software_architect", "admin")


def tool(name: str) -> str:
    """The path of an ``age`` tool (scripts/test installs the Debian package)."""
    found = shutil.which(name)
    assert found is not None, f"{name} is not installed: apt-get install age (scripts/test does)"
    return found


def age(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the ``age`` CLI."""
    return subprocess.run(
        [tool("age"), *args], input=stdin, capture_output=True, timeout=60, check=False
    )


def slurp(data_dir: Path, *args: str) -> Result:
    """The ``slurp`` command, in-process."""
    return CliRunner().invoke(app, ["--data-dir", str(data_dir), *args])


@pytest.fixture
def node(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    ContextStore.init(root, DEFAULT_ROLES)
    return root


def stored_envelope(root: Path, address: str, version_id: str) -> Envelope:
    """The envelope of one version, read back from the store."""
    with ContextStore.open(root) as store:
        row = store.versions.version(parse(address).context(), version_id)
    assert row is not None
    return Envelope.decode(row)


def decode_payload(plain: bytes, compression: str) -> dict[str, Any]:
    """The secret payload as ``storage.envelope`` describes it: msgpack, maybe zstd first."""
    if compression == "zstd":
        plain = zstandard.ZstdDecompressor().decompress(plain, max_output_size=16 << 20)
    payload = msgpack.unpackb(plain, raw=False)
    assert isinstance(payload, dict)
    return payload


@pytest.mark.parametrize(
    ("size", "compression"),
    [(100, "none"), (20 * COMPRESS_THRESHOLD_BYTES, "zstd")],
    ids=["small", "large"],
)
def test_age_decrypts_an_exported_version(
    node: Path, tmp_path: Path, size: int, compression: str
) -> None:
    content = ("the quick brown fox jumps over the lazy dog " * (size // 44 + 1))[:size]
    record = {
        "summary": "exported for age",
        "content": content,
        "insights": ["one", "two"],
        "metadata": {"ticket": "AUTH-12"},
        "tags": ["clear"],
    }
    record_file = tmp_path / "record.json"
    record_file.write_text(json.dumps(record), encoding="utf-8")
    put = slurp(node, "put", ADDRESS, "--file", str(record_file), "--json")
    assert put.exit_code == 0, put.stderr
    ref = json.loads(put.stdout)

    exported = tmp_path / "version.age"
    get = slurp(node, "get", ref["address"], "--encrypted", "-o", str(exported))
    assert get.exit_code == 0, get.stderr
    envelope = stored_envelope(node, ADDRESS, ref["version_id"])
    # stored sealed (age-wrapped data key + ChaCha20-Poly1305); exported as a fresh age file
    assert envelope.ciphertext.startswith(b"SLRPSEAL")
    assert exported.read_bytes().startswith(b"age-encryption.org/v1\n")
    assert envelope.compression == compression

    for role in DEFAULT_READERS:
        decrypted = age("-d", "-i", str(node / "keys" / f"{role}.key"), str(exported))
        assert decrypted.returncode == 0, decrypted.stderr
        payload = decode_payload(decrypted.stdout, envelope.compression)
        assert payload["summary"] == "exported for age"
        assert payload["content"] == content
        assert payload["insights"] == ["one", "two"]
        assert payload["metadata"] == {"ticket": "AUTH-12"}
        assert "tags" not in payload  # tags live in the clear header, not the payload

    outsider = age("-d", "-i", str(node / "keys" / "observer.key"), str(exported))
    assert outsider.returncode != 0
    assert outsider.stdout == b""


def recipients_from_stats(root: Path) -> dict[str, str]:
    stats = slurp(root, "stats", "--json")
    assert stats.exit_code == 0, stats.stderr
    return {role["name"]: role["recipient"] for role in json.loads(stats.stdout)["roles"]}


def test_the_keyring_decrypts_what_age_encrypted(node: Path, tmp_path: Path) -> None:
    recipients = recipients_from_stats(node)
    meta = json.loads((node / "keys" / "keyring.json").read_text(encoding="utf-8"))
    assert recipients == {
        entry["name"]: entry["versions"][0]["recipient"] for entry in meta["roles"]
    }

    plaintext = os.urandom(3000) + b"written by the age CLI"
    source = tmp_path / "plain.bin"
    source.write_bytes(plaintext)
    keyring = Keyring.open(node / "keys")
    names = list(recipients)
    for i, (role, recipient) in enumerate(recipients.items()):
        target = tmp_path / f"{role}.age"
        encrypted = age("-r", recipient, "-o", str(target), str(source))
        assert encrypted.returncode == 0, encrypted.stderr
        assert keyring.decrypt(target.read_bytes(), role) == plaintext
        with pytest.raises(DecryptionError):  # to this role only: not even admin reads it
            keyring.decrypt(target.read_bytes(), names[(i + 1) % len(names)])


def test_the_keyring_decrypts_an_age_file_with_several_recipients(
    node: Path, tmp_path: Path
) -> None:
    recipients = recipients_from_stats(node)
    encrypted = age(
        "-r", recipients["observer"], "-r", recipients["admin"], stdin=b"to two recipients"
    )
    assert encrypted.returncode == 0, encrypted.stderr
    keyring = Keyring.open(node / "keys")
    assert keyring.decrypt(encrypted.stdout, "observer") == b"to two recipients"
    assert keyring.decrypt(encrypted.stdout, "admin") == b"to two recipients"
    with pytest.raises(DecryptionError):
        keyring.decrypt(encrypted.stdout, "backend_developer")


def test_age_keygen_reads_every_identity_file(node: Path) -> None:
    meta = json.loads((node / "keys" / "keyring.json").read_text(encoding="utf-8"))
    expected = {
        f"{entry['name']}.key": entry["versions"][0]["recipient"] for entry in meta["roles"]
    }
    expected["node.key"] = meta["node_recipient"]
    got = {}
    for name in expected:
        result = subprocess.run(
            [tool("age-keygen"), "-y", str(node / "keys" / name)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        got[name] = result.stdout.strip()
    assert got == expected


def test_slurp_reads_what_it_wrote_after_an_age_round_trip(node: Path, tmp_path: Path) -> None:
    """What `get --encrypted` exports, age opens to exactly the payload the store decrypts."""
    with ContextStore.open(node) as store:
        ref = store.store(ADDRESS, ContextRecord.from_fields({"summary": "round trip"}))
        _, ciphertext = store.retrieve_encrypted(ref.address)
    exported = tmp_path / "v.age"
    exported.write_bytes(ciphertext)
    decrypted = age("-d", "-i", str(node / "keys" / "admin.key"), str(exported))
    assert decrypted.returncode == 0, decrypted.stderr
    assert decode_payload(decrypted.stdout, "none")["summary"] == "round trip"


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("observer.key", 0o644),
        ("admin.key", 0o640),
        ("node.key", 0o604),
        ("keyring.json", 0o644),
        ("node.ed25519", 0o660),
    ],
    ids=lambda value: f"{value:04o}" if isinstance(value, int) else str(value),
)
def test_a_key_file_others_may_read_stops_the_store(node: Path, name: str, mode: int) -> None:
    path = node / "keys" / name
    path.chmod(mode)
    with pytest.raises(StorageError) as info:
        ContextStore.open(node)
    assert str(path) in info.value.message
    assert "0600" in info.value.message
    assert f"{mode:04o}" in info.value.message

    result = slurp(node, "get", ADDRESS)
    assert isinstance(result.exception, SystemExit)
    assert result.exit_code != 0
    assert str(path) in result.stderr
    assert "0600" in result.stderr
    assert "Traceback" not in result.stderr

    path.chmod(0o600)
    with ContextStore.open(node):
        pass
