"""crypto.bech32 against BIP 173 vectors and keys made by the age CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto import bech32

# A key pair written once by `age-keygen` (throwaway; it protects nothing).
AGE_KEYGEN_IDENTITY = "AGE-SECRET-KEY-1335DKAJT8EMNHYMKRRMT9P0U8CNS6XGVZ4W3X7329CGQKV62YVXSLCJ8ED"
AGE_KEYGEN_RECIPIENT = "age16yppzzfg5vp99qcf6ehleag4qu6p6whw4a39nmpns29fdg9mvvfsugamgs"


def _x25519_public(secret: bytes) -> bytes:
    return (
        X25519PrivateKey.from_private_bytes(secret)
        .public_key()
        .public_bytes(Encoding.Raw, PublicFormat.Raw)
    )


@pytest.mark.parametrize(
    "text",
    [
        "A12UEL5L",
        "a12uel5l",
        "abcdef1qpzry9x8gf2tvdw0s3jn54khce6mua7lmqqqxw",
        "split1checkupstagehandshakeupstreamerranterredcaperred2y9e3w",
        "?1ezyfcl",
    ],
)
def test_bip173_valid_vectors(text: str) -> None:
    """BIP 173's valid bech32 strings decode and re-encode to themselves (case aside)."""
    hrp, data = bech32.decode(text)
    assert bech32.encode(hrp, data) == text.lower()


@pytest.mark.parametrize(
    "text",
    [
        "pzry9x0s0muk",  # no separator
        "1pzry9x0s0muk",  # empty hrp
        "x1b4n0q5v",  # invalid data character
        "li1dgmt3",  # checksum too short
        "A1G7SGD8",  # checksum computed with upper-case hrp
        "A12uEL5L",  # mixed case
        "a12uel5m",  # wrong checksum
    ],
)
def test_bip173_invalid_vectors(text: str) -> None:
    """BIP 173's invalid strings (and a flipped checksum character) are refused."""
    with pytest.raises(ValueError, match="bech32"):
        bech32.decode(text)


def test_age_keygen_key_pair_decodes_to_matching_x25519_keys() -> None:
    """The 32 bytes decoded from an age identity give the X25519 key its recipient encodes."""
    hrp, secret = bech32.decode(AGE_KEYGEN_IDENTITY)
    assert (hrp, len(secret)) == ("age-secret-key-", 32)
    recipient_hrp, public = bech32.decode(AGE_KEYGEN_RECIPIENT)
    assert recipient_hrp == "age"
    assert _x25519_public(secret) == public
    assert bech32.encode(hrp, secret).upper() == AGE_KEYGEN_IDENTITY
    assert bech32.encode("age", public) == AGE_KEYGEN_RECIPIENT


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("age-keygen") is None, reason="needs the age CLI")
def test_fresh_age_keygen_output_round_trips(tmp_path: Path) -> None:
    """A key pair age-keygen makes now decodes, re-encodes, and its halves match."""
    key_file = tmp_path / "node.key"
    subprocess.run(["age-keygen", "-o", str(key_file)], check=True, capture_output=True)
    identity = next(
        line for line in key_file.read_text().splitlines() if line.startswith("AGE-SECRET-KEY-")
    )
    recipient = subprocess.run(
        ["age-keygen", "-y", str(key_file)], check=True, capture_output=True, text=True
    ).stdout.strip()
    _, secret = bech32.decode(identity)
    assert bech32.encode("age-secret-key-", secret).upper() == identity
    assert bech32.encode("age", _x25519_public(secret)) == recipient


@settings(max_examples=50, derandomize=True)
@given(hrp=st.sampled_from(["age", "age-secret-key-", "x"]), data=st.binary(max_size=64))
def test_round_trip(hrp: str, data: bytes) -> None:
    """decode(encode(hrp, data)) == (hrp, data), in either case."""
    text = bech32.encode(hrp, data)
    assert bech32.decode(text) == (hrp, data)
    assert bech32.decode(text.upper()) == (hrp, data)


def test_error_text_does_not_echo_input() -> None:
    """A refused secret key does not appear in the error."""
    broken = AGE_KEYGEN_IDENTITY[:-1] + "Q"
    with pytest.raises(ValueError, match="checksum") as caught:
        bech32.decode(broken)
    assert "335DKAJT" not in str(caught.value)
