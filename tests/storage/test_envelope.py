"""Envelopes: round trip, signatures over header and ciphertext, compression."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.signing import Signer
from storage.envelope import (
    COMPRESS_THRESHOLD_BYTES,
    REUSED_CODEC_MAX_BYTES,
    Envelope,
    compress_payload,
    decompress_payload,
    kind_of,
)
from storage.errors import CorruptRecord

SIGNER = Signer.generate()


def _envelope(**changes: object) -> Envelope:
    base = Envelope(
        context="ucxl://a:r@p:t/*^/x.py",
        version_id="000000000001-000000-n1",
        parent=None,
        kind="put",
        created_at_ms=1,
        created_by="a/r@n1",
        readers=("r", "admin"),
        tags=("t",),
        technologies=(),
        influences=(),
        influenced_by=(),
        expires_at_ms=None,
        compression="none",
        ciphertext=b"age-ciphertext",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_round_trip_and_signature() -> None:
    env = _envelope().sealed(SIGNER)
    decoded = Envelope.decode(env.encode())
    assert decoded == env
    decoded.check_signature()


@pytest.mark.parametrize(
    "change",
    [
        {"ciphertext": b"other"},
        {"readers": ("r", "admin", "observer")},
        {"tags": ("x",)},
        {"version_id": "000000000002-000000-n1"},
        {"context": "ucxl://a:r@p:t/*^/y.py"},
        {"parent": "000000000000-000000-n1"},
    ],
)
def test_any_change_breaks_the_signature(change: dict[str, object]) -> None:
    env = dataclasses.replace(_envelope().sealed(SIGNER), **change)  # type: ignore[arg-type]
    with pytest.raises(CorruptRecord, match="signature"):
        env.check_signature()


def test_unsigned_is_refused() -> None:
    with pytest.raises(CorruptRecord, match="unsigned"):
        _envelope().check_signature()


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_decode_of_arbitrary_bytes_raises_only_corrupt_record(data: bytes) -> None:
    """Envelope.decode never raises anything but CorruptRecord."""
    with contextlib.suppress(CorruptRecord):
        Envelope.decode(data)


def test_compression_threshold_and_round_trip() -> None:
    small = b"x" * COMPRESS_THRESHOLD_BYTES
    assert compress_payload(small) == (small, "none")
    large = b"abc" * 2000
    packed, how = compress_payload(large)
    assert how == "zstd"
    assert len(packed) < len(large)
    assert decompress_payload(packed, how) == large
    with pytest.raises(CorruptRecord):
        decompress_payload(b"not zstd", "zstd")


def test_kind_of_reads_the_kind_without_building_the_envelope() -> None:
    put = _envelope().sealed(SIGNER).encode()
    tombstone = _envelope(kind="tombstone", ciphertext=b"").sealed(SIGNER).encode()
    assert (kind_of(put), kind_of(tombstone)) == ("put", "tombstone")
    with pytest.raises(CorruptRecord):
        kind_of(b"\x93\x01\x02\x03")  # a short array: no kind where it belongs


@settings(max_examples=100)
@given(st.binary(max_size=200))
def test_kind_of_arbitrary_bytes_raises_only_corrupt_record(data: bytes) -> None:
    with contextlib.suppress(CorruptRecord):
        assert kind_of(data) in ("put", "tombstone")


def test_reused_codecs_give_the_bytes_of_fresh_ones_in_every_thread() -> None:
    """The per-thread zstd objects are reused: the output is what a fresh compressor
    writes, a failed decompress leaves the next one working, and other threads get their
    own objects."""
    payloads = [bytes([i]) * 700 + b"abc" * (400 + i) for i in range(3)]
    payloads.append(b"large " * (REUSED_CODEC_MAX_BYTES // 4))  # past the reused contexts
    fresh = [zstandard.ZstdCompressor(level=3).compress(p) for p in payloads]

    def check(out: list[bool]) -> None:
        for payload, expected in zip(payloads, fresh, strict=True):
            packed, how = compress_payload(payload)
            with pytest.raises(CorruptRecord):
                decompress_payload(packed[:-3], "zstd")  # truncated: refused
            out.append(packed == expected and decompress_payload(packed, how) == payload)

    here: list[bool] = []
    check(here)
    there: list[bool] = []
    threads = [threading.Thread(target=check, args=(there,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert here == [True] * 4
    assert there == [True] * 12
