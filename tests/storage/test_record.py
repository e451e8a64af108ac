"""Record validation: types, limits, and errors that name the field."""

from __future__ import annotations

from typing import Any

import pytest

from storage.errors import CorruptRecord, InvalidPayload
from storage.record import MAX_CONTENT_BYTES, ContextRecord, decode_secret


def test_valid_record_round_trips_its_secret_fields() -> None:
    record = ContextRecord.from_fields(
        {
            "summary": "s",
            "purpose": "p",
            "content": "c",
            "tags": ["auth"],
            "technologies": ["python"],
            "insights": ["i1", "i2"],
            "metadata": {"k": [1, 2]},
            "change_reason": "r",
            "influences": ["ucxl://a:b@c:d/*^/x.py"],
            "confidence": 0.5,
            "ttl": 60,
        }
    )
    secret = decode_secret(record.encode_secret())
    assert secret["summary"] == "s"
    assert secret["insights"] == ["i1", "i2"]
    assert secret["metadata"] == {"k": [1, 2]}
    assert record.tags == ("auth",)
    assert record.ttl == 60


def test_bytes_content_is_kept_as_bytes() -> None:
    record = ContextRecord.from_fields({"content": b"\x00\xff"})
    assert decode_secret(record.encode_secret())["content"] == b"\x00\xff"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"summary": 3}, "summary"),
        ({"tags": "auth"}, "tags"),
        ({"tags": ["a\nb"]}, "tags"),
        ({"tags": [""]}, "tags"),
        ({"technologies": [1]}, "technologies"),
        ({"insights": ["x" * 5000]}, "insights"),
        ({"content": 12}, "content"),
        ({"content": "x" * (MAX_CONTENT_BYTES + 1)}, "content"),
        ({"metadata": {"k": object()}}, "metadata"),
        ({"metadata": {1: "v"}}, "metadata"),
        ({"confidence": 1.5}, "confidence"),
        ({"confidence": True}, "confidence"),
        ({"confidence": float("nan")}, "confidence"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": "60"}, "ttl"),
        ({"influences": ["not an address"]}, "influences"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_invalid_fields_are_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        ContextRecord.from_fields(fields)
    assert caught.value.field == field
    assert caught.value.code == "UCXL-400-INVALID_PAYLOAD"


def test_a_record_must_be_an_object() -> None:
    with pytest.raises(InvalidPayload):
        ContextRecord.from_fields(["not", "a", "dict"])  # type: ignore[arg-type]


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1s\x02"])
def test_damaged_secret_payload_is_a_corrupt_record(data: bytes) -> None:
    with pytest.raises(CorruptRecord):
        decode_secret(data)
