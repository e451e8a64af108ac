"""Sealed records in the store: bound to their place, readers only, old records still open,
and the documented recovery path without slurp (``age`` CLI + a ChaCha20-Poly1305 library).

docs/storage.md ("Record encryption") documents the layout these tests read by hand.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import msgpack
import plyvel
import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from crypto.seal_format import SealedRecord
from storage.address import parse
from storage.context_store import ContextStore
from storage.envelope import Envelope
from storage.errors import CorruptRecord, Forbidden
from storage.record import ContextRecord, decode_secret
from storage.schema import VERSION_PREFIX, version_key

JWT = "ucxl://claude:backend_developer@chorus:auth/*^/src/auth/jwt.py"
PAY = "ucxl://claude:backend_developer@chorus:billing/*^/src/pay.py"


def rec(summary: str) -> ContextRecord:
    return ContextRecord.from_fields({"summary": summary, "content": "c" * 200})


def stored(store: ContextStore, address: str, version_id: str) -> Envelope:
    data = store.versions.version(parse(address).context(), version_id)
    assert data is not None
    return Envelope.decode(data)


def later(version_id: str, node: str) -> str:
    return f"{int(version_id[:12], 16) + 7:012x}-000000-{node}"


def test_a_written_version_is_sealed_and_reads_back(store: ContextStore) -> None:
    ref = store.store(JWT, rec("sealed"))
    env = stored(store, JWT, ref.version_id)
    assert env.ciphertext.startswith(b"SLRPSEAL")
    store.cache.clear()
    assert store.retrieve(JWT).summary == "sealed"
    assert store.retrieve(JWT, as_role="admin").summary == "sealed"


def test_a_version_moved_to_another_version_id_does_not_open(store: ContextStore) -> None:
    """Re-signed by a trusted key, the signature passes; the AEAD binding still refuses."""
    ref = store.store(JWT, rec("original"))
    env = stored(store, JWT, ref.version_id)
    moved = replace(env, version_id=later(ref.version_id, "zzzz"), parent=ref.version_id)
    store.versions.append([moved.sealed(store.keyring.signer)])
    store.cache.clear()
    with pytest.raises(CorruptRecord, match="does not decrypt"):
        store.retrieve(JWT)


def test_a_version_moved_to_another_context_does_not_open(store: ContextStore) -> None:
    ref = store.store(JWT, rec("original"))
    store.store(PAY, rec("payments"))
    env = stored(store, JWT, ref.version_id)
    pay = store.history(PAY)[-1]
    moved = replace(
        env,
        context=parse(PAY).context().canonical(),
        version_id=later(pay.version_id, "zzzz"),
        parent=pay.version_id,
    )
    store.versions.append([moved.sealed(store.keyring.signer)])
    store.cache.clear()
    with pytest.raises(CorruptRecord, match="does not decrypt"):
        store.retrieve(PAY)


def test_a_copy_re_signed_with_another_header_does_not_open(store: ContextStore) -> None:
    """A higher seal epoch (a signed header field) over the old box: refused on read."""
    ref = store.store(JWT, rec("original"))
    env = stored(store, JWT, ref.version_id)
    assert store.versions.rewrite([replace(env, seal_epoch=9).sealed(store.keyring.signer)])
    store.cache.clear()
    with pytest.raises(CorruptRecord, match="does not decrypt"):
        store.retrieve(JWT)


@pytest.mark.parametrize("where", [0, 9, 26, 40, 300, -40, -20, -1])
def test_a_flipped_bit_re_signed_by_a_trusted_key_reads_as_corrupt(
    store: ContextStore, where: int
) -> None:
    """Magic, key id, length, wrapped key, nonce, box or tag: the read is CORRUPT_RECORD."""
    ref = store.store(JWT, rec("intact"))
    env = stored(store, JWT, ref.version_id)
    damaged = bytearray(env.ciphertext)
    damaged[where] ^= 0x10
    key = version_key(parse(JWT).context().key(), ref.version_id)
    forged = replace(env, ciphertext=bytes(damaged)).sealed(store.keyring.signer)
    store.kv.write([(key, forged.encode())], sync=True)
    store.cache.clear()
    with pytest.raises(CorruptRecord, match="does not decrypt"):
        store.retrieve(JWT)
    with pytest.raises(CorruptRecord):
        store.retrieve_encrypted(JWT)


def test_a_role_outside_the_reader_set_is_forbidden(store: ContextStore) -> None:
    store.store(JWT, rec("backend and up"))
    with pytest.raises(Forbidden):
        store.retrieve(JWT, as_role="observer")
    env = stored(store, JWT, store.history(JWT)[-1].version_id)
    with pytest.raises(Exception, match="cannot decrypt"):
        store.keyring.decrypt(env.ciphertext, "observer", associated=env.binding())


def test_a_plain_age_record_written_before_sealing_still_opens(store: ContextStore) -> None:
    ref = store.store(JWT, rec("base"))
    template = stored(store, JWT, ref.version_id)
    payload = rec("from an older slurp").encode_secret()
    old = replace(
        template,
        version_id=later(ref.version_id, "0ld0"),
        parent=ref.version_id,
        ciphertext=store.keyring.encrypt(payload, template.readers),
    ).sealed(store.keyring.signer)
    store.versions.append([old])
    store.cache.clear()
    assert store.retrieve(JWT).summary == "from an older slurp"
    _, exported = store.retrieve_encrypted(JWT)
    assert exported == old.ciphertext  # already a standalone age file: returned as stored


def test_the_canary_fields_are_not_in_a_sealed_row(store: ContextStore) -> None:
    ref = store.store(JWT, ContextRecord.from_fields({"summary": "canary-sealed-Qw7Zr2"}))
    data = store.versions.version(parse(JWT).context(), ref.version_id)
    assert data is not None
    assert b"canary-sealed-Qw7Zr2" not in data


def _age(*args: str) -> subprocess.CompletedProcess[bytes]:
    found = shutil.which("age")
    assert found is not None, "age is not installed: apt-get install age (scripts/test does)"
    return subprocess.run([found, *args], capture_output=True, timeout=60, check=False)


@pytest.mark.interop
def test_get_encrypted_opens_with_the_age_cli(store: ContextStore, tmp_path: Path) -> None:
    store.store(JWT, rec("exported"))
    ref, exported = store.retrieve_encrypted(JWT)
    out = tmp_path / "v.age"
    out.write_bytes(exported)
    keys = store.data_dir.keys
    for role in ("backend_developer", "senior_software_architect", "admin"):
        opened = _age("-d", "-i", str(keys / f"{role}.key"), str(out))
        assert opened.returncode == 0, opened.stderr
        assert decode_secret(opened.stdout)["summary"] == "exported"
    assert _age("-d", "-i", str(keys / "observer.key"), str(out)).returncode != 0
    assert ref.version == 1


@pytest.mark.interop
def test_the_documented_recovery_path_opens_a_raw_record(data_dir: Path, tmp_path: Path) -> None:
    """From the raw LevelDB row, with msgpack, ``age -d`` and ChaCha20-Poly1305 only."""
    with ContextStore.open(data_dir) as store:
        store.store(
            JWT, ContextRecord.from_fields({"summary": "recover me", "content": "x" * 3000})
        )
    db = plyvel.DB(str(data_dir / "db"))
    try:
        rows = [value for _, value in db.iterator(prefix=VERSION_PREFIX)]
    finally:
        db.close()
    assert len(rows) == 1
    # docs/storage.md, "Recovery without slurp", step by step:
    row = msgpack.unpackb(rows[0], raw=False)
    schema, header, ciphertext = row[0], row[1:-3], row[-3]
    assert schema == 1
    context, version_id, compression = header[0], header[1], header[12]
    magic, layout, _kid, wrapped_len = struct.unpack_from(">8sB16sH", ciphertext)
    assert (magic, layout) == (b"SLRPSEAL", 1)
    wrapped = ciphertext[27 : 27 + wrapped_len]
    nonce = ciphertext[27 + wrapped_len : 39 + wrapped_len]
    box = ciphertext[39 + wrapped_len :]
    (tmp_path / "dek.age").write_bytes(wrapped)
    key = _age("-d", "-i", str(data_dir / "keys" / "admin.key"), str(tmp_path / "dek.age"))
    assert key.returncode == 0, key.stderr
    header_digest = hashlib.sha256(msgpack.packb(header, use_bin_type=True)).digest()
    ctx, vid = context.encode(), version_id.encode()
    ad = (
        b"slurp-seal/v1\x00"
        + struct.pack(">H", len(ctx)) + ctx
        + struct.pack(">H", len(vid)) + vid
        + header_digest
    )  # fmt: skip
    payload = ChaCha20Poly1305(key.stdout).decrypt(nonce, box, ad)
    assert compression == "zstd"
    secret = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(payload), raw=False)
    assert secret["summary"] == "recover me"
    assert SealedRecord.parse(ciphertext).wrapped_key == wrapped
