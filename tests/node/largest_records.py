"""The largest records validation accepts, one per limit of ``storage.record`` (seeded).

Each builder returns record fields at one limit, made of incompressible text or bytes so
that zstd cannot shrink them: content bytes, text fields, list items, metadata bytes, and
``everything`` (every limit at once, content filling the rest of ``MAX_SECRET_BYTES``),
which yields the largest envelope a writer can produce.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import msgpack

from storage.address import MAX_ADDRESS_LEN
from storage.record import (
    MAX_CONTENT_BYTES,
    MAX_ITEM_CHARS,
    MAX_LABEL_CHARS,
    MAX_LIST_ITEMS,
    MAX_METADATA_BYTES,
    MAX_SECRET_BYTES,
    MAX_TEXT_CHARS,
    ContextRecord,
)

# Four-byte UTF-8 characters (musical symbols, U+1D100..U+1D126): the most bytes per char.
_WIDE = [chr(c) for c in range(0x1D100, 0x1D127)]


def _wide(rng: random.Random, chars: int) -> str:
    return "".join(rng.choice(_WIDE) for _ in range(chars))


def _link(rng: random.Random, i: int) -> str:
    head = f"ucxl://a{i}:r@p:t/*^/"
    path = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(200))
    segments = (path + "/") * ((MAX_ADDRESS_LEN - len(head)) // 201)
    return (head + segments).rstrip("/")[:MAX_ADDRESS_LEN].rstrip("/")


def content(rng: random.Random) -> dict[str, Any]:
    """Content of exactly ``MAX_CONTENT_BYTES`` random bytes."""
    return {"summary": "content at its limit", "content": rng.randbytes(MAX_CONTENT_BYTES)}


def texts(rng: random.Random) -> dict[str, Any]:
    """Summary, purpose and change reason of ``MAX_TEXT_CHARS`` four-byte characters."""
    return {name: _wide(rng, MAX_TEXT_CHARS) for name in ("summary", "purpose", "change_reason")}


def lists(rng: random.Random) -> dict[str, Any]:
    """Every list at ``MAX_LIST_ITEMS`` items of its longest item."""
    return {
        "summary": "lists at their limits",
        "tags": [_wide(rng, MAX_LABEL_CHARS) for _ in range(MAX_LIST_ITEMS)],
        "technologies": [_wide(rng, MAX_LABEL_CHARS) for _ in range(MAX_LIST_ITEMS)],
        "insights": [_wide(rng, MAX_ITEM_CHARS) for _ in range(MAX_LIST_ITEMS)],
        "influences": [_link(rng, i) for i in range(MAX_LIST_ITEMS)],
        "influenced_by": [_link(rng, i + MAX_LIST_ITEMS) for i in range(MAX_LIST_ITEMS)],
    }


def metadata(rng: random.Random) -> dict[str, Any]:
    """Metadata of exactly ``MAX_METADATA_BYTES`` msgpack bytes."""
    size = MAX_METADATA_BYTES - len(msgpack.packb({"k": b""}, use_bin_type=True))
    while len(msgpack.packb({"k": bytes(size)}, use_bin_type=True)) > MAX_METADATA_BYTES:
        size -= 1
    meta = {"k": rng.randbytes(size)}
    assert len(msgpack.packb(meta, use_bin_type=True)) == MAX_METADATA_BYTES
    return {"summary": "metadata at its limit", "metadata": meta}


def everything(rng: random.Random) -> dict[str, Any]:
    """Every limit at once; content fills what remains of ``MAX_SECRET_BYTES``."""
    fields = {**lists(rng), **texts(rng), **metadata(rng), "confidence": 1.0, "ttl": 3600}
    rest = ContextRecord.from_fields({**fields, "content": b""})
    spare = MAX_SECRET_BYTES - len(rest.encode_secret()) - 4  # bin 32 prefix grows by 4
    fields["content"] = rng.randbytes(max(0, min(spare, MAX_CONTENT_BYTES)))
    return fields


BUILDERS: dict[str, Callable[[random.Random], dict[str, Any]]] = {
    "content": content,
    "texts": texts,
    "lists": lists,
    "metadata": metadata,
    "everything": everything,
}
