"""The envelope's encode side: the spliced row is byte for byte the one-go msgpack row.

``Envelope.encode`` joins an array16 prefix, the packed header (kept from sealing) and
the three byte strings instead of packing the whole row; ``Envelope.sealed`` copies the
instance without ``dataclasses.replace``. These tests pin both to the plain definitions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.signing import Signer
from storage.envelope import Envelope

SIGNER = Signer.generate()
_HEADER = (
    "context", "version_id", "parent", "kind", "created_at_ms", "created_by", "readers",
    "tags", "technologies", "influences", "influenced_by", "expires_at_ms", "compression",
)  # fmt: skip

_text = st.text(max_size=40)
_names = st.lists(st.text(max_size=12), max_size=6).map(tuple)
_ints = st.integers(min_value=0, max_value=2**63 - 1)
envelopes = st.builds(
    Envelope,
    context=_text,
    version_id=_text,
    parent=st.none() | _text,
    kind=st.sampled_from(["put", "tombstone"]),
    created_at_ms=_ints,
    created_by=_text,
    readers=_names,
    tags=_names,
    technologies=_names,
    influences=_names,
    influenced_by=_names,
    expires_at_ms=st.none() | _ints,
    compression=st.sampled_from(["none", "zstd"]),
    ciphertext=st.binary(max_size=300),
    signer=st.binary(max_size=40),
    signature=st.binary(max_size=80),
    seal_epoch=st.sampled_from([0, 0, 1, 7, 2**40]),
)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _one_go(env: Envelope) -> bytes:
    """The stored form as the format defines it: the whole row packed at once."""
    header = [_plain(getattr(env, name)) for name in _HEADER]
    if env.seal_epoch:
        header.append(env.seal_epoch)
    schema = 2 if env.seal_epoch else 1
    row = [schema, *header, env.ciphertext, env.signer, env.signature]
    return bytes(msgpack.packb(row, use_bin_type=True))


@settings(max_examples=300, deadline=None)
@given(envelopes)
def test_encode_is_the_one_go_row_and_decodes_back(env: Envelope) -> None:
    data = env.encode()
    assert data == _one_go(env)
    assert Envelope.decode(data) == env


@settings(max_examples=100, deadline=None)
@given(envelopes)
def test_sealed_copy_equals_the_replace_copy_and_its_encoding(env: Envelope) -> None:
    unsigned = dataclasses.replace(env, signer=b"", signature=b"")
    sealed = unsigned.sealed(SIGNER)
    expected = dataclasses.replace(unsigned, signer=SIGNER.public_key, signature=sealed.signature)
    assert sealed == expected
    assert sealed.encode() == _one_go(expected)
    sealed.check_signature()


def test_a_replaced_header_field_is_encoded_not_the_kept_header() -> None:
    env = Envelope(
        context="ucxl://a:r@p:t/*^/x.py", version_id="v1", parent=None, kind="put",
        created_at_ms=1, created_by="a/r@n1", readers=("r", "admin"), tags=("t",),
        technologies=(), influences=(), influenced_by=(), expires_at_ms=None,
        compression="none", ciphertext=b"ct",
    ).sealed(SIGNER)  # fmt: skip
    env.encode()  # keeps the packed header on ``env``
    for change in ({"seal_epoch": 3}, {"tags": ("other",)}, {"parent": "v0"}):
        changed = dataclasses.replace(env, **change)
        assert changed.encode() == _one_go(changed)
        assert Envelope.decode(changed.encode()) == changed
